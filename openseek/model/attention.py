"""Attention: grouped-query attention (Llama, Qwen2) and multi-head latent attention (DeepSeek-V3).

Both take the rotary cos/sin and an optional boolean mask [B, 1, T, S] (True = may attend); with no mask the
attention is plainly causal. MLA's naive form (training, prefill) expands the compressed latent to full keys and
values; its absorbed form (decode) folds the up-projections into the query and output and attends over the latent.

`cache` (optional, owned and driven by the engine, see openseek/engine/cache.py) stores this step's keys and values —
for MLA the normalised latent and the rotated rope key — and, while decoding one token per row, hands back
everything stored so far with the mask to attend with. Without a cache nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openseek.config import ModelConfig
from openseek.kernels import dense_avx512
from openseek.model.linear import Linear, has_kernel
from openseek.model.rope import apply_rope, softmax_scale_multiplier


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale: the order transformers uses, so bf16 results agree."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype is self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and not torch.compiler.is_compiling() and has_kernel()):
            # our kernel (kernels/dense_avx512.cpp): the same rounding in one pass over each row, forward and backward;
            # without autograd, called directly (autograd.Function's bookkeeping costs ~15 µs, a decode step has 17)
            if torch.is_grad_enabled():
                return _RMSNorm.apply(x, self.weight, self.eps)
            return dense_avx512().rms_norm(x.contiguous(), self.weight, self.eps)[0]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = dense_avx512().rms_norm(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = dense_avx512().rms_norm_backward(grad.reshape(rows.shape).contiguous(), rows, weight.contiguous(), rstd)
        return dx.view(grad.shape), dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None


def attend(q, k, v, mask, scale, enable_gqa=False):
    """Attention over a whole sequence (training, scoring, prefill): causal, or under `mask` [B, 1, T, T].

    On the CPU, training and any masked pass go through `attend_grouped` in the activations' own dtype: SDPA's CPU
    backward is several times slower (16 rows × 135 tokens, 8 heads: bf16 37.9 ms against 8.4 ms a layer, float32
    17.8 against 14.8; the demo's model: 25.9 against 4.9 ms in bf16), a seventh of a GRPO update. A masked forward
    takes that path with or without autograd, so the log-probs GRPO scores equal those its loss recomputes.
    Inference without a mask (a prefill) keeps SDPA, which never holds the [T, T] scores."""
    if q.device.type == "cpu" and (mask is not None or torch.is_grad_enabled()):
        if mask is None:
            T = q.shape[-2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
        return attend_grouped(q, k, v, mask, scale, dtype=q.dtype)
    # SDPA's fused kernels need values as wide as keys (MLA's are narrower); zero columns leave the output unchanged
    # and are several times faster than its unfused fallback
    pad = q.shape[-1] - v.shape[-1]
    out = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=enable_gqa,
    )
    return out[..., : v.shape[-1]] if pad > 0 else out


def attend_grouped(q, k, v, mask, scale, dtype=torch.float32):
    """Decode's attention over the cache, written out: q [B, H, T, D] against k, v [B, KV, S, D] with the query
    heads that share a key head stacked as rows of one matmul; mask [B, 1, T, S]. The matmuls run in `dtype` and the
    softmax in float32; decode's arithmetic is float32 whatever the cache holds (a bf16 cache is read, not kept, in
    float32).

    For a few queries against a cache this beats F.scaled_dot_product_attention here (bf16, 16 rows × 300 slots:
    0.3 ms against 3.9–5.8 ms), and unlike SDPA's CPU kernel, which splits the keys among threads when there is one
    query, its result does not depend on the thread count: a seed gives the same samples on 1 or 2 threads.
    """
    B, H, T, D = q.shape
    kv_heads, group = k.shape[1], H // k.shape[1]
    grouped = q.to(dtype).reshape(B, kv_heads, group * T, D)
    scores = torch.matmul(grouped, k.to(dtype).transpose(-1, -2)).view(B, H, T, -1)
    probs = masked_softmax(scores, mask, scale)
    out = torch.matmul(probs.view(B, kv_heads, group * T, -1), v.to(dtype))
    return out.view(B, H, T, v.shape[-1]).to(q.dtype)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · scores) over the last dimension where `mask` [B or 1, 1, T, S] allows, in float32 arithmetic,
    returned in the scores' dtype [B, H, T, S].

    On the CPU (float32 or bf16, eager) our kernel (kernels/dense_avx512.cpp) does it in one pass over each row,
    forward and backward, keeping two floats a row for the backward instead of a float32 copy of the probabilities;
    written out (cast, scale, mask, softmax, cast back) it was a seventh of a GRPO update and a quarter of its
    reference pass (benchmarks/RESULTS.md, round 10). Elsewhere — and under torch.compile, which fuses the ops
    itself — the same arithmetic in PyTorch ops (a row the mask allows nowhere gives NaN there, 0 in the kernel)."""
    if (scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and has_kernel()):
        if torch.is_grad_enabled():
            return _MaskedSoftmax.apply(scores.contiguous(), mask.contiguous(), scale)
        return dense_avx512().masked_softmax(scores.contiguous(), mask.contiguous(), scale)[0]
    probs = (scores.float() * scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs.to(scores.dtype)


class _MaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale):
        probs, stats = dense_avx512().masked_softmax(scores, mask, scale)
        ctx.save_for_backward(scores, mask, stats)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        scores, mask, stats = ctx.saved_tensors
        grad = dense_avx512().masked_softmax_backward(grad_probs.contiguous(), scores, mask, stats, ctx.scale)
        return grad, None, None


def attend_cache(q, k, v, mask, scale):
    """Decode's attention of q [B, H, T, D] over the cached k, v [B, KV, S, D] under mask [B, 1, T, S]: [B, T, H·D].

    On the CPU (inference, float32 or bf16, D a multiple of 16) our kernel (kernels/dense_avx512.cpp) does it in one
    pass per row and key head, in float32 arithmetic as `attend_grouped` does; written out in PyTorch it was a third
    of a 16-row int8 decode step (benchmarks/RESULTS.md, round 9). Elsewhere, `attend_grouped`."""
    B, H, T, D = q.shape
    if (q.device.type == "cpu" and D % 16 == 0 and not torch.is_grad_enabled() and has_kernel()
            and {q.dtype, k.dtype} <= {torch.float32, torch.bfloat16}):
        # under torch.compile, the operator (kernels/__init__.py), which the compiled graph can hold
        ops = torch.ops.openseek if torch.compiler.is_compiling() else dense_avx512()
        return ops.attend_cache(q, k, v, mask, scale)
    return attend_grouped(q, k, v, mask, scale).transpose(1, 2).reshape(B, T, -1)


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.head_dim**-0.5
        self.qkv_proj = None  # q, k and v as one matmul, in a sampling view (quantize.fuse_projections)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            widths = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
            q, k, v = self.qkv_proj(x).split(widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, interleaved=False), apply_rope(k, cos, sin, interleaved=False)
        if cache is not None:
            cache.store(k, v)
            if cache.decoding:
                return self.o_proj(attend_cache(q, *cache.read(), self.scale))
        out = attend(q, k, v, mask, self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """DeepSeek MLA: low-rank q (optional), a shared kv latent, and a decoupled rotary key shared by all heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.interleaved = cfg.kv_lora_rank, cfg.rope_interleave
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.qk_head_dim**-0.5 * softmax_scale_multiplier(cfg)
        self.q_lora_rank = cfg.q_lora_rank
        self.q_kv_a_proj = None  # q_a and kv_a as one matmul, in an int8 model (quantize.fuse_projections)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        if self.q_kv_a_proj is not None:
            q_a, kv_a = self.q_kv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank + self.rope_dim], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            kv_a = self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        if cache is not None and cache.store_projected(kv_a, self.kv_a_layernorm, cos, sin, self.interleaved):
            # decoding on our kernels: the cache normalised, rotated and stored the new tokens' latent and key itself
            return self.o_proj(self.attend_absorbed(q_nope, q_pe, *cache.read()))
        # the per-token cache content: the normalised latent [B, T, r] and the rotated shared key [B, 1, T, rope]
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.view(B, 1, T, self.rope_dim), cos, sin, self.interleaved)
        latent = self.kv_a_layernorm(latent)
        if cache is not None:
            cache.store(latent, k_pe)
            if cache.decoding:
                return self.o_proj(self.attend_absorbed(q_nope, q_pe, *cache.read()))
        k_nope, v = self.kv_b_proj(latent).view(B, T, self.n_heads, -1).transpose(1, 2).split(
            [self.nope_dim, self.v_dim], dim=-1
        )
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend_absorbed(self, q_nope, q_pe, kv, mask):
        """Attention over the cached [latent | rope key] kv [B, 1, S, r + rope] without expanding it to heads.

        With kv_b_proj viewed per head as [W_UK | W_UV], q_nope·k_nope = (q_nope W_UK)·latent and
        P·v = (P·latent) W_UVᵀ, so all heads share one key [latent | k_pe] and one value (the latent):
        multi-query attention in the latent space, at the same softmax scale as the naive path.
        mask [B, 1, T or 1, S] (True = may attend). The arithmetic is float32 whatever the weights and cache hold:
        as in `attend_grouped`, CPU's bf16 batched matmuls at these shapes are slower (120 µs against 38 µs each
        for a deepseek_v3 of hidden 512 at 8 rows, round 4) as well as less exact. On the CPU in inference, our kernel
        does all of it in one call (written out, it was a quarter of a deepseek_v3 decode step at batch 8, round 12).
        """
        B, H, T, _ = q_nope.shape
        weight = self.kv_b_proj.weight
        if (q_nope.device.type == "cpu" and not torch.is_grad_enabled() and has_kernel() and weight.dtype is q_nope.dtype
                and {q_nope.dtype, kv.dtype} <= {torch.float32, torch.bfloat16}
                and self.kv_lora_rank % 16 == 0 and self.rope_dim % 16 == 0):
            # our kernel (kernels/dense_avx512.cpp): the same float32 arithmetic in one call, one pass over the cache
            # per row; under torch.compile, its operator (kernels/__init__.py), which the compiled graph can hold
            ops = torch.ops.openseek if torch.compiler.is_compiling() else dense_avx512()
            return ops.attend_latent(q_nope, q_pe.float(), kv, mask, weight.contiguous(), self.scale)
        w = weight.float().view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        heads_first = q_nope.float().transpose(0, 1).reshape(H, B * T, self.nope_dim)
        q_latent = torch.bmm(heads_first, w[:, : self.nope_dim]).view(H, B, T, -1).transpose(0, 1)  # [B, H, T, r]
        q = torch.cat((q_latent, q_pe.float()), dim=-1).reshape(B, H * T, -1)
        kv = kv.squeeze(1).float()  # [B, S, r + rope]
        scores = torch.bmm(q, kv.transpose(1, 2)).view(B, H, T, -1) * self.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out = torch.bmm(probs.view(B, H * T, -1), kv[..., : self.kv_lora_rank])  # [B, H*T, r]
        out = out.view(B, H, T, -1).transpose(0, 1).reshape(H, B * T, -1)
        out = torch.bmm(out, w[:, self.nope_dim :].transpose(1, 2))  # [H, B*T, v]
        return out.view(H, B, T, self.v_dim).permute(1, 2, 0, 3).reshape(B, T, H * self.v_dim).to(q_nope.dtype)
