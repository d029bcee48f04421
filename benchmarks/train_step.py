"""Claim: one openseek training step (forward, cross-entropy, backward, AdamW) is ≥1.0× transformers' speed on a
~27M qwen2 and ≥1.5× on a ~61M DeepSeek-V3 (MLA + MoE); B=4, T=256, float32, CPU with 2 threads.

Both models are built from the same random HF checkpoint (saved by transformers, loaded by openseek), train on the
same batch with the same loss code and a fresh fused AdamW each (the default of both trainers), in one process,
alternating step by step. Prints each round, the medians and their ratio, and the first step's loss of each (they
should agree). Besides wall time it reports the process CPU time of each step, which stays meaningful on a machine
shared with other work (wall time there depends on who else is running).

    .venv/bin/python benchmarks/train_step.py [--rounds 5] [--models qwen2 deepseek_v3]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["qwen2", "deepseek_v3"], choices=list(FLOORS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"training step, B={BATCH}, T={SEQ}, float32, CPU, {threads} threads, torch {torch.__version__}")
    ratios = {kind: bench(kind, args.rounds) for kind in args.models}
    return 0 if all(r >= FLOORS[k] for k, r in ratios.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
