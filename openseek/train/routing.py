"""What the routers chose, seen from outside the model: forward hooks that the trainer or a loss registers.

The model keeps nothing "for the trainer": a `RoutingLog` hooks every `Router` for as long as it is open and
records each forward's scores and chosen experts. The Trainer opens one around each micro-batch to count expert
loads (auxiliary-loss-free balancing); `NextTokenLoss` opens one around its forward for the sequence-wise balance
loss, whose gradient flows through the recorded scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openseek.model.moe import Router


@dataclass
class Routing:
    router: Router
    scores: torch.Tensor  # [N, E] sigmoid scores (with their graph)
    ids: torch.Tensor  # [N, k] chosen experts


class RoutingLog:
    """`with RoutingLog(model) as log:` … `log.records` holds one `Routing` per router call made inside."""

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.records: list[Routing] = []
        self._handles = []

    def __enter__(self) -> RoutingLog:
        for router in self.routers:
            self._handles.append(router.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, router, inputs, output) -> None:
        scores, ids, _ = output
        self.records.append(Routing(router, scores, ids))

    def expert_loads(self) -> dict[Router, torch.Tensor]:
        """Tokens routed to each expert, per router, over every recorded call (float, for all-reduce)."""
        loads = {}
        for r in self.records:
            count = torch.bincount(r.ids.flatten(), minlength=r.scores.shape[-1]).float()
            loads[r.router] = loads[r.router] + count if r.router in loads else count
        return loads


def sequence_balance_loss(records: list[Routing], batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, summed over the recorded router calls.

    Per sequence: f_i = E / (K·T) × tokens routed to expert i, P_i = mean over the sequence of expert i's share of
    the token's scores; loss = Σ_i f_i·P_i (1 when perfectly balanced), averaged over the batch's sequences.
    """
    total = torch.zeros(())
    for r in records:
        experts, k = r.scores.shape[-1], r.ids.shape[-1]
        shares = (r.scores / r.scores.sum(-1, keepdim=True)).view(batch_size, -1, experts)
        ids = r.ids.view(batch_size, -1)
        counts = torch.zeros_like(shares[:, 0]).scatter_add_(1, ids, torch.ones_like(ids, dtype=shares.dtype))
        f = counts * experts / (k * shares.shape[1])
        total = total + (f * shares.mean(1)).sum(-1).mean()
    return total
