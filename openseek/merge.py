"""`openseek merge --model BASE --adapter DIR --output OUT`: fold a LoRA adapter (PEFT's format) into its base
model and write a plain HF checkpoint with the base's tokenizer, which transformers, vLLM and llama.cpp's converter
load like any other. Command-line glue over lora.py (the adapters) and checkpoint.py (reading and writing)."""

from __future__ import annotations

import argparse
import shutil

import torch

import openseek
from openseek.checkpoint import DTYPES, read_config, resolve
from openseek.lora import lora_modules, merge_adapters
from openseek.model.moe import Router


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (or hub id) the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (adapter_config.json + "
                                                         "adapter_model.safetensors)")
    parser.add_argument("--output", required=True, help="directory for the merged HF model (with the tokenizer)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the merged weights (default: the base checkpoint's)")


def main(args: argparse.Namespace) -> int:
    """Merge in float32, then write the model in the base checkpoint's dtype (or --dtype), with its tokenizer."""

    directory = resolve(args.model)
    model = openseek.load(directory, dtype=torch.float32, adapter=args.adapter)
    adapted = len(lora_modules(model))
    merge_adapters(model)
    dtype = DTYPES.get(args.dtype or read_config(directory)[0].torch_dtype or "float32", torch.float32)
    model.to(dtype)
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.float()  # routing stays float32, as `load` keeps it
    out = openseek.save(model, args.output)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (directory / file).is_file():
            shutil.copy(directory / file, out / file)
    print(f"merged the adapters of {adapted} layers into {out}")
    return 0
