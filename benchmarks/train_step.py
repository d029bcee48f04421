"""Claim: one openseek training step (forward, cross-entropy, backward, AdamW) is ≥1.0× transformers' speed on a
~27M qwen2 and ≥1.5× on a ~61M DeepSeek-V3 (MLA + MoE); B=4, T=256, float32, CPU with 2 threads.

Both models are built from the same random HF checkpoint (saved by transformers, loaded by openseek), train on the
same batch with the same loss code and a fresh fused AdamW each (the default of both trainers), in one process,
alternating step by step. Prints each round, the medians and their ratio, and the first step's loss of each (they
should agree). Besides wall time it reports the process CPU time of each step, which stays meaningful on a machine
shared with other work (wall time there depends on who else is running).

    .venv/bin/python benchmarks/train_step.py [--rounds 5] [--models qwen2 deepseek_v3]

On a GPU, `--mfu` instead measures the Trainer itself (bf16 autocast, torch.compile, fused AdamW) on a ~0.5B dense
model (Qwen2.5-0.5B's shape) and a DeepSeek-V3 MoE (recipes/pretrain-moe-gpu.json), and prints its MFU
(target ≥ 45% dense):

    .venv/bin/python benchmarks/train_step.py --mfu [--steps 30] [--batch-size 8] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from generate import hf_config  # noqa: E402  (the same two bench checkpoints as the engine benchmark)

import openseek  # noqa: E402

BATCH, SEQ = 4, 256
FLOORS = {"qwen2": 1.0, "deepseek_v3": 1.5}


def make_step(forward, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's and HF Trainer's default

    def step(tokens):
        logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench(kind: str, rounds: int) -> float:
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = openseek.load(directory)
    hf.train(), ours.train()
    tokens = torch.randint(0, 8192, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    steps = {
        "transformers": make_step(lambda x: hf(input_ids=x).logits, hf),
        "openseek": make_step(ours, ours),
    }
    first = {name: step(tokens) for name, step in steps.items()}  # also the warm-up
    print(f"  {kind}: first-step loss transformers {first['transformers']:.5f}  openseek {first['openseek']:.5f}")
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for i in range(rounds):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name](tokens)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"  {kind} round {i}: transformers {times['transformers'][-1]:.3f}s (cpu {cpu['transformers'][-1]:.3f}s)"
              f"  openseek {times['openseek'][-1]:.3f}s (cpu {cpu['openseek'][-1]:.3f}s)")
    hf_s, ours_s = statistics.median(times["transformers"]), statistics.median(times["openseek"])
    hf_cpu, ours_cpu = statistics.median(cpu["transformers"]), statistics.median(cpu["openseek"])
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    ratio = hf_s / ours_s
    verdict = "ok" if ratio >= FLOORS[kind] else "BELOW FLOOR"
    print(f"{kind} ({params:.0f}M params): transformers {hf_s:.3f}s/step, openseek {ours_s:.3f}s/step -> "
          f"{ratio:.2f}x (floor {FLOORS[kind]}x, {verdict}); CPU time {hf_cpu:.3f}s vs {ours_cpu:.3f}s -> "
          f"{hf_cpu / ours_cpu:.2f}x; openseek {BATCH * SEQ / ours_s:,.0f} tokens/s")
    return ratio


MFU_MODELS = {
    "dense-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True),
    "moe": None,  # recipes/pretrain-moe-gpu.json with a 32K vocabulary
}


def measure_training(hf: dict, steps: int, batch_size: int, seq_len: int, device: str = "auto",
                     compile: bool = True) -> dict:
    """Train a random model of HF config `hf` with the Trainer (`Trainer.step`: autocast at the device's precision,
    fused AdamW; each block compiled with `compile`) on random tokens for `steps` steps. Returns the medians over the
    second half: tokens/s, FLOPs per token (6 × active parameters + attention, report.flops_per_token), achieved
    FLOP/s and the MFU over the device's bf16 dense peak (report.PEAK_FLOPS; None off a GPU or on one it lacks)."""
    from openseek.config import ModelConfig
    from openseek.model import Model
    from openseek.report import flops_per_token
    from openseek.train.config import TrainConfig
    from openseek.train.pretrain import NextTokenLoss
    from openseek.train.trainer import Trainer

    cfg = ModelConfig.from_hf(hf)
    torch.manual_seed(0)
    model = Model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    objective = NextTokenLoss(mtp_weight=0.3 if cfg.num_nextn_predict_layers else 0.0,
                              mtp_depths=cfg.num_nextn_predict_layers)
    per_token = flops_per_token(cfg, seq_len)
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(run_dir=run_dir, steps=steps, lr=1e-4, compile=compile, progress=False, device=device)
        trainer = Trainer(model, config, flops_per_token=per_token)
        with trainer.session():  # steps only: no checkpoint (a 0.5B one is gigabytes of writes)
            rows = [trainer.step([batch], objective) for _ in range(steps)]
    rows = rows[steps // 2:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None
    return {"params": sum(p.numel() for p in model.parameters()), "batch_size": batch_size, "seq_len": seq_len,
            "steps": steps, "precision": trainer.precision, "compiled": compile, "device": str(trainer.device),
            "tokens_per_s": tokens_per_s, "flops_per_token": per_token, "flops_per_s": per_token * tokens_per_s,
            "peak_flops": trainer._peak_flops(), "mfu": mfu, "loss_first": rows[0]["loss"]}


def mfu(steps: int, batch_size: int, seq_len: int) -> None:
    """`measure_training` for each model of MFU_MODELS on this machine's GPU, printed."""
    import json

    recipe = json.loads((Path(__file__).parent.parent / "recipes" / "pretrain-moe-gpu.json").read_text())
    for name, hf in MFU_MODELS.items():
        r = measure_training(hf or dict(recipe["model"], vocab_size=32768), steps, batch_size, seq_len)
        shown = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (no GPU peak known)"
        print(f"{name}: {r['params'] / 1e9:.2f}B params, B={batch_size} T={seq_len}: {r['tokens_per_s']:,.0f} "
              f"tokens/s, {shown}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["qwen2", "deepseek_v3"], choices=list(FLOORS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mfu", action="store_true", help="measure the Trainer's MFU on a GPU instead")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if args.mfu:
        mfu(args.steps, args.batch_size, args.seq_len)
        return 0
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"training step, B={BATCH}, T={SEQ}, float32, CPU, {threads} threads, torch {torch.__version__}")
    ratios = {kind: bench(kind, args.rounds) for kind in args.models}
    return 0 if all(r >= FLOORS[k] for k, r in ratios.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
