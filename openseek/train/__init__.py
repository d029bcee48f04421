"""Training: one loop (`Trainer`) shared by every stage; a stage is an objective plus its batches."""

from openseek.train.trainer import Trainer, TrainConfig, TrainingError, init_distributed

__all__ = ["Trainer", "TrainConfig", "TrainingError", "init_distributed"]
