"""ModelConfig: one dataclass for every supported family (Llama, Qwen2, DeepSeek-V3).

Families differ by fields, not by code paths keyed on names: MLA is on when `kv_lora_rank` is set, MoE when
`n_routed_experts > 0`, and so on. `from_hf` reads a transformers `config.json` dict (both the release form with
`rope_theta` + `rope_scaling` and the newer `rope_parameters` form); `to_hf` writes one transformers can load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A config.json that openseek cannot build a model from; the message names the field."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None  # dense attention only; defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "yarn" | "linear", ...}; None = default RoPE
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v; MLA: bias on q_a/kv_a (DeepSeek's attention_bias)
    o_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    # MLA (DeepSeek): on when kv_lora_rank is set.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek's checkpoints rotate adjacent pairs of the rope dims
    # DeepSeekMoE: on when n_routed_experts > 0.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    # Multi-token prediction modules, stored as model.layers.{num_hidden_layers + k} in checkpoints.
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: openseek supports {', '.join(sorted(ARCHITECTURES))}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_scaling.get('rope_type')!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.is_moe and self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_k_dense_replace

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each head: all of it for GQA, the decoupled part for MLA."""
        return self.qk_rope_head_dim if self.uses_mla else self.head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.uses_mla else self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- transformers config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from a transformers config dict; unknown fields are ignored, bad ones raise naming the field."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            arch = hf.get("architectures")
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r} (architectures={arch}); "
                f"openseek supports {', '.join(sorted(ARCHITECTURES))}"
            )

        def need(name):
            if hf.get(name) is None:
                raise ConfigError(f"{source}: required field {name!r} is missing")
            return hf[name]

        heads = need("num_attention_heads")
        eos = hf.get("eos_token_id")
        kwargs = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )
        kwargs["rope_theta"], kwargs["rope_scaling"] = _read_rope(hf, source)
        if model_type == "deepseek_v3":
            if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
                raise ConfigError(
                    f"{source}: deepseek_v3 with scoring_func={hf.get('scoring_func')!r}, "
                    f"topk_method={hf.get('topk_method')!r} is not supported (only sigmoid + noaux_tc)"
                )
            if hf.get("moe_layer_freq", 1) != 1:
                raise ConfigError(f"{source}: moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1)")
            kwargs.update(
                qkv_bias=hf.get("attention_bias", False),
                o_bias=hf.get("attention_bias", False),
                q_lora_rank=hf.get("q_lora_rank"),
                kv_lora_rank=need("kv_lora_rank"),
                qk_nope_head_dim=need("qk_nope_head_dim"),
                qk_rope_head_dim=need("qk_rope_head_dim"),
                v_head_dim=need("v_head_dim"),
                rope_interleave=hf.get("rope_interleave", True),
                n_routed_experts=hf.get("n_routed_experts") or 0,
                n_shared_experts=hf.get("n_shared_experts") or 0,
                num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
                moe_intermediate_size=hf.get("moe_intermediate_size") or 0,
                n_group=hf.get("n_group") or 1,
                topk_group=hf.get("topk_group") or 1,
                routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                norm_topk_prob=hf.get("norm_topk_prob", True),
                first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
            )
        else:
            if hf.get("mlp_bias"):
                raise ConfigError(f"{source}: mlp_bias=true is not supported")
            if hf.get("use_sliding_window"):
                raise ConfigError(f"{source}: use_sliding_window=true is not supported")
            bias = hf.get("attention_bias", False)
            kwargs.update(
                head_dim=hf.get("head_dim"),
                qkv_bias=True if model_type == "qwen2" else bias,
                o_bias=False if model_type == "qwen2" else bias,
            )
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None),
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "deepseek_v3":
            hf.update(
                attention_bias=self.qkv_bias,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                rope_interleave=self.rope_interleave,
                n_routed_experts=self.n_routed_experts,
                n_shared_experts=self.n_shared_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                n_group=self.n_group,
                topk_group=self.topk_group,
                topk_method="noaux_tc",
                scoring_func="sigmoid",
                routed_scaling_factor=self.routed_scaling_factor,
                norm_topk_prob=self.norm_topk_prob,
                first_k_dense_replace=self.first_k_dense_replace,
                moe_layer_freq=1,
                num_nextn_predict_layers=self.num_nextn_predict_layers,
            )
        else:
            hf.update(head_dim=self.head_dim, attention_bias=self.o_bias, mlp_bias=False)
            if self.model_type == "qwen2":
                hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        return hf


def _read_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """Normalise both config forms to (theta, scaling-or-None) with scaling keyed by `rope_type`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if params and "rope_theta" in params:
        theta = params["rope_theta"]
    theta = float(theta if theta is not None else 10000.0)
    if not params:
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    scaling["rope_type"] = rope_type
    if "factor" not in scaling:
        raise ConfigError(f"{source}: rope scaling of type {rope_type!r} needs a 'factor'")
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    return theta, scaling
