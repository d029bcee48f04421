"""Training: the `Trainer` toolkit every stage shares (`step`, `fit`, checkpoints, metrics, report). Pretraining and
SFT are an objective plus batches handed to `fit`; GRPO writes its loop out in `grpo.py` from the same pieces."""

from openseek.train.config import TrainConfig
from openseek.train.trainer import Trainer, TrainingError, init_distributed

__all__ = ["Trainer", "TrainConfig", "TrainingError", "init_distributed"]
