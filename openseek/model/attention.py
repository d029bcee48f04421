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
from openseek.kernels import ops
from openseek.model.linear import Linear
from openseek.model.norm import RMSNorm
from openseek.model.rope import softmax_scale_multiplier


def attend(q, k, v, mask, scale, enable_gqa=False):
    """Attention over a whole sequence (training, scoring, prefill): causal, or under `mask` [B, 1, T, T].

    On the CPU, training and any masked pass go through `ops.attend_grouped` in the activations' own dtype: SDPA's CPU
    backward is slower, several times so in bf16 (benchmarks/RESULTS.md, "Round 6 — attention written out for
    training"). A masked forward
    takes that path with or without autograd, so the log-probs GRPO scores equal those its loss recomputes.
    Inference without a mask (a prefill) keeps SDPA, which never holds the [T, T] scores."""
    if q.device.type == "cpu" and (mask is not None or torch.is_grad_enabled()):
        if mask is None:
            T = q.shape[-2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
        return ops.attend_grouped(q, k, v, mask, scale, dtype=q.dtype)
    # SDPA's fused kernels need values as wide as keys (MLA's are narrower); zero columns leave the output unchanged
    # and are several times faster than its unfused fallback
    pad = q.shape[-1] - v.shape[-1]
    out = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=enable_gqa,
    )
    return out[..., : v.shape[-1]] if pad > 0 else out


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
        q, k = ops.rope(q, cos, sin, interleaved=False), ops.rope(k, cos, sin, interleaved=False)
        if cache is not None:
            cache.store(k, v)
            if cache.decoding:
                return self.o_proj(ops.attend_cache(q, *cache.read(), self.scale))
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
        q_pe = ops.rope(q_pe, cos, sin, self.interleaved)
        if cache is not None and cache.store_projected(kv_a, self.kv_a_layernorm, cos, sin, self.interleaved):
            # decoding on our kernels: the cache normalised, rotated and stored the new tokens' latent and key itself
            return self.o_proj(self.attend_absorbed(q_nope, q_pe, *cache.read()))
        # the per-token cache content: the normalised latent [B, T, r] and the rotated shared key [B, 1, T, rope]
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = ops.rope(k_pe.view(B, 1, T, self.rope_dim), cos, sin, self.interleaved)
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
        """Decode's attention over the cached [latent | rope key] kv, with kv_b_proj folded into the query and the
        output instead of expanding the latent to heads (ops.attend_latent), at the naive path's softmax scale."""
        return ops.attend_latent(q_nope, q_pe, kv, mask, self.kv_b_proj.weight, self.scale)
