"""Where a stage runs and what that hardware does natively: one rule for every command's `--device` (train, GRPO,
sample, eval, chat, serve, demo) and for choosing bf16."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


def resolve_device(spec: str | None = "auto") -> torch.device:
    """`auto` (or None): this process's current GPU when CUDA is available, else the CPU; anything else as given
    (`cpu`, `cuda`, `cuda:1`). A CUDA device asked for on a machine without one is refused with the reason."""
    if spec in (None, "auto"):
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (from /proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


# oneDNN (PyTorch's CPU matmuls) levels that multiply bf16 in hardware; `ONEDNN_MAX_CPU_ISA` caps oneDNN below them
# on purpose (for instance to run as an AVX2-only CPU would: docs/kernels.md), and then bf16 matmuls run emulated.
ONEDNN_BF16_LEVELS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                      "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"}


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: a CUDA GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX
    whose oneDNN is not capped below them by `ONEDNN_MAX_CPU_ISA`. Elsewhere bf16 is emulated, far slower than
    float32 (docs/kernels.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "DEFAULT").upper()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and cap in ONEDNN_BF16_LEVELS


# Below this width a CPU step is mostly per-op overhead, which bf16 autocast's casts add to: the demo's hidden-96
# model trained 3.2x and rolled out 1.9x slower in bf16, the 31M hidden-512 one 1.3x and 1.6x faster
# (benchmarks/RESULTS.md, round 3).
BF16_MIN_HIDDEN_ON_CPU = 256


def resolve_precision(precision: str, device: torch.device, hidden_size: int | None = None) -> str:
    """`auto` -> "bf16" where the hardware runs it natively (on a CPU, for models at least BF16_MIN_HIDDEN_ON_CPU
    wide), else "float32"; "bf16" where the hardware does not -> an error."""
    if precision not in ("auto", "float32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected auto, float32 or bf16")
    if precision == "auto":
        narrow = device.type == "cpu" and hidden_size is not None and hidden_size < BF16_MIN_HIDDEN_ON_CPU
        return "bf16" if native_bf16(device) and not narrow else "float32"
    if precision == "bf16" and not native_bf16(device):
        raise ValueError(f"--precision bf16: this {device.type} has no native bf16 matmuls (CPU flags avx512_bf16 or "
                         "amx_bf16; a bf16-capable GPU), so bf16 would run emulated, slower than float32; use "
                         "--precision float32 or auto")
    return precision
