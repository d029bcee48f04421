"""The model's linear layer: nn.Linear, whose product is `ops.linear` (decode's few rows on our matmul, which
streams the weights at the memory bandwidth where PyTorch's kernels do not; everything else on F.linear)."""

from __future__ import annotations

import torch
from torch import nn

from openseek.kernels import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
