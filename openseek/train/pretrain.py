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
from openseek.model import Model
from openseek.report import flops_per_token
from openseek.tokenizer import Tokenizer, TokenizerError
from openseek.train.trainer import (
    Trainer,
    add_train_arguments,
    apply_recipe,
    init_distributed,
    moe_layers,
    train_config_from_args,
)


@dataclass
class NextTokenLoss:
    """Cross-entropy on `labels` (IGNORE = no loss), plus λ × the mean MTP loss over depths and α × DeepSeek-V3's
    sequence-wise balance loss. Used by pretraining and SFT alike."""

    mtp_weight: float = 0.0
    balance_alpha: float = 0.0

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        use_mtp = self.mtp_weight > 0 and model.cfg.num_nextn_predict_layers > 0
        logits, hidden = model(input_ids, return_hidden=True)
        loss = cross_entropy(logits, labels)
        metrics = {"loss/lm": loss.item(), "tokens": input_ids.numel()}
        if use_mtp:
            # Depth k at position i predicts token i + k + 1, which is labels[:, i + k].
            mtp = [cross_entropy(lg, labels[:, k:]) for k, lg in enumerate(model.mtp_logits(hidden, input_ids), 1)]
            mtp_loss = torch.stack(mtp).mean()
            loss = loss + self.mtp_weight * mtp_loss
            metrics["loss/mtp"] = mtp_loss.item()
        if self.balance_alpha > 0:
            balance = sequence_balance_loss(model, input_ids.shape[0])
            loss = loss + self.balance_alpha * balance
            metrics["loss/balance"] = balance.item()
        return loss, metrics


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32 over labelled tokens ([B, T, V] logits, [B, T] labels)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=data.IGNORE)


def sequence_balance_loss(model, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, summed over MoE layers.

    Per sequence: f_i = E / (K·T) × tokens routed to expert i, P_i = mean over the sequence of expert i's share
    of the token's scores; loss = Σ_i f_i·P_i (1 when perfectly balanced). Uses the routing of the last forward.
    """
    total = 0.0
    for layer in moe_layers(model):
        scores, ids = layer.last_scores, layer.last_ids
        experts, k = scores.shape[-1], ids.shape[-1]
        shares = (scores / scores.sum(-1, keepdim=True)).view(batch_size, -1, experts)
        counts = torch.zeros_like(shares[:, 0]).scatter_add_(
            1, ids.view(batch_size, -1), torch.ones_like(ids.view(batch_size, -1), dtype=shares.dtype)
        )
        f = counts * experts / (k * shares.shape[1])
        total = total + (f * shares.mean(1)).sum(-1).mean()
    return torch.as_tensor(total)


def build_model(spec: str | dict | None, tokenizer: Tokenizer, seed: int) -> Model:
    """A model to train: loaded from a model directory, or fresh from a config (a dict or a config.json path).

    A fresh model takes its vocabulary size and BOS/EOS ids from the tokenizer."""
    if spec is None:
        raise ValueError("no model: pass --model (a model directory or a config.json) or a recipe with 'model'")
    if isinstance(spec, str) and Path(spec).is_dir():
        model = openseek.load(spec, dtype=torch.float32)
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


def load_tokenizer(tokenizer_dir: str | None, model: str | None) -> Tokenizer:
    """--tokenizer, else the model directory's own tokenizer."""
    if tokenizer_dir is None and model is not None and Path(model).is_dir():
        tokenizer_dir = model
    if tokenizer_dir is None:
        raise TokenizerError("no tokenizer: pass --tokenizer DIR (train one with `openseek tokenizer train`)")
    return Tokenizer.from_dir(tokenizer_dir)


DEFAULTS = dict(text_field="text", skip_bad_lines=False, seq_len=256, batch_size=8, mtp_weight=0.0,
                balance_alpha=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="JSON file of settings for these flags (flags given here win; see recipes/)")
    parser.add_argument("--model", help="model directory to continue from, or a config.json for a fresh model")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--data", nargs="+", help=".txt/.jsonl/.parquet files or directories")
    parser.add_argument("--text-field", help="JSONL/Parquet field holding the text (default: text)")
    parser.add_argument("--skip-bad-lines", action="store_true", default=None,
                        help="skip (and count) malformed JSONL lines")
    parser.add_argument("--epochs", type=int,
                        help="passes over the data before stopping (default: cycle until --steps)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256)")
    parser.add_argument("--batch-size", type=int, help="sequences per process per micro-step (default: 8)")
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
    trainer = Trainer(model, train_config_from_args(args), NextTokenLoss(args.mtp_weight, args.balance_alpha),
                      batches, tokenizer, flops_per_token=flops_per_token(model.cfg, args.seq_len))
    report = trainer.train()
    if report:
        print(f"done: {report['steps']} steps, final loss {report.get('final_loss')}, "
              f"{report['device_hours']:.4f} device-hours; report: {Path(args.run_dir) / 'report.md'}")
    return 0
