"""A tiny model directory (random qwen2-shaped model + a small BPE trained on arithmetic text) for GRPO tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import openseek
from openseek.config import ModelConfig
from openseek.model import Model
from openseek.tasks import get_task
from openseek.tokenizer import train_bpe


def tiny_tokenizer(vocab_size: int = 320):
    rows = get_task("arithmetic").generate(300, seed=123)
    texts = [f"{r['prompt']} <think> </think> <answer> {r['answer']} </answer>" for r in rows]
    return train_bpe(texts, vocab_size)


def tiny_model_dir(directory, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random tiny model with its tokenizer; returns the directory."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(
        model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id],
    )
    directory = openseek.save(Model(cfg), directory)
    tokenizer.save(directory)
    return Path(directory)


def digit_share(completions, prompts, **columns):
    """A reward a random model can move quickly: the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def rollout_once(model, tokenizer, rows, reward_fns, cfg, weights=None, accuracy_fn=None, seed=0):
    """One GRPO rollout on `model` as the training loop makes it: (RolloutBatch, rollout metrics)."""
    from openseek.engine import Engine
    from openseek.train.rollout import PromptStream, Rewards, roll_out

    rewards = Rewards(reward_fns, weights, accuracy_fn)
    return roll_out(Engine(model), tokenizer, PromptStream(rows), rewards, cfg, seed, tokenizer.pad_token_id or 0)


def tiny_fp64_model(seed=0):
    """A random float64 qwen2-shaped model with weights large enough that gradients are far above 1e-6."""
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, qkv_bias=True, eos_token_id=[1])
    model = Model(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


REWARD = f"{Path(__file__).parent / 'helpers_grpo.py'}:digit_share"


def grpo_args(model_dir, run_dir, *extra) -> list[str]:
    """`openseek grpo` on the arithmetic task with the digit-share reward, fixed threads and float32 (runs are
    reproducible and exact)."""
    return ["grpo", "--model", str(model_dir), "--task", "arithmetic", "--task-size", "200", "--reward", REWARD,
            "--template", "plain", "--max-new-tokens", "16", "--output-dir", str(run_dir), "--no-progress",
            "--threads", "1", "--precision", "float32", *extra]


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
