"""Preallocated caches, owned by the engine and lent to the model for one forward at a time.

Every cache row is one sequence; row b holds its tokens at slots [0, length_b) in order (no padding holes), so a
token's slot is its position. The engine tells the cache what the next forward does:

- `prefill(src, dest)`: the forward runs a right-padded batch of prompts from slot 0; input row `src[i]` is stored
  into cache row `dest[i]` (one prompt can fill several rows: n samples share one prefill). Attention inside the
  forward is the ordinary causal one over the prompt itself.
- `decode(slots, length, rows=None)`: T tokens per row (T = 1 when decoding, more when a prompt continues a cached
  prefix) for the batch's rows [0, B), or for cache rows `rows`; row b's token t goes to slot `slots[b, t]` and
  attends to every slot up to its own among the first `length`: the stored ones and those of this step.

With speculative decoding the cache holds one more layer, after the model's: the MTP module's (engine.py).

`copy_out(row, n)` / `copy_in(row, saved, n)` move a row's first n slots out of and back into the cache (the
engine's prefix cache keeps recently prefilled prompts this way). Layers see only `store(...)` and, while decoding,
`read()`. Two layouts:
- `KVCache` (GQA): keys and values [rows, kv_heads, max_len, head_dim] per layer.
- `LatentCache` (MLA): [rows, max_len, kv_lora_rank + qk_rope_head_dim] per layer holding the normalised latent and
  the rotated rope key side by side — all that absorbed decoding needs.
"""

from __future__ import annotations

import torch

from openseek.config import ModelConfig
from openseek.kernels import ops


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, mtp_layers: int = 0) -> int:
    """Cache bytes one token costs across all layers (and the MTP layers that speculative decoding runs)."""
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.uses_mla else 2 * cfg.num_key_value_heads * cfg.head_dim
    return per_layer * (cfg.num_hidden_layers + mtp_layers) * dtype.itemsize


class Cache:
    """Step state shared by all layers; subclasses own the tensors."""

    def __init__(self, rows: int, max_len: int, device: torch.device):
        self.rows, self.max_len, self.device = rows, max_len, device
        self.decoding = False
        self.src = self.dest = self.slots = self.mask = self.batch_rows = self.step_rows = None
        self.length = 0
        self.layers: list = []
        self.compiled = False  # the engine runs torch.compile'd forwards over this cache

    def prefill(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        self.decoding, self.src, self.dest = False, src, dest

    def decode(self, slots: torch.Tensor, length: int, rows: torch.Tensor | None = None) -> None:
        """slots [B] or [B, T] (device, long): where each row's tokens go; length: slots to attend over
        (max(slots) + 1); rows [B]: the cache rows of the step (default: rows [0, B))."""
        if length > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens per row; step needs {length}")
        slots = slots if slots.dim() == 2 else slots[:, None]
        self.decoding, self.slots, self.length, self.step_rows = True, slots, length, rows
        self.batch_rows = torch.arange(slots.shape[0], device=self.device) if rows is None else rows
        keys = torch.arange(length, device=self.device)
        self.mask = (keys <= slots[:, :, None])[:, None]  # [B, 1, T, length]; shared by every layer
        if self.compiled:  # its length grows every step: compile for any length at once, not first for one
            torch._dynamo.maybe_mark_dynamic(self.mask, 3)

    def _write(self, buffer: torch.Tensor, x: torch.Tensor, slot_dim: int) -> None:
        """Store x (the step's values, slot dimension `slot_dim`) into buffer rows per the current step (in the
        buffer's dtype: under autocast the projections come out in bf16)."""
        x = x.to(buffer.dtype)
        if self.decoding:
            index = [self.batch_rows[:, None]] + [slice(None)] * (slot_dim - 1) + [self.slots]
            buffer[tuple(index)] = x.movedim(slot_dim, 1)
        else:
            T = x.shape[slot_dim]
            buffer.narrow(slot_dim, 0, T).index_copy_(0, self.dest, x.index_select(0, self.src))

    def _read(self, buffer: torch.Tensor, slot_dim: int) -> torch.Tensor:
        """The step's rows of `buffer`, up to `length` slots."""
        rows = slice(0, self.slots.shape[0]) if self.step_rows is None else self.step_rows
        return buffer[(rows,) + (slice(None),) * (slot_dim - 1) + (slice(0, self.length),)]

    def copy_out(self, row: int, n: int) -> list[torch.Tensor]:
        """A copy of slots [0, n) of cache row `row`, one tensor per buffer of every layer."""
        return [buffer[row].narrow(layer.slot_dim - 1, 0, n).clone()
                for layer in self.layers for buffer in layer.buffers()]

    def copy_in(self, row: int, saved: list[torch.Tensor], n: int) -> None:
        """Put the first n slots of `saved` (from `copy_out`) back into cache row `row`."""
        buffers = [(layer.slot_dim - 1, buffer) for layer in self.layers for buffer in layer.buffers()]
        for (dim, buffer), part in zip(buffers, saved, strict=True):
            buffer[row].narrow(dim, 0, n).copy_(part.narrow(dim, 0, n))

    def select_rows(self, keep: torch.Tensor) -> None:
        """Move rows `keep` to the front (in that order), dropping the others from the running batch."""
        for layer in self.layers:
            for buffer in layer.buffers():
                buffer[: len(keep)] = buffer.index_select(0, keep)


class _KVLayer:
    slot_dim = 2

    def __init__(self, cache: KVCache, shape, dtype):
        self.cache = cache
        self.k = torch.zeros(shape, dtype=dtype, device=cache.device)
        self.v = torch.zeros(shape, dtype=dtype, device=cache.device)

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def buffers(self):
        return self.k, self.v

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, kv_heads, T, head_dim] after RoPE."""
        self.cache._write(self.k, k, self.slot_dim)
        self.cache._write(self.v, v, self.slot_dim)

    def read(self):
        """Keys, values [B, kv_heads, length, head_dim] and the boolean mask [B, 1, T, length]."""
        c = self.cache
        return c._read(self.k, self.slot_dim), c._read(self.v, self.slot_dim), c.mask


class KVCache(Cache):
    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 mtp_layers: int = 0):
        super().__init__(rows, max_len, device)
        shape = (rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.layers = [_KVLayer(self, shape, dtype) for _ in range(cfg.num_hidden_layers + mtp_layers)]


class _LatentLayer:
    slot_dim = 1

    def __init__(self, cache: LatentCache, shape, dtype):
        self.cache = cache
        self.kv = torch.zeros(shape, dtype=dtype, device=cache.device)

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def buffers(self):
        return (self.kv,)

    def store(self, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """latent [B, T, kv_lora_rank] (normalised), k_pe [B, 1, T, rope] (rotated)."""
        self.cache._write(self.kv, torch.cat((latent, k_pe.squeeze(1)), dim=-1), self.slot_dim)

    def store_projected(self, kv_a: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool) -> bool:
        """While decoding on the CPU in eager mode: normalise (`norm`, the layer's RMSNorm) and rotate the new tokens'
        latent and rope key straight from kv_a [B, T, r + rope] into the cache, in one call of our kernel, with the
        results `store` would get; False (nothing stored) where the kernel does not apply."""
        c = self.cache
        return c.decoding and ops.store_latent(kv_a, norm.weight, norm.eps, cos, sin, interleaved, self.kv,
                                               c.batch_rows, c.slots)

    def read(self):
        """[latent | k_pe] as one shared key [B, 1, length, r + rope] and the mask [B, 1, T, length]."""
        c = self.cache
        return c._read(self.kv, self.slot_dim)[:, None], c.mask


class LatentCache(Cache):
    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 mtp_layers: int = 0):
        super().__init__(rows, max_len, device)
        shape = (rows, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.layers = [_LatentLayer(self, shape, dtype) for _ in range(cfg.num_hidden_layers + mtp_layers)]


def make_cache(cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
               mtp_layers: int = 0) -> Cache:
    return (LatentCache if cfg.uses_mla else KVCache)(cfg, rows, max_len, dtype, device, mtp_layers)
