"""LoRA adapters: applied to the model from outside it as a module swap, read and written in PEFT's format.

    apply_lora(model, LoRAConfig(rank=16))       # freeze the base; wrap the chosen linear layers
    with adapters_disabled(model): ...           # the base model itself (GRPO's reference policy)
    save_adapter(model, "out/adapter")           # adapter_config.json + adapter_model.safetensors, as PEFT writes
    load_adapter(model, "some/peft-adapter")     # made by PEFT or by us; also `openseek.load(base, adapter=DIR)`
    merge_adapters(model)                        # fold W + (α/r)·B·A back into plain linear layers

A `LoRALinear` holds the frozen base layer and the two factors: y = base(x) + (α/r)·B(A(dropout(x))). The model
code never knows: the swap replaces linear layers in place, so the Trainer, the Engine (which generates
with the very module the Trainer updates) and checkpoints see one module. Adapters are float32 whatever the base's
precision (they are small, and their updates are too fine for bf16); their input is cast to float32 and their
output back to the base's dtype, as PEFT does.

PEFT's format, which vLLM, TRL and transformers read: tensors `base_model.model.<module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] under the transformers module names (`model.layers.0.self_attn.q_proj`), and an
`adapter_config.json` with `r`, `lora_alpha`, `target_modules`, `base_model_name_or_path`. A target names a module
by its last parts ("q_proj" matches every `....q_proj`), as PEFT does; "all-linear" is every linear layer of the
decoder blocks (not the head). DeepSeek-V3's MLA projections (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj,
o_proj) and its shared experts' gate/up/down_proj are linear layers like any other. Routed experts are stacked
[E, out, in] parameters, not linear layers: LoRA on them is not implemented and asking for it is refused. MTP
modules are not adapted (transformers does not build them, so PEFT adapters never cover them).

`openseek merge --model BASE --adapter DIR --output OUT` (merge.py) writes the merged model as a plain HF checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from openseek.quantize import Int4Linear, Int8Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# What an adapter may wrap: plain linear layers, and weight-only quantised ones for serving (`load(quantize=...)`).
LINEAR = (nn.Linear, Int8Linear, Int4Linear)
_TENSOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# adapter_config.json settings PEFT can write that change what an adapter computes and that openseek does not
# implement: loading such an adapter is refused rather than silently computing something else.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None}


class AdapterError(ValueError):
    """An adapter that does not fit the model or is not one openseek reads; the message names the tensor or field."""


@dataclass
class LoRAConfig:
    rank: int
    alpha: float | None = None  # scaling = alpha / rank; None = 2 × rank (scaling 2)
    dropout: float = 0.0
    targets: str | list[str] = ALL_LINEAR  # module names (PEFT's suffix match), or "all-linear"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora_rank={self.rank!r}: a LoRA rank must be a whole number of at least 1 (leave "
                             "--lora-rank out to train every parameter)")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not self.alpha > 0:
            raise ValueError(f"lora_alpha={self.alpha}: must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("lora_targets is empty: name modules (q_proj,v_proj,...) or use all-linear")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + scaling · B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        with torch.no_grad():  # PEFT's default start: A random (Kaiming uniform), B zero, so the update starts at 0
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scaling·B·A in the base's dtype. MLA's absorbed decode reads `kv_b_proj.weight`
        as a matrix, so an adapted kv_b_proj must answer with the adapted one (kv_b_proj is never quantised)."""
        w = self.base_layer.weight
        if not self.enabled:
            return w
        return (w.float() + self.scaling * self.lora_B.weight @ self.lora_A.weight).to(w.dtype)

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)


# ---- which modules: names and targets --------------------------------------------------------------------------


def hf_module_name(name: str) -> str:
    """openseek module name -> the transformers one PEFT's tensor names use (`layers.0...` -> `model.layers.0...`)."""
    return name if name == "lm_head" else f"model.{name}"


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{transformers module name: module} of every linear layer LoRA may wrap: those of the decoder blocks and the
    head (MTP modules and the routed experts' stacked weights are not linear layers transformers builds)."""
    out = {}
    for name, module in model.named_modules():
        inside_adapter = any(part in ("lora_A", "lora_B", "base_layer") for part in name.split("."))
        in_blocks = name.startswith("layers.") or name == "lm_head"
        if isinstance(module, LoRALinear) or (isinstance(module, LINEAR) and in_blocks and not inside_adapter):
            out[hf_module_name(name)] = module
    return out


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def select_targets(model: nn.Module, targets) -> list[str]:
    """The transformers names of the modules `targets` picks; a target matching nothing is an error that lists
    what could be matched."""
    candidates = adaptable_modules(model)
    if targets == ALL_LINEAR:
        return [n for n in candidates if n != "lm_head"]
    chosen = []
    for target in targets:
        found = [n for n in candidates if _matches(target, n)]
        if not found:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            hint = ""
            if "experts" in target and "shared_experts" not in target or target in ("gate_up_proj", "gate"):
                hint = (" (routed experts are stacked [E, out, in] weights and the router is not a projection: "
                        "LoRA on them is not implemented; shared_experts.gate_proj/up_proj/down_proj are linear "
                        "layers)")
            raise AdapterError(f"LoRA target {target!r} matches no linear layer of this {model.cfg.model_type} "
                               f"model{hint}; the layers that can be adapted are: {', '.join(leaves)}")
        chosen += [n for n in found if n not in chosen]
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{transformers module name: LoRALinear} of an adapted model."""
    return {hf_module_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _swap(model: nn.Module, hf_name: str, new: nn.Module) -> None:
    local = hf_name if hf_name == "lm_head" else hf_name.removeprefix("model.")
    parent, _, leaf = local.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers with fresh adapters (B = 0: the
    model computes exactly what it did). Returns the transformers names of the adapted modules."""
    chosen = select_targets(model, cfg.targets)
    model.requires_grad_(False)
    modules = adaptable_modules(model)
    for name in chosen:
        if isinstance(modules[name], LoRALinear):
            raise AdapterError(f"{name} already has an adapter")
        _swap(model, name, LoRALinear(modules[name], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, the model computes as its frozen base (no second copy of the weights); a model without adapters is
    left as it is."""
    modules = list(lora_modules(model).values())
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base linear layer holding W + scaling·B·A (computed in float32)."""
    for name, module in lora_modules(model).items():
        base = module.base_layer
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"{name}: the base layer is {type(base).__name__}; merge into a float base (load it "
                               "without quantize)")
        with torch.no_grad():
            base.weight.copy_(module.weight)
        _swap(model, name, base)
    return model


# ---- PEFT's format ----------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's tensor names, on the CPU."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
    return out


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT's `target_modules` for exactly the adapted modules: their last names when those pick nothing more
    (the usual case, and what vLLM expects), else the full module names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    picked = [n for n in adaptable_modules(model) if any(_matches(leaf, n) for leaf in leaves)]
    return leaves if sorted(picked) == sorted(adapted) else sorted(adapted)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for a causal LM (settings left at PEFT's defaults are written too,
    so every reader sees them)."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA adapters to save")
    first = next(iter(modules.values()))
    uneven = [n for n, m in modules.items()
              if (m.rank, m.alpha, m.use_rslora) != (first.rank, first.alpha, first.use_rslora)]
    if uneven:  # PEFT would need rank_pattern/alpha_pattern; openseek only ever makes uniform adapters
        raise AdapterError(f"{uneven[0]}: rank/alpha differ from {next(iter(modules))}'s; only uniform adapters "
                           "are saved")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "use_rslora": first.use_rslora,
        "target_modules": _target_modules(model, list(modules)), "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> Path:
    """Write `directory/adapter_config.json` and `adapter_model.safetensors` (in a temporary directory first, so
    an interrupted save leaves no half-written adapter). `base_model_name_or_path` defaults to where the base was
    loaded from (`openseek.load` records it)."""
    directory = Path(directory)
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    config = adapter_config(model, base)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(adapter_state_dict(model), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        directory.mkdir(exist_ok=True)
        for file in tmp.iterdir():
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a PEFT adapter directory holds {ADAPTER_CONFIG} and "
                                f"{ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type={config['peft_type']!r}; only LORA adapters are read")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported by openseek's LoRA (expected "
                               f"{default!r})")
    if "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{path}: needs 'r' and 'lora_alpha'")
    return config


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(model: nn.Module, directory) -> tuple[dict, list]:
    """A PEFT LoRA adapter checked against `model` (every tensor's name and shape; nothing changes yet): its
    adapter_config.json and, per adapted module, (transformers name, module, {"A": tensor, "B": tensor}, rank,
    lora_alpha)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = " (adapter_model.bin is a pickle file and is never read; convert it to safetensors)" if (
            directory / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights}: missing{pickled}")
    tensors = load_file(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR.match(key)
        if not match:
            raise AdapterError(f"{key} (in {weights.name}): not a LoRA factor of a linear layer (expected "
                               f"{PEFT_PREFIX}<module>.lora_A.weight / lora_B.weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    candidates = adaptable_modules(model)
    plan = []
    for name, factors in pairs.items():
        if name not in candidates:
            raise AdapterError(f"{PEFT_PREFIX}{name}.lora_A.weight (in {weights.name}): this "
                               f"{model.cfg.model_type} model has no linear layer {name}")
        if set(factors) != {"A", "B"}:
            missing = ({"A", "B"} - set(factors)).pop()
            raise AdapterError(f"{PEFT_PREFIX}{name}.lora_{missing}.weight: missing from {weights.name}")
        module = candidates[name]
        rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        for factor, want in (("A", (rank, module.in_features)), ("B", (module.out_features, rank))):
            found = tuple(factors[factor].shape)
            if found != want:
                raise AdapterError(
                    f"{PEFT_PREFIX}{name}.lora_{factor}.weight (in {weights.name}): shape {list(found)}, but "
                    f"{name} is a [{module.out_features}, {module.in_features}] linear layer and r={rank}: "
                    f"expected {list(want)}")
        plan.append((name, module, factors, rank, alpha))
    return config, plan


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter into `model`: modules without an adapter are wrapped, ones that have one (a run
    resuming from its checkpoint) get the saved values. Every name and shape is checked against the model before
    anything changes; a model that already has adapters must find each of them in the file. Afterwards the base is
    frozen and the adapters trainable, as after `apply_lora`."""
    config, plan = read_adapter(model, directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    for name, module, _, rank, alpha in plan:
        if isinstance(module, LoRALinear) and (module.rank, module.alpha) != (rank, alpha):
            raise AdapterError(f"{name}: the adapter has r={rank}, lora_alpha={alpha}; the model's has "
                               f"r={module.rank}, lora_alpha={module.alpha}")
    covered = {name for name, *_ in plan}
    uncovered = [n for n in lora_modules(model) if n not in covered]
    if uncovered:
        raise AdapterError(f"{weights}: no tensors for {uncovered[0]}, which has an adapter in the model")
    for name, module, factors, rank, alpha in plan:
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, rank, alpha, config.get("lora_dropout", 0.0) or 0.0,
                                bool(config.get("use_rslora")))
            _swap(model, name, module)
        with torch.no_grad():
            module.lora_A.weight.copy_(factors["A"])
            module.lora_B.weight.copy_(factors["B"])
    for name, p in model.named_parameters():  # as after apply_lora: the base frozen, the adapters trainable
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model
