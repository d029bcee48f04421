"""Many LoRA adapters on one base model at once, chosen per row of a batch (`openseek serve --adapter NAME=DIR`).

    adapters = load_adapters(model, {"sql": "out/sql-adapter", "chat": "out/chat-adapter"})   # PEFT directories
    adapters.index("sql")           # 1 (0 is the base model itself)
    adapters.select([0, 1, 2, 1])   # the next forward's rows: base, sql, chat, sql

Each adapted linear layer becomes a `MultiLoRALinear`: the frozen base layer and every adapter's factors stacked,
index 0 all zeros (the base). A forward adds to the base layer's output, row by row, that row's own low-rank
update, scaling · (x @ Aᵀ) @ Bᵀ with its adapter's A and B gathered per row (batched matrix products): one batch
serves requests for different adapters and for the base together, and the weights are never merged. Rows whose
adapter leaves a layer alone, and batches of base rows only, add nothing (the base rows then cost nothing extra).
Adapters of different ranks are padded to the largest with zeros, which add nothing either. As in lora.py, the
factors are float32 whatever the base's precision.

The Engine sets the rows (`AdapterSet.select`) before every forward it runs (engine/batch.py), so the model code
never knows; `adapter_set(model)` finds the set. The rows are read on the host at each forward, which torch.compile
would bake into its graphs, so a model with several adapters runs eagerly. kv_b_proj and lm_head cannot take
per-row adapters: MLA's absorbed decode reads kv_b_proj's weight as one matrix for the whole batch, and the engine
applies the head to scored prompts outside the batch's forwards (load such an adapter alone, or merge it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from openseek.lora import AdapterError, LoRALinear, _swap, read_adapter

BASE = 0  # the adapter index of the base model itself


class AdapterSet:
    """The adapters loaded on one model, by name (adapter i + 1 is names[i]; 0 is the base), and which one each row
    of the forwards uses until the next `select` (`rows`: a device tensor [rows], or None when every row is the
    base's)."""

    def __init__(self, names: list[str], device):
        self.names, self.device = list(names), device
        self.rows: torch.Tensor | None = None
        self._selected: list[int] = []

    def index(self, name: str) -> int:
        return self.names.index(name) + 1

    def check(self, adapter) -> None:
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter <= len(self.names):
            raise ValueError(f"adapter={adapter!r}: this model has adapters 1..{len(self.names)} "
                             f"({', '.join(self.names)}) and 0, the base")

    def select(self, adapters: list[int]) -> None:
        """The adapter of each row of the next forward (as many as its batch has rows)."""
        if adapters == self._selected:
            return
        self._selected = list(adapters)
        self.rows = None if not any(adapters) else torch.tensor(adapters, dtype=torch.long, device=self.device)


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus, per row, the low-rank update of that row's adapter (see the module docstring).
    lora_A [adapters + 1, r, in] and lora_B [adapters + 1, out, r] (float32), scaling [adapters + 1]."""

    def __init__(self, base: nn.Module, adapters: AdapterSet, factors: list):
        """factors: per adapter (in the set's order), (A [r, in], B [out, r], scaling), or None where it leaves
        this layer alone."""
        super().__init__()
        self.base_layer, self.adapters = base.requires_grad_(False), adapters
        self.in_features, self.out_features = base.in_features, base.out_features
        rank = max(a.shape[0] for a, _, _ in filter(None, factors))
        device = base.weight.device
        self.register_buffer("lora_A", torch.zeros(len(factors) + 1, rank, self.in_features, device=device))
        self.register_buffer("lora_B", torch.zeros(len(factors) + 1, self.out_features, rank, device=device))
        self.register_buffer("scaling", torch.zeros(len(factors) + 1, device=device))
        for i, found in enumerate(factors, start=1):
            if found is not None:
                a, b, scaling = found
                self.lora_A[i, : a.shape[0]] = a
                self.lora_B[i, :, : b.shape[1]] = b
                self.scaling[i] = scaling

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = self.adapters.rows
        if rows is None:
            return y
        h = x.reshape(len(rows), -1, self.in_features).to(torch.float32)  # row-major: [rows, tokens, in]
        update = torch.bmm(torch.bmm(h, self.lora_A[rows].transpose(1, 2)), self.lora_B[rows].transpose(1, 2))
        return y + (update * self.scaling[rows][:, None, None]).reshape(y.shape).to(y.dtype)


def load_adapters(model: nn.Module, directories: dict[str, str | Path]) -> AdapterSet:
    """Put the PEFT LoRA adapters {name: directory} on `model`, each chosen per row (see the module docstring).
    Every adapter is checked against the model before anything changes; the model must carry no adapter yet."""
    if not directories:
        raise ValueError("load_adapters needs at least one {name: directory}")
    if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):
        raise AdapterError("the model already carries adapters; load the several adapters onto a plain base")
    plans = {}
    for name, directory in directories.items():
        config, plan = read_adapter(model, directory)
        rslora = bool(config.get("use_rslora"))
        plans[name] = {module_name: (module, factors["A"], factors["B"],
                                     alpha / (math.sqrt(rank) if rslora else rank))
                       for module_name, module, factors, rank, alpha in plan}
        if "lm_head" in plans[name]:
            raise AdapterError(f"adapter {name!r} ({directory}) adapts lm_head, which the engine also applies "
                               "outside the batch's forwards (scoring prompts): it cannot differ per row there. "
                               "Serve that adapter alone, or merge it (`openseek merge`)")
        if any(module_name.endswith("kv_b_proj") for module_name in plans[name]):
            raise AdapterError(f"adapter {name!r} ({directory}) adapts kv_b_proj, which MLA's absorbed decode "
                               "reads as one matrix for the whole batch: it cannot differ per row. Serve that "
                               "adapter alone, or merge it (`openseek merge`)")
    adapters = AdapterSet(list(directories), model.device)
    for module_name in sorted({m for plan in plans.values() for m in plan}):
        base = next(plan[module_name][0] for plan in plans.values() if module_name in plan)
        factors = [plan[module_name][1:] if module_name in plan else None for plan in plans.values()]
        _swap(model, module_name, MultiLoRALinear(base, adapters, factors))
    return adapters


def adapter_set(model: nn.Module) -> AdapterSet | None:
    """The AdapterSet `load_adapters` put on `model`, or None."""
    return next((m.adapters for m in model.modules() if isinstance(m, MultiLoRALinear)), None)
