"""Muon: momentum whose update is orthogonalised before it is applied (for the hidden weight matrices only)."""

from __future__ import annotations

import torch


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum whose update is orthogonalised (Newton–Schulz) before it is applied.

    For weight matrices only; 3-D expert stacks [E, out, in] are handled one matrix per expert. The step is scaled by
    sqrt(max(1, out/in)) so tall and wide matrices move alike; weight decay is decoupled, as in AdamW.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalise(p.grad.lerp(buffer, group["momentum"]))
                rows, cols = p.shape[-2:]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ (batched over leading dims): a quintic Newton–Schulz iteration tuned to push
    every singular value towards 1 quickly (it lands in about [0.7, 1.2], which is all Muon needs)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.transpose(-2, -1)
