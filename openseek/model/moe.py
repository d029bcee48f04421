"""DeepSeekMoE: sigmoid router with a selection-only bias, group-limited top-k, grouped expert dispatch.

Tokens are sorted by expert and each projection is one grouped matmul over all experts' token segments, so the
cost follows the tokens actually routed, never experts × tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openseek.config import ModelConfig
from openseek.kernels import ops
from openseek.model.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.gate_up_proj = None  # gate and up as one matmul, in a sampling view (quantize.fuse_projections)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(ops.swiglu(gate, up))
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Scores every expert with a sigmoid; the correction bias only decides *which* experts, never their weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scaling, self.normalise = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Moved by the trainer's auxiliary-loss-free balancing, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (scores [N, E], expert ids [N, k], weights [N, k]); routing math in float32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, ids, weights * self.scaling

    def dispatch(self, x: torch.Tensor, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> the chosen (token, expert) pairs sorted by expert: token [N·(k + always_on)], ends [E +
        always_on] (cumulative counts), weight float32. `forward`'s scores, choice and weights, then `Experts`'s
        sort, in one call of our kernel (ops.route_experts: written out they were some twenty small ops a
        layer); CPU inference with the router in float32 (as `load` keeps it). `always_on` experts after the routed
        ones take every token with weight 1."""
        return ops.route_experts(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group,
                                 self.topk_group, self.normalise, self.scaling, always_on)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by group, w [G, out, in] (each group's weight in nn.Linear's layout), ends [G] cumulative row
    counts -> [N, out]: ops.grouped_linear (one grouped GEMM, or decode's few rows on our kernel, skipping empty
    groups). `w` may also be an int8 stack (quantize.GroupedInt8, a module), which multiplies by itself."""
    if isinstance(w, nn.Module):
        return w(x, ends)
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm ignores autocast: cast as F.linear would be
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return ops.grouped_linear(x, w, ends)


class Experts(nn.Module):
    """All routed experts' weights as stacked tensors: gate and up fused, [E, 2I, H]; down [E, H, I] (each an int8
    stack, quantize.GroupedInt8, in a model loaded with `quantize`). An int8 model may also carry its shared expert
    as one more stacked expert that every token uses with weight 1 (`always_on`; quantize.fold_shared_experts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.always_on = E, 0
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def decode(self, x: torch.Tensor, token: torch.Tensor, ends: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Inference on the CPU with our kernels, from `Router.dispatch`'s (token, ends, weight) sorted by expert."""
        if isinstance(self.gate_up_proj, nn.Module):  # int8 stacks (quantize.GroupedInt8): one call for it all
            return self.gate_up_proj.experts(x, token, ends, weights, self.down_proj)
        gate, up = grouped_matmul(x.index_select(0, token), self.gate_up_proj, ends).chunk(2, dim=-1)
        out = grouped_matmul(ops.swiglu(gate, up), self.down_proj, ends)
        return ops.combine_experts(out, token, weights, x.shape[0]).to(x.dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        decoding_on_cpu = not torch.is_grad_enabled() and x.device.type == "cpu"
        if torch.compiler.is_compiling() and decoding_on_cpu and not ops.has("dense"):
            # a compiled decode step (Engine(compile=True)) without our kernel runs the experts eagerly: how many
            # rows each expert gets is data, which `grouped_matmul` then reads on the host to skip idle experts
            return self._eager_forward(x, ids, weights)
        return self._forward(x, ids, weights)

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.always_on:  # the folded shared expert(s): every token, weight 1
            extra = torch.arange(self.num_experts, self.num_experts + self.always_on, device=ids.device)
            ids = torch.cat((ids, extra.expand(ids.shape[0], -1)), dim=1)
            weights = torch.cat((weights, weights.new_ones(ids.shape[0], self.always_on)), dim=1)
        N, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        # rows per expert, as bincount(flat, minlength=E) counts them, in a shape torch.compile knows ahead
        ends = flat.new_zeros(self.num_experts + self.always_on).index_add_(0, flat, torch.ones_like(flat)).cumsum(0)
        # index_select, not x[token]: its backward is index_add_, where indexing's (index_put_ accumulating) took
        # a twentieth of the demo's pretraining step
        gate, up = grouped_matmul(x.index_select(0, token), self.gate_up_proj, ends).chunk(2, dim=-1)
        out = grouped_matmul(ops.swiglu(gate, up), self.down_proj, ends)
        out = out * weights.flatten().index_select(0, order)[:, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))

    _eager_forward = torch.compiler.disable(_forward)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # inference on the CPU: routing, sort and weighted sum on our kernels, unless a hook watches the router
        # (train/routing.py's RoutingLog reads its forward's output)
        if (x.device.type == "cpu" and not torch.is_grad_enabled() and ops.has("dense") and not self.gate._forward_hooks
                and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] % 16 == 0
                and self.gate.weight.dtype is self.gate.e_score_correction_bias.dtype is torch.float32):
            y = self.experts.decode(flat, *self.gate.dispatch(flat, self.experts.always_on)).view(shape)
        else:
            _, ids, weights = self.gate(flat)
            y = self.experts(flat, ids, weights).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
