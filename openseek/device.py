"""Where a stage runs: one rule for every command's `--device` (train, GRPO, sample, eval, chat, serve, demo)."""

from __future__ import annotations

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
