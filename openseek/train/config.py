"""TrainConfig: the settings of every training stage, its learning-rate schedule, and its flags (one per field)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from openseek.flags import add_config_arguments, config_from_args
from openseek.lora import LoRAConfig
from openseek.threads import parse_threads


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    steps: int = 1000
    max_seconds: float = 0.0  # also stop once the run's wall time (all its sessions) reaches this; 0 = no limit
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr × this
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay over decay_fraction) | constant
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on embeddings, head and vectors)
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like lr
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    balance_gamma: float = 0.0  # auxiliary-loss-free balancing: router bias update per step (0 = off)
    parallel: str = "ddp"  # ddp | fsdp, when launched with torchrun on more than one process
    device: str = "auto"  # auto = this rank's GPU when there is one, else cpu
    precision: str = "auto"  # auto (bf16 where native; CPU: models >= 256 wide) | float32 | bf16 (autocast)
    compile: bool = False  # torch.compile each block (GPU only)
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    price_per_device_hour: float = 2.0
    peak_flops: float | None = None  # per device, for MFU; None = looked up from the GPU's name
    threads: str = "auto"  # CPU intra-op threads: auto = measured each step (openseek/threads.py), or a count
    lora_rank: int | None = None  # train rank-r LoRA adapters on a frozen base; None = train every parameter
    lora_alpha: float | None = None  # adapter scaling alpha / rank; None = 2 × rank
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # comma-separated module names (q_proj,v_proj,...) or all-linear
    lora_base_dtype: str = "auto"  # auto (bf16 under a bf16 update) | float32 | bfloat16; adapters stay float32

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule={self.schedule!r}: expected cosine, wsd or constant")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected adamw or muon")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}: expected ddp or fsdp")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps={self.steps} and grad_accum={self.grad_accum} must be at least 1")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds={self.max_seconds} must be 0 (no limit) or a positive number of seconds")
        try:
            parse_threads(str(self.threads))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"threads={self.threads!r}: {e}") from None
        if self.lora() is not None:
            if self.lora_base_dtype not in ("auto", "float32", "bfloat16"):
                raise ValueError(f"lora_base_dtype={self.lora_base_dtype!r}: expected auto, float32 or bfloat16")
            if self.balance_gamma:
                raise ValueError("balance_gamma moves the routers' biases, which belong to the frozen base: LoRA "
                                 "runs keep it at 0")

    def load_dtype(self) -> torch.dtype:
        """The dtype to load the model in: float32 to train every parameter, the frozen base's for LoRA (float32
        for `auto`, which the Trainer settles once it knows the precision)."""
        auto = self.lora_rank is None or self.lora_base_dtype == "auto"
        return torch.float32 if auto else getattr(torch, self.lora_base_dtype)

    def lora(self) -> LoRAConfig | None:
        """The adapters to train (None: every parameter trains); a bad setting raises here, before anything loads."""
        if self.lora_rank is None:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD down to the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start + 1) / max(1, cfg.steps - decay_start)
    return cfg.lr + (floor - cfg.lr) * min(progress, 1.0)


TRAIN_HELP = {
    "max_seconds": "stop at the first step that ends past this many seconds of the run's wall time, resumed sessions "
                   "included (a wall-clock budget, for comparisons at equal time; --steps stays the cap; 0: none)",
    "threads": "CPU intra-op threads: auto measures each step at every count and keeps the fastest, probing again as "
               "the machine's load changes; a number fixes it (bitwise-reproducible runs)",
    "lora_rank": "train rank-r LoRA adapters on the frozen base, saved in PEFT's format (default: every parameter "
                 "trains)",
    "lora_alpha": "LoRA scaling alpha / rank (default: 2 × rank)",
    "lora_dropout": "dropout on the adapters' input",
    "lora_targets": "comma-separated module names to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "
                    "DeepSeek: q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj and the shared experts' "
                    "gate/up/down_proj), or all-linear: every linear layer of the blocks",
    "lora_base_dtype": "auto, float32 or bfloat16: precision of the frozen base weights (auto: bfloat16 when the "
                       "update runs in bf16, else float32)",
}


def add_train_arguments(parser) -> None:
    """One flag per TrainConfig field."""
    add_config_arguments(parser, TrainConfig, "training", TRAIN_HELP)


def train_config_from_args(args) -> TrainConfig:
    return config_from_args(TrainConfig, args)
