"""`openseek demo`: until the R1-Zero pipeline lands, build a tiny DeepSeek-style model (MLA + MoE + MTP),
save it in HF format, load it back and generate greedily — the package's end-to-end path today."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import openseek


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where the tiny model is written")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = openseek.ModelConfig(
        model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=32, n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
        eos_token_id=[0],
    )
    model = openseek.Model(cfg)
    directory = openseek.save(model, Path(args.output_dir) / "tiny-deepseek")
    model = openseek.load(directory)
    ids = torch.tensor([list(b"Hello")])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat((ids, model(ids)[:, -1:].argmax(-1)), dim=1)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved and reloaded {directory} ({params:,} parameters); greedy tokens: {ids[0].tolist()}")
    return 0
