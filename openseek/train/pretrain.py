"""`openseek pretrain`: next-token prediction on packed local text, with DeepSeek's MTP and balance losses.

    openseek pretrain --recipe recipes/pretrain-tiny-moe.json --data corpus/ --tokenizer tok/ --run-dir runs/pt

The model is a fresh one from a config (`--model config.json`, or the recipe's "model" object) or an existing
model directory to continue from. `--batch-size` is per process and micro-step: the global batch is
batch_size × processes × grad_accum sequences of `--seq-len` tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import openseek
from openseek import data
from openseek.config import ModelConfig
from openseek.kernels import ops
from openseek.model import Model
from openseek.report import flops_per_token
from openseek.tokenizer import Tokenizer, load_tokenizer
from openseek.train.routing import RoutingLog, sequence_balance_loss
from openseek.flags import add_data_arguments, add_stage_arguments, apply_recipe, config_defaults
from openseek.train.config import TrainConfig, add_train_arguments, train_config_from_args
from openseek.train.trainer import Trainer, init_distributed


@dataclass
class NextTokenLoss:
    """Cross-entropy on `labels` (IGNORE = no loss), plus λ × the mean over MTP depths of each depth's loss and α ×
    DeepSeek-V3's sequence-wise balance loss. Used by pretraining and SFT alike.

    Each part is a term of the Trainer's objective contract: a sum divided by the step's count of its units —
    labelled tokens for the main loss and for each MTP depth (depth k has fewer: its targets start k tokens later),
    sequences for the balance loss. `mtp_depths` is how many MTP modules the loss trains (the model's
    `num_nextn_predict_layers`); it must be known before the forward, since the counts come first. `mtp_rows`, when
    set, trains the MTP modules on the first that many rows of each micro-batch only: the MTP layer and its output
    head are a third of a small model's step, and the demo's model learns as well with them on half its rows.
    """

    mtp_weight: float = 0.0
    balance_alpha: float = 0.0
    mtp_depths: int = 0
    mtp_rows: int | None = None

    def __post_init__(self):
        if self.mtp_rows is not None and self.mtp_rows < 1:
            raise ValueError(f"NextTokenLoss(mtp_rows={self.mtp_rows}): at least 1 row (None: every row)")

    def counts(self, batch: dict) -> dict[str, float]:
        labels = batch["labels"]
        out = {"lm": float((labels != data.IGNORE).sum())}
        if self.mtp_weight > 0:
            for k in range(1, self.mtp_depths + 1):
                out[f"mtp{k}"] = float((labels[: self.mtp_rows, k:] != data.IGNORE).sum())
        if self.balance_alpha > 0:
            out["sequences"] = float(labels.shape[0])
        return out

    def __call__(self, model, batch: dict, counts: dict | None = None) -> tuple[torch.Tensor, dict]:
        own = {t: max(n, 1.0) for t, n in self.counts(batch).items()}
        counts = counts or own
        input_ids, labels = batch["input_ids"], batch["labels"]
        if self.mtp_weight > 0 and self.mtp_depths != model.cfg.num_nextn_predict_layers:
            raise ValueError(f"NextTokenLoss(mtp_depths={self.mtp_depths}) but the model has "
                             f"{model.cfg.num_nextn_predict_layers} MTP layers (num_nextn_predict_layers)")
        with RoutingLog(model) as routing:
            logits, hidden = model(input_ids, return_hidden=True)
        lm = cross_entropy_sum(logits, labels)
        loss = lm / counts["lm"]
        metrics = {"loss/lm": lm.item() / own["lm"], "tokens": input_ids.numel()}
        if self.mtp_weight > 0 and self.mtp_depths:
            # Depth k at position i predicts token i + k + 1, which is labels[:, i + k].
            depth_losses = []
            rows = slice(self.mtp_rows)
            for k, depth_logits in enumerate(model.mtp_logits(hidden[rows], input_ids[rows]), 1):
                total = cross_entropy_sum(depth_logits, labels[rows, k:])
                loss = loss + self.mtp_weight / self.mtp_depths * total / counts[f"mtp{k}"]
                depth_losses.append(total.item() / own[f"mtp{k}"])
            metrics["loss/mtp"] = sum(depth_losses) / len(depth_losses)
        if self.balance_alpha > 0:
            balance = sequence_balance_loss(routing.records, input_ids.shape[0])
            loss = loss + self.balance_alpha * balance * input_ids.shape[0] / counts["sequences"]
            metrics["loss/balance"] = balance.item()
        return loss, metrics


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss in float32 over labelled tokens ([B, T, V] logits, [B, T] labels), on our log-prob
    kernel where it runs (ops.token_logprobs)."""
    logits, labels = logits.flatten(0, 1), labels.flatten()
    if ops.token_logprobs_on_kernel(logits):
        ignored = labels == data.IGNORE
        logp, _ = ops.token_logprobs(logits, labels.masked_fill(ignored, 0))
        return -logp.masked_fill(ignored, 0.0).sum()
    return F.cross_entropy(logits.float(), labels, ignore_index=data.IGNORE, reduction="sum")


def build_model(spec: str | dict | None, tokenizer: Tokenizer, seed: int, dtype: torch.dtype = torch.float32) -> Model:
    """A model to train: loaded from a model directory (in `dtype`: a LoRA run's frozen base may be bf16), or fresh
    from a config (a dict or a config.json path).

    A fresh model takes its vocabulary size and BOS/EOS ids from the tokenizer."""
    if spec is None:
        raise ValueError("no model: pass --model (a model directory or a config.json) or a recipe with 'model'")
    if isinstance(spec, str) and Path(spec).is_dir():
        model = openseek.load(spec, dtype=dtype)
        if model.cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{spec}: vocab_size {model.cfg.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
        return model
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model directory or config file")
        spec = json.loads(path.read_text())
    hf = dict(spec, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Model(ModelConfig.from_hf(hf, source="model config"))


DEFAULTS = config_defaults(TrainConfig) | dict(text_field="text", skip_bad_lines=False, seq_len=256, batch_size=8,
                                                mtp_weight=0.0, balance_alpha=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.argument_default = argparse.SUPPRESS  # only typed flags parse; apply_recipe settles the rest
    add_stage_arguments(parser, "model directory to continue from, or a config.json for a fresh model")
    add_data_arguments(parser, ".txt/.jsonl/.parquet files or directories",
                       "sequences per process per micro-step (default: 8)")
    parser.add_argument("--text-field", help="JSONL/Parquet field holding the text (default: text)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256)")
    parser.add_argument("--mtp-weight", type=float, help="λ: weight of the MTP loss (default: 0)")
    parser.add_argument("--balance-alpha", type=float, help="α: sequence-wise balance loss weight (default: 0)")
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    model_spec = apply_recipe(args, add_arguments, DEFAULTS)
    if not args.data:
        raise ValueError("no data: pass --data FILE_OR_DIR ...")
    rank, world_size = init_distributed()
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = build_model(args.model or model_spec, tokenizer, args.seed)
    records = data.Records(args.data, args.text_field, args.skip_bad_lines)
    rows = data.PackedRows(records, tokenizer, args.seq_len, args.epochs)
    batches = data.Batches(rows, args.batch_size, data.collate_packed, rank, world_size)
    objective = NextTokenLoss(args.mtp_weight, args.balance_alpha, model.cfg.num_nextn_predict_layers)
    trainer = Trainer(model, train_config_from_args(args), tokenizer,
                      flops_per_token=flops_per_token(model.cfg, args.seq_len))
    report = trainer.fit(batches, objective)
    if report:
        print(f"done: {report['steps']} steps, final loss {report.get('final_loss')}, "
              f"{report['device_hours']:.4f} device-hours; report: {Path(args.run_dir) / 'report.md'}")
    return 0
