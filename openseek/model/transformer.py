"""The one model: embedding, decoder blocks (GQA or MLA attention; dense or MoE feed-forward), norm, head, MTP.

Families differ only by `ModelConfig` fields. The model knows nothing of caches' owners, parallelism or serving:
the engine and trainer wrap it from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from openseek.config import ModelConfig
from openseek.model.attention import GQAttention, MLAttention
from openseek.model.linear import Linear
from openseek.model.moe import Experts, MoE, Router, SwiGLU
from openseek.model.norm import RMSNorm
from openseek.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg) if cfg.uses_mla else GQAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """Only the norm: the head itself is the main model's lm_head (checkpoints store a copy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction depth k: predicts token i+k+1 from h_i and the embedding of t_{i+k}."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(cfg)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the head with the embedding when configured (again after `to_empty`, which unties them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation for training from scratch: N(0, initializer_range), norms 1, biases 0."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
        self.rotary.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms'; a quantised model's embedding may hold int8)."""
        return self.norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache=None,
        all_logits: bool = False,
    ):
        """Logits [B, T, V] for input_ids [B, T].

        padding_mask [B, T] (True = real token) lets a batch hold left- or right-padded rows; positions then
        default to counting real tokens only. With `return_hidden`, also the final normed hidden states (MTP input).
        `cache` is the engine's (openseek/engine/cache.py): its per-layer parts store keys/values as they pass, and
        only the last position's logits [B, 1, V] are computed, the only ones generation reads — unless
        `all_logits` (the engine scoring a prompt's tokens in its prefill).
        """
        last_only = cache is not None and not all_logits
        h = self.hidden_states(input_ids, positions, padding_mask, cache, last_only)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      padding_mask: torch.Tensor | None = None, cache=None, last_only: bool = False) -> torch.Tensor:
        """The final normed hidden states [B, T, H] (only the last position with `last_only`): what the head reads.
        Losses over a large vocabulary take these and apply the head a chunk of tokens at a time."""
        B, T = input_ids.shape
        if positions is None:
            if padding_mask is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = None if padding_mask is None else causal_padding_mask(padding_mask)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if cache is None else cache.layers[i])
        return self.norm(h[:, -1:] if last_only else h)

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each MTP depth k (1-based): position i predicts token i+k+1; length T-k.

        Each depth takes the previous depth's hidden state and the embedding of the token k ahead, concatenated
        embedding first (as every released implementation does).
        """
        out = []
        B, T = input_ids.shape
        for depth in range(len(self.mtp)):
            n = T - depth - 1
            positions = torch.arange(n, device=input_ids.device).expand(B, n)
            hidden = self.mtp_hidden(depth, hidden[:, :n], input_ids[:, depth + 1 :], positions)
            out.append(self.mtp_head(depth, hidden))
        return out

    def mtp_hidden(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                   padding_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """MTP depth `depth` (0-based) over [B, T]: position i combines hidden[:, i] (the main model's final normed
        state there, or the previous depth's output) with the embedding of next_ids[:, i], the token after it, and
        returns the layer's output [B, T, H] (`mtp_head` turns it into logits). The engine's speculative decoding
        runs it over its cache, whose layer num_hidden_layers + depth belongs to this depth."""
        layer = self.mtp[depth]
        cos, sin = self.rotary(positions, hidden.dtype)
        mask = None if padding_mask is None else causal_padding_mask(padding_mask)
        e = layer.enorm(self.embed_tokens(next_ids))
        h = layer.eh_proj(torch.cat((e, layer.hnorm(hidden)), dim=-1))
        return layer(h, cos, sin, mask, None if cache is None else cache.layers[self.cfg.num_hidden_layers + depth])

    def mtp_head(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from an MTP depth's output: its own norm, then the main model's head."""
        return self.lm_head(self.mtp[depth].shared_head.norm(hidden))


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Model:
    """A Model on the meta device (no memory), in `dtype` but for the routers and the rotary frequencies, which stay
    float32 (routing decisions as in DeepSeek's and transformers' code; bf16 frequencies would turn position 1000
    into an angle off by radians). Swap modules on it (quantisation), then `allocate` it and fill its weights."""
    with torch.device("meta"):
        model = Model(cfg)
    model.to(dtype)
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.float()
    model.rotary.float()
    return model


def allocate(model: Model, device) -> Model:
    """Give a meta model uninitialised storage on `device`; the tied head and the rotary frequencies are set."""
    model.to_empty(device=device)
    model.tie_weights()
    model.rotary.reset_parameters()
    return model


def causal_padding_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] real-token mask -> [B, 1, T, T] boolean attention mask (causal, pads hidden as keys).

    Each query also sees itself, so a padded query row is never fully masked (which would give NaN).
    """
    T = padding_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=padding_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=padding_mask.device)
    return ((causal & padding_mask[:, None, :].bool()) | eye)[:, None]
