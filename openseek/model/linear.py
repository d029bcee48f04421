"""The model's linear layer: nn.Linear, with decode's bf16 matrix-vector products on a kernel of our own.

A bf16 decode step multiplies one row of activations by every weight, so it should stream the weights at the memory
bandwidth. Over a whole 0.5B model's weights on this project's 2-core VM (~21 GB/s), oneDNN's bf16 matvec streamed
9.2 GB/s and our kernel (openseek/kernels/dense_avx512.cpp, same layout, float32 accumulation) 16.2 GB/s
(benchmarks/RESULTS.md, round 3). It takes over only where it wins: inference (no autograd), bf16 weights and
activations on the CPU, at most `KERNEL_ROWS` rows; everything else — training, prefill, float32, GPUs — is
`F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openseek.kernels import dense_avx512

KERNEL_ROWS = 2  # measured: ahead of oneDNN at 1–2 rows, behind it from 4


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and x.numel() <= KERNEL_ROWS * self.in_features
                and w.is_contiguous() and (kernel := dense_avx512()) is not None):
            y = kernel.linear_bf16(x.reshape(-1, self.in_features).contiguous(), w)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)
