"""The model's linear layer: nn.Linear, with decode's few-row products on a kernel of our own.

A decode step multiplies a few rows of activations by every weight, so it should stream the weights at the memory
bandwidth. PyTorch's kernels do not at those shapes: over a whole Qwen2.5-0.5B's weights on this project's 2-core
Zen 5 (benchmarks/RESULTS.md, round 4), MKL's float32 sgemm streamed 14–16 GB/s at one row and 7–11 GB/s at 2–8,
oneDNN's bf16 matmul 25 GB/s at 1–2 rows; our kernel (openseek/kernels/dense_avx512.cpp, the same layout, float32
accumulation) 44–59 GB/s in float32 and 33–40 GB/s in bf16 at one row, and stays ahead up to `KERNEL_ROWS` rows. It
takes over only there: inference (no autograd), float32 or bf16 weights and activations of one dtype on the CPU;
everything else — training, prefill, GPUs — is `F.linear`. In float32 its sums run in another order than MKL's
(both exact to float32 rounding), so logits differ from F.linear's in the last bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openseek.kernels import dense_avx512

# measured (round 4): ahead of oneDNN's bf16 up to 4 rows, level at 8; ahead of MKL's sgemm up to 16 (11 GB/s
# against 8 there)
KERNEL_ROWS = {torch.bfloat16: 4, torch.float32: 16}


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), on our kernel where it wins (see the module docstring)."""
    rows = KERNEL_ROWS.get(w.dtype, 0)
    if (x.dtype is w.dtype and x.numel() <= rows * w.shape[1] and x.device.type == "cpu"
            and not torch.is_grad_enabled() and w.is_contiguous() and has_kernel()):
        # under torch.compile, the operator (kernels/__init__.py), which the compiled graph can hold
        ops = torch.ops.openseek if torch.compiler.is_compiling() else dense_avx512()
        matmul = ops.linear_bf16 if w.dtype is torch.bfloat16 else ops.linear_fp32
        y = matmul(x.reshape(-1, w.shape[1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


@torch.compiler.assume_constant_result  # torch.compile reads it once rather than tracing the build and its messages
def has_kernel() -> bool:
    """Whether our decode matmul kernel runs on this machine."""
    return dense_avx512() is not None


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
