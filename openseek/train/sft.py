"""`openseek sft`: supervised fine-tuning on chat conversations, loss on the assistant's tokens only.

    openseek sft --model runs/pt/checkpoints/step_00002000 --data chats.jsonl --run-dir runs/sft
    openseek sft --model Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl --lora-rank 16   # LoRA: checkpoints hold
                                                                                         # adapter/ in PEFT's format

Data: JSONL (or Parquet) rows with OpenAI-style `messages` ([{"role": "user", "content": ...}, {"role":
"assistant", "content": "<think>\\n…\\n</think>\\n\\nanswer"}]). Each conversation is rendered with the model's
chat template (R1's when it has none) and only assistant turns are trained; see `openseek.data.encode_conversation`.
The objective is pretraining's `NextTokenLoss` on those masked labels: one loop, one loss.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from openseek import data
from openseek.report import flops_per_token
from openseek.tokenizer import load_tokenizer
from openseek.train.pretrain import NextTokenLoss, build_model
from openseek.flags import add_data_arguments, add_stage_arguments, apply_recipe, config_defaults
from openseek.train.config import TrainConfig, add_train_arguments, train_config_from_args
from openseek.train.trainer import Trainer, init_distributed


DEFAULTS = config_defaults(TrainConfig) | dict(skip_bad_lines=False, max_len=1024, batch_size=8, mtp_weight=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.argument_default = argparse.SUPPRESS  # only typed flags parse; apply_recipe settles the rest
    add_stage_arguments(parser, "model directory to fine-tune")
    add_data_arguments(parser, "JSONL/Parquet files (or directories) of `messages`",
                       "conversations per process per micro-step (default: 8)")
    parser.add_argument("--max-len", type=int, help="tokens per conversation; longer ones are cut (default: 1024)")
    parser.add_argument("--mtp-weight", type=float, help="λ: weight of the MTP loss (default: 0)")
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    model_spec = apply_recipe(args, add_arguments, DEFAULTS)
    train_cfg = train_config_from_args(args)  # refuses bad settings (e.g. --lora-rank 0) before loading anything
    if not args.data:
        raise ValueError("no data: pass --data FILE_OR_DIR ...")
    rank, world_size = init_distributed()
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = build_model(args.model or model_spec, tokenizer, args.seed, train_cfg.load_dtype())
    records = data.Records(args.data, field="messages", skip_bad_lines=args.skip_bad_lines)
    rows = data.ConversationRows(records, tokenizer, args.max_len, args.epochs)
    collate = partial(data.collate_conversations, pad_id=tokenizer.pad_token_id)
    batches = data.Batches(rows, args.batch_size, collate, rank, world_size)
    trainer = Trainer(model, train_cfg, tokenizer,
                      flops_per_token=flops_per_token(model.cfg, args.max_len // 2))
    report = trainer.fit(batches, NextTokenLoss(args.mtp_weight, mtp_depths=model.cfg.num_nextn_predict_layers))
    if report:
        print(f"done: {report['steps']} steps, final loss {report.get('final_loss')}; "
              f"report: {Path(args.run_dir) / 'report.md'}")
    return 0
