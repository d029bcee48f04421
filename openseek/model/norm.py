"""RMSNorm, the one normalisation of every family (blocks, final norm, MLA's latents, MTP)."""

from __future__ import annotations

import torch
from torch import nn

from openseek.kernels import ops


class RMSNorm(nn.Module):
    """RMSNorm in transformers' order of roundings (ops.rms_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
