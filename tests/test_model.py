"""Logits parity with transformers' own classes on tiny random checkpoints saved and loaded from disk."""

import pytest
import torch

import openseek
from openseek.model import Model

KINDS = ["qwen2", "llama", "deepseek_v3", "deepseek_v3_yarn", "deepseek_v3_lite"]


def logits_of(model, ids):
    out = model(ids)
    return getattr(out, "logits", out).float()  # transformers returns an output object, openseek the tensor


def logits_gap(a, b, batch=2, length=20, seed=1):
    """Max |Δlogits| of two models (either kind) on the same random batch."""
    vocab = a.config.vocab_size if hasattr(a, "config") else a.cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (logits_of(a, ids) - logits_of(b, ids)).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_float32(hf_model_dir, kind):
    directory, hf_model = hf_model_dir(kind)
    ours = openseek.load(directory)
    assert ours.dtype == torch.float32
    assert logits_gap(hf_model, ours) <= 1e-4


def test_deepseek_fixture_exercises_the_parity_traps(hf_model_dir):
    """The DeepSeek case really has grouped routing, a biased router, dense-first layers and YaRN."""
    directory, hf_model = hf_model_dir("deepseek_v3_yarn")
    ours = openseek.load(directory)
    cfg = ours.cfg
    assert cfg.n_group > 1 and cfg.first_k_dense_replace >= 1 and cfg.rope_scaling["rope_type"] == "yarn"
    assert ours.layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0
    assert ours.layers[0].mlp.__class__.__name__ == "SwiGLU"
    # YaRN's mscale² enters the softmax scale: 192^-0.5-style base times (0.1·ln 40 + 1)².
    base = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    assert ours.layers[0].self_attn.scale == pytest.approx(base * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    assert openseek.load(hf_model_dir("deepseek_v3_lite")[0]).cfg.q_lora_rank is None


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_bfloat16_logits_close_to_transformers(hf_model_dir, kind):
    directory, hf_model = hf_model_dir(kind)
    ours = openseek.load(directory, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    if kind == "deepseek_v3":  # routing stays float32, as in transformers
        assert ours.layers[-1].mlp.gate.weight.dtype == torch.float32
    hf_model = hf_model.to(torch.bfloat16)
    assert logits_gap(hf_model, ours) <= 0.05
    # rotary angles are computed from float32 frequencies, as in transformers: far positions stay exact
    exact = openseek.load(directory, dtype=torch.float32)
    far = torch.tensor([[1000, 4000]])
    for got, want in zip(ours.rotary(far, torch.float32), exact.rotary(far, torch.float32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_padding_mask_gives_each_row_what_it_gives_alone():
    torch.manual_seed(0)
    cfg = openseek.ModelConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
        n_group=2, topk_group=1, first_k_dense_replace=1,
    )
    model = Model(cfg).eval()
    short, long = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9))
    batch = torch.cat((torch.cat((torch.zeros(1, 4, dtype=torch.long), short), 1), long))  # left-padded
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        both = model(batch, padding_mask=mask)
        assert (both[0, 4:] - model(short)[0]).abs().max() <= 1e-5
        assert (both[1] - model(long)[0]).abs().max() <= 1e-5


def test_mtp_logits_shape_and_dependence_on_next_token():
    torch.manual_seed(0)
    cfg = openseek.ModelConfig(
        model_type="deepseek_v3", vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, num_nextn_predict_layers=1,
    )
    model = Model(cfg).eval()
    ids = torch.randint(0, 40, (2, 7))
    logits, hidden = model(ids, return_hidden=True)
    (mtp,) = model.mtp_logits(hidden, ids)
    assert mtp.shape == (2, 6, 40)
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 40
    logits2, hidden2 = model(changed, return_hidden=True)
    (mtp2,) = model.mtp_logits(hidden2, changed)
    # Position 2 of the MTP depth sees h_2 and the embedding of token 3: it must change; position 0 must not.
    assert (mtp2[:, 2] - mtp[:, 2]).abs().max() > 1e-4
    assert (mtp2[:, 0] - mtp[:, 0]).abs().max() < 1e-6


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("x_dtype, cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.kernels("dense")
def test_rope_kernel_equals_pytorchs_rotation(x_dtype, cos_dtype, interleaved, level):
    """Rotary embedding on our kernel (ops.rope, halves and DeepSeek's interleaved layout) against the
    written-out PyTorch rotation, on a strided view as attention passes it: bitwise where the dtypes round (bf16
    products and sums, as PyTorch rounds them), within float32 rounding otherwise; the gradient is the inverse
    rotation of the incoming one, written back in the input's layout."""
    from openseek.kernels import ops

    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 40
    x = torch.randn(B, T, H, D).to(x_dtype).transpose(1, 2).requires_grad_()  # [B, H, T, D], strided
    angles = torch.randn(B, 1, T, D // 2)
    cos, sin = angles.cos().to(cos_dtype), angles.sin().to(cos_dtype)
    got = ops.rope(x, cos, sin, interleaved=interleaved)
    x1, x2 = (x.detach()[..., 0::2], x.detach()[..., 1::2]) if interleaved else x.detach().chunk(2, dim=-1)
    want = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype is torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7)
    grad = torch.randn_like(got)
    got.backward(grad)
    g1, g2 = grad.double().chunk(2, dim=-1)
    c, s = cos.double(), sin.double()
    first, second = g1 * c + g2 * s, g2 * c - g1 * s
    want_grad = torch.stack((first, second), dim=-1).flatten(-2) if interleaved else torch.cat((first, second), -1)
    assert x.grad.dtype == x_dtype
    error = float((x.grad.double() - want_grad).norm() / want_grad.norm())
    assert error < (1e-6 if x_dtype is torch.float32 else 4e-3)  # float32 rounding; bf16 roundings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [512, 40])
@pytest.mark.kernels("dense")
def test_rmsnorm_and_swiglu_kernels_equal_float64(dtype, D, level):
    """RMSNorm and SwiGLU's silu(gate)·up on our kernel, forward and backward (input and weight gradients), against
    float64; with bf16 inputs the results are the float64 ones rounded (silu's result, as PyTorch rounds it: the
    SwiGLU output is then bitwise PyTorch's)."""
    from openseek.kernels import ops
    from openseek.model.norm import RMSNorm

    torch.manual_seed(0)
    tolerance = 1e-6 if dtype is torch.float32 else 4e-3

    def error(got, want):
        return float((got.double() - want).norm() / want.norm())

    norm = RMSNorm(D, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D) * 0.5 + 1)
    x = (torch.randn(3, 37, D) * 2).to(dtype).requires_grad_()
    y = norm(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    y64.backward(grad.double())
    assert y.dtype == x.grad.dtype == norm.weight.grad.dtype == dtype
    assert max(error(y, y64), error(x.grad, x64.grad), error(norm.weight.grad, w64.grad)) < tolerance

    gate, up = (torch.randn(5, 3 * D + 1) * 3).to(dtype).requires_grad_(), torch.randn(5, 3 * D + 1).to(dtype)
    up.requires_grad_()
    out = ops.swiglu(gate, up)
    grad = torch.randn_like(out)
    out.backward(grad)
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    out64 = torch.nn.functional.silu(gate64) * up64
    out64.backward(grad.double())
    assert max(error(out, out64), error(gate.grad, gate64.grad), error(up.grad, up64.grad)) < tolerance
    if dtype is torch.bfloat16:
        assert torch.equal(out.detach(), torch.nn.functional.silu(gate.detach()) * up.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, T", [(3, 8, 37), (1, 2, 16), (2, 4, 5)])
@pytest.mark.kernels("dense")
def test_masked_softmax_kernel_equals_the_float64_softmax(dtype, B, H, T, level):
    """Attention's scaled, masked softmax (ops.masked_softmax) on our kernel, forward and backward, under a
    causal mask with left- and right-padded rows (a query row sees itself, as causal_padding_mask builds it): the
    float32 results rounded once to the scores' dtype. A row the mask allows nowhere gives probabilities 0."""
    from openseek.kernels import ops
    from openseek.model.transformer import causal_padding_mask

    torch.manual_seed(0)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[0, : T // 3] = False
    padding[-1, T - T // 4 :] = False
    mask = causal_padding_mask(padding)
    scores = (torch.randn(B, H, T, T) * 4).to(dtype).requires_grad_()
    grad = torch.randn(B, H, T, T).to(dtype)
    probs = ops.masked_softmax(scores, mask, 0.125)
    probs.backward(grad)
    scores64 = scores.detach().double().requires_grad_()
    want = (scores64 * 0.125).masked_fill(~mask, float("-inf")).softmax(-1)
    want.backward(grad.double())
    assert probs.dtype == dtype and scores.grad.dtype == dtype
    tolerance = 1e-6 if dtype is torch.float32 else 4e-3  # float32 sums; one rounding to bf16
    assert float((probs.double() - want).abs().max()) < tolerance
    assert float((scores.grad.double() - scores64.grad).norm() / scores64.grad.norm()) < tolerance
    assert bool((probs[~mask.expand_as(probs)] == 0).all()) and bool((scores.grad[~mask.expand_as(probs)] == 0).all())
    nowhere = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    assert bool((ops.masked_softmax(torch.randn(1, 2, 3, 5).to(dtype), nowhere, 1.0) == 0).all())


@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("B, H, KV, T, S, D", [(3, 8, 2, 1, 41, 64), (2, 4, 4, 3, 17, 32), (1, 6, 1, 2, 5, 128)])
@pytest.mark.kernels("dense")
def test_decode_attention_kernel_equals_the_float64_attention(q_dtype, cache_dtype, B, H, KV, T, S, D, level):
    """Decode's attention over the cache (ops.attend_cache) on our kernel: keys and values sliced from larger
    cache buffers, as the cache hands them out, each row's tokens masked to the slots up to their own; the result
    is float32 attention rounded once to q's dtype."""
    from openseek.kernels import ops

    torch.manual_seed(0)
    q = torch.randn(B, H, T, D).to(q_dtype)
    k, v = (torch.randn(B + 1, KV, S + 7, D).to(cache_dtype)[:B, :, :S] for _ in range(2))
    slots = torch.randint(T - 1, S - T + 1, (B, 1)) + torch.arange(T)  # each row's own slots: the last T it attends
    mask = (torch.arange(S) <= slots[:, :, None])[:, None]
    with torch.no_grad():
        got = ops.attend_cache(q, k, v, mask, D**-0.5)
    scores = (q.double().view(B, KV, H // KV, T, D) @ k.double()[:, :, None].transpose(-1, -2)) * D**-0.5
    probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    want = (probs @ v.double()[:, :, None]).view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
    assert got.dtype == q_dtype and got.shape == (B, T, H * D)
    error = float((got.double() - want).norm() / want.norm())
    assert error < (1e-6 if q_dtype is torch.float32 else 3e-3)  # float32 sums; one rounding to bf16


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("B, T, S", [(3, 1, 41), (2, 3, 17)])
@pytest.mark.kernels("dense")
def test_absorbed_mla_kernel_equals_its_pytorch_form(dtype, cache_dtype, B, T, S, level):
    """MLA's absorbed decode (MLAttention.attend_absorbed) on our kernel — the query folded through kv_b_proj's key
    half, attention over the cached [latent | rope key] slots sliced from a larger buffer, the output through its
    value half — equals the same arithmetic written out in PyTorch ops (the path taken with autograd on)."""
    from openseek.config import ModelConfig
    from openseek.model.attention import MLAttention

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24)
    attention = MLAttention(cfg).to(dtype)
    attention.kv_b_proj.weight.data.normal_(0, 0.2)
    q_nope = torch.randn(B, 4, T, 32).to(dtype)[..., :16]  # a strided view, as split from the projection
    q_pe = torch.randn(B, 4, T, 16)  # float32: RoPE's result
    kv = torch.randn(B, 1, S + 5, 48).to(cache_dtype)[:, :, :S]
    slots = torch.randint(T - 1, S - T + 1, (B, 1)) + torch.arange(T)
    mask = (torch.arange(S) <= slots[:, :, None])[:, None]
    with torch.no_grad():
        got = attention.attend_absorbed(q_nope, q_pe, kv, mask)
    with torch.enable_grad():
        want = attention.attend_absorbed(q_nope, q_pe, kv, mask)
    assert got.dtype == dtype and got.shape == (B, T, 4 * 24)
    error = float((got.double() - want.double()).norm() / want.double().norm())
    assert error < (1e-6 if dtype is torch.float32 else 4e-3)  # float32 sums in another order; bf16: one rounding
