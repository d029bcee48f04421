"""What is applied to the model from outside it, in this order: compile, then data parallelism, then optimizers.

The model code knows nothing of any of it (torchtitan's lesson): the Trainer calls these three functions once,
after the model is on its device and before the first step.

1. `compile_blocks`: `torch.compile` each transformer block (and MTP block) on GPU. Per block rather than the whole
   model, so one compiled graph serves every layer and DDP/FSDP wrap compiled blocks as they are.
2. `parallelize`: under `torchrun` with more than one process, FSDP2 (`fully_shard` per block, then the root) or
   DDP-style replicas (rank 0's weights broadcast; gradients averaged by the Trainer with one flat all-reduce).
   One process takes the same code path with nothing to do.
3. `build_optimizers`: fused AdamW for everything, or Muon for hidden matrices with AdamW for the rest.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from openseek.model import Model
from openseek.train.muon import Muon


def compile_blocks(model: Model, device: torch.device) -> None:
    """Compile each block in place (GPU only; on a CPU it says so and leaves the blocks eager)."""
    if device.type != "cuda":
        # measured (benchmarks/RESULTS.md, round 8): on the 31M GRPO benchmark model a compiled update was no faster
        # (1.67-2.25 s against 1.77 s) and recompiled for new sequence lengths at 16-31 s a time
        print("--compile: the blocks stay eager on the CPU (compiled, they measured no faster in a GRPO update and "
              "recompiled for new sequence lengths)", file=sys.stderr)
        return
    for block in [*model.layers, *model.mtp]:
        block.compile()


def parallelize(model: Model, parallel: str, device: torch.device, world_size: int) -> Model:
    """FSDP2 or replicas across `world_size` processes; the model itself when there is one process."""
    if world_size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(device.type, (world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        # MTP layers use their norms and projection outside their own forward, so they stay in the root unit,
        # which is gathered for forward and for mtp_logits alike.
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "mtp_logits")
        return model
    for tensor in [*model.parameters(), *model.buffers()]:  # every replica starts from rank 0's weights
        dist.broadcast(tensor.data, src=0)
    return model


def build_optimizers(model: torch.nn.Module, cfg, world_size: int) -> list[torch.optim.Optimizer]:
    """AdamW (fused kernel, CPU and GPU): matrices decay, vectors (norms, biases) do not. With Muon, the hidden
    matrices (experts included, one matrix per expert) go to Muon and embeddings, head and vectors stay with AdamW.
    Each group remembers its `peak_lr`, which the schedule scales."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = []
    if cfg.optimizer == "muon":
        if world_size > 1 and cfg.parallel == "fsdp":
            raise ValueError("optimizer=muon orthogonalises whole matrices; use --parallel ddp, not fsdp")
        muon = [p for n, p in named if p.dim() >= 2 and "embed_tokens" not in n and "lm_head" not in n]
    rest = [p for _, p in named if not any(p is m for m in muon)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # An empty group (LoRA: every adapter factor is a matrix) would not survive a checkpoint round trip.
    groups = [g for g in groups if g["params"]]
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)]
    if muon:
        optimizers.append(Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers
