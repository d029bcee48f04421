"""The builds of kernels/dense.cpp at each instruction-set level against each other, function by function, where this
machine runs more than one (an AVX-512 CPU runs the AVX2 build too): the parity tests against PyTorch (test_model,
test_quantize, test_grpo, test_engine) run once per level; these show the levels give the same numbers.

How close, and why: both levels do the same float32 arithmetic, and e^x, σ(x), bf16 rounding and every elementwise
product are the same instructions' results lane for lane (simd.h), so elementwise kernels (SwiGLU, RoPE, the experts'
weighted sum) agree bit for bit. What a level changes is the order in which a sum's terms are added (16 lanes and
their horizontal sum, or 8; vdpbf16ps's pairs, or one product at a time): float32 results then differ by float32
rounding, 1e-6 relative to their size, and a bf16 result, the rounding of such a float32 sum, is the same bf16 value
or its neighbour (one ulp), unless the sum cancels to near 0, where the float32 difference itself is the bound."""

from __future__ import annotations

import pytest
import torch

import openseek.kernels as kernels


@pytest.fixture(scope="module")
def levels():
    """(AVX2 build, AVX-512 build), or the test skipped where this CPU does not run both."""
    avx2, avx512 = kernels.dense_avx2(), kernels.dense_avx512()
    if avx2 is None or avx512 is None:
        pytest.skip("this CPU does not run both the AVX2 and the AVX-512 build (or OPENSEEK_KERNELS=0)")
    return avx2, avx512


def agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """a (AVX2) and b (AVX-512) equal within a different summation order: see the module's docstring."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype is torch.bfloat16:
        x, y = a.float(), b.float()
        top = torch.maximum(x.abs(), y.abs())
        ulp = torch.exp2(torch.floor(torch.log2(top.clamp_min(1e-30))) - 7)  # bf16 keeps 8 significant bits
        near_zero = 1e-6 * float(y.abs().max())
        assert bool(((x - y).abs() <= torch.maximum(ulp, torch.tensor(near_zero))).all())
    else:
        assert float((a.double() - b.double()).norm()) <= 1e-6 * float(b.double().norm())


def same(a, b) -> None:
    """a and b identical, bit for bit (tensors or lists of them)."""
    for x, y in zip(*(v if isinstance(v, (list, tuple)) else [v] for v in (a, b))):
        assert x.dtype == y.dtype and torch.equal(x, y)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("K", [256, 100, 7])  # tails shorter than a vector at either width
def test_the_matvecs_agree(levels, dtype, rows, K):
    avx2, avx512 = levels
    torch.manual_seed(0)
    x, w = torch.randn(rows, K).to(dtype), torch.randn(43, K).to(dtype)  # 43: every tile width and a remainder
    name = "linear_bf16" if dtype is torch.bfloat16 else "linear_fp32"
    agree(getattr(avx2, name)(x, w), getattr(avx512, name)(x, w))
    ends = torch.tensor([rows // 2, rows // 2, rows])  # an empty group between two
    stack = torch.randn(3, 43, K).to(dtype)
    agree(getattr(avx2, "grouped_" + name)(x, stack, ends), getattr(avx512, "grouped_" + name)(x, stack, ends))


@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("B, H, KV, T, S, D", [(3, 8, 2, 1, 41, 64), (2, 4, 4, 3, 17, 48), (1, 6, 1, 2, 5, 128)])
def test_decode_attention_agrees(levels, q_dtype, cache_dtype, B, H, KV, T, S, D):
    avx2, avx512 = levels
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D).to(q_dtype)
    k, v = (torch.randn(B + 1, KV, S + 7, D).to(cache_dtype)[:B, :, :S] for _ in range(2))
    mask = torch.rand(B, 1, T, S) < 0.7
    mask[..., 0] = True
    agree(avx2.attend_cache(q, k, v, mask, D**-0.5), avx512.attend_cache(q, k, v, mask, D**-0.5))


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_absorbed_mla_decode_agrees(levels, dtype, cache_dtype):
    avx2, avx512 = levels
    torch.manual_seed(0)
    B, H, T, S, nope, rope, r, v_dim = 2, 4, 3, 19, 16, 16, 32, 24
    q_nope = torch.randn(B, H, T, 2 * nope).to(dtype)[..., :nope]
    q_pe = torch.randn(B, H, T, rope)
    kv = torch.randn(B, 1, S + 5, r + rope).to(cache_dtype)[:, :, :S]
    mask = torch.arange(S) <= torch.randint(T - 1, S, (B, 1, T, 1))
    w = (torch.randn(H * (nope + v_dim), r) * 0.2).to(dtype)
    agree(avx2.attend_latent(q_nope, q_pe, kv, mask, w, 0.1), avx512.attend_latent(q_nope, q_pe, kv, mask, w, 0.1))


@pytest.mark.parametrize("n_group, topk_group, always_on", [(1, 1, 0), (4, 2, 1)])
def test_routing_and_combining_agree(levels, n_group, topk_group, always_on):
    """The router's choice from scores that differ by float32 rounding: the same experts (no near-ties in these
    scores), weights within float32 rounding; the weighted sum, one product and sum per element, bit for bit."""
    avx2, avx512 = levels
    torch.manual_seed(0)
    x, w, bias = torch.randn(9, 64), torch.randn(16, 64), torch.randn(16) * 0.1
    args = (x, w, bias, 4, n_group, topk_group, True, 2.5, always_on)
    (token, ends, weight), (token2, ends2, weight2) = avx2.route_experts(*args), avx512.route_experts(*args)
    same([token, ends], [token2, ends2])
    torch.testing.assert_close(weight, weight2, rtol=1e-6, atol=0)
    for dtype in DTYPES:
        out = torch.randn(len(token), 48).to(dtype)
        same(avx2.combine_experts(out, token, weight, 9), avx512.combine_experts(out, token, weight, 9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [37, 16, 5])
def test_the_training_softmaxes_agree(levels, dtype, S):
    avx2, avx512 = levels
    torch.manual_seed(0)
    scores, grad = (torch.randn(2, 3, 7, S) * 4).to(dtype), torch.randn(2, 3, 7, S).to(dtype)
    mask = torch.rand(1, 1, 7, S) < 0.6
    mask[0, 0, 0] = False  # a row allowed nowhere
    probs, stats = avx2.masked_softmax(scores, mask, 0.125)
    probs2, stats2 = avx512.masked_softmax(scores, mask, 0.125)
    agree(probs, probs2)
    agree(stats, stats2)
    agree(avx2.masked_softmax_backward(grad, scores, mask, stats2, 0.125),
          avx512.masked_softmax_backward(grad, scores, mask, stats2, 0.125))
    logits, targets = (torch.randn(11, 1003) * 3).to(dtype), torch.randint(0, 1003, (11,))
    for temperature in (1.0, 0.7):
        got = avx2.token_logprobs(logits, targets, temperature, True)
        want = avx512.token_logprobs(logits, targets, temperature, True)
        for a, b in zip(got, want):
            agree(a, b)
        g = torch.randn(11)
        agree(avx2.token_logprobs_backward(g, logits, targets, want[2], temperature),
              avx512.token_logprobs_backward(g, logits, targets, want[2], temperature))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [512, 40, 7])
def test_rmsnorm_swiglu_and_rope_agree(levels, dtype, D):
    """RMSNorm sums squares (within rounding); SwiGLU and RoPE are elementwise: bit for bit, forward and backward."""
    avx2, avx512 = levels
    torch.manual_seed(0)
    x, w, dy = (torch.randn(37, D) * 2).to(dtype), (torch.randn(D) * 0.5 + 1).to(dtype), torch.randn(37, D).to(dtype)
    (y, rstd), (y2, rstd2) = avx2.rms_norm(x, w, 1e-6), avx512.rms_norm(x, w, 1e-6)
    agree(y, y2)
    agree(rstd, rstd2)
    for a, b in zip(avx2.rms_norm_backward(dy, x, w, rstd2), avx512.rms_norm_backward(dy, x, w, rstd2)):
        agree(a, b)
    gate, up = (torch.randn(5, 3 * D + 1) * 3).to(dtype), torch.randn(5, 3 * D + 1).to(dtype)
    same(avx2.swiglu(gate, up), avx512.swiglu(gate, up))
    same(avx2.swiglu_backward(up, gate, up), avx512.swiglu_backward(up, gate, up))
    wide = torch.linspace(-110, 40, 3 * D + 1).to(dtype)  # σ's e^x from 1 down to below float32's denormals
    same(avx2.swiglu(wide, up[0]), avx512.swiglu(wide, up[0]))
    if D % 2 == 0:
        q = torch.randn(2, 7, 3, D).to(dtype).transpose(1, 2)  # [B, H, T, D], strided
        angles = torch.randn(2, 1, 7, D // 2)
        for cos_dtype in DTYPES:
            cos, sin = angles.cos().to(cos_dtype), angles.sin().to(cos_dtype)
            for inverse in (False, True):
                for interleaved in (False, True):
                    args = (q, cos, sin, torch.promote_types(dtype, cos_dtype), inverse, interleaved)
                    same(avx2.rope(*args), avx512.rope(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_latent_cache_write_agrees(levels, dtype):
    avx2, avx512 = levels
    torch.manual_seed(0)
    B, T, r, rope, S = 2, 3, 32, 16, 10
    kv_a = torch.randn(B, T, 2 * (r + rope)).to(dtype)[..., : r + rope]
    w = (torch.randn(r) * 0.5 + 1).to(dtype)
    angles = torch.randn(B, 1, T, rope // 2)
    rows, slots = torch.tensor([2, 0]), torch.tensor([[4, 5, 6], [0, 1, 2]])
    buffers = [torch.zeros(3, S, r + rope, dtype=dtype) for _ in range(2)]
    for module, buffer in zip(levels, buffers):
        module.store_latent(kv_a, w, 1e-6, angles.cos(), angles.sin(), True, buffer, rows, slots)
    agree(*buffers)


def bad_calls():
    """(what, call(module)) pairs: a tensor each kernel must refuse, with its message."""
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    q, kv = torch.randn(1, 2, 1, 24), torch.randn(1, 1, 5, 24)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    return [
        ("k-mismatch", lambda m: m.linear_fp32(x, torch.randn(32, 63)), "x [M, K] and w [N, K] expected"),
        ("strided", lambda m: m.linear_fp32(x.t().contiguous().t(), w), "x and w must be contiguous"),
        ("dtype", lambda m: m.linear_bf16(x, w.bfloat16()), "x and w must both be BFloat16, got Float and BFloat16"),
        ("ends", lambda m: m.grouped_linear_fp32(x, torch.randn(2, 32, 64), torch.tensor([2, 1])),
         "ends[1] = 1 is below 2"),
        ("head size", lambda m: m.attend_cache(q, kv, kv, mask, 1.0), "the head size is not a multiple of 16"),
        ("top_k", lambda m: m.route_experts(x, torch.randn(16, 64), torch.zeros(16), 4, 3, 2, True, 1.0, 0),
         "do not fit 16 experts"),
        ("token", lambda m: m.combine_experts(torch.randn(2, 16), torch.tensor([0, 3]), torch.ones(2), 3),
         "token 3 out of range for 3"),
        ("target", lambda m: m.token_logprobs(x, torch.full((3,), 64), 1.0, False), "outside the vocabulary of 64"),
        ("norm dtype", lambda m: m.rms_norm(x, torch.ones(64).bfloat16(), 1e-6), "of one dtype, contiguous"),
        ("swiglu", lambda m: m.swiglu(x, w), "gate and up must be contiguous, of one shape and dtype"),
        ("odd rope", lambda m: m.rope(torch.randn(1, 1, 2, 5), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2),
                                      torch.float32, False, False), "of even size expected"),
        ("slot", lambda m: m.store_latent(torch.randn(1, 1, 48), torch.ones(32), 1e-6, torch.ones(1, 1, 1, 8),
                                          torch.ones(1, 1, 1, 8), False, torch.zeros(1, 4, 48), torch.tensor([0]),
                                          torch.tensor([[4]])), "cache row 0 or slot 4 out of range"),
    ]


@pytest.mark.parametrize("level", ["dense_avx512", "dense_avx2"])
def test_each_level_refuses_the_same_bad_inputs_by_name(level):
    module = getattr(kernels, level)()
    if module is None:
        pytest.skip(f"this CPU cannot run {level} (or OPENSEEK_KERNELS=0)")
    for what, call, message in bad_calls():
        with pytest.raises(RuntimeError) as error:
            call(module)
        assert message in str(error.value), what


@pytest.mark.parametrize("level, namespace", [("dense_avx512", "openseek"), ("dense_avx2", "openseek_avx2")])
def test_each_level_s_operators_and_their_shapes(level, namespace):
    """Each level registers its kernels as operators in its own namespace (so both load in one process), with
    shape-only versions for torch.compile: torch.library.opcheck runs the operator, its fake and its schema."""
    if getattr(kernels, level)() is None:
        pytest.skip(f"this CPU cannot run {level} (or OPENSEEK_KERNELS=0)")
    ops = getattr(torch.ops, namespace)
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    q, k = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 9, 32)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    routing = (x, torch.randn(8, 64), torch.zeros(8), 2, 1, 1, True, 1.0, 0)
    token, _, weight = ops.route_experts(*routing)
    cases = [
        (ops.linear_fp32, (x, w)), (ops.linear_bf16, (x.bfloat16(), w.bfloat16())),
        (ops.grouped_linear_fp32, (x, torch.randn(2, 32, 64), torch.tensor([1, 3]))),
        (ops.attend_cache, (q, k, k, mask, 0.2)),
        (ops.attend_latent, (torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 1, 9, 48), mask,
                             torch.randn(4 * 40, 32), 0.2)),
        (ops.route_experts, routing), (ops.combine_experts, (torch.randn(len(token), 16), token, weight, 3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
