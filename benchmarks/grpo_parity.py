"""Claim: GRPO's fast rollout settings learn as well as exact float32 — mean accuracy after 40 steps on the demo's
arithmetic task within two standard errors (3 seeds) of the exact run — and how much faster each step is.

The demo's data and pretraining stages make the starting model (a small DeepSeek-V3: MLA, MoE, MTP); then each
configuration runs the demo's GRPO (DAPO loss, G = 8, 16 prompts, 48 new tokens) for 40 steps from it, each run
its own process, seeds 0, 1, 2, configurations alternating:

- exact: float32 update, rollouts sampled by the trained float32 weights (no correction needed);
- fast: the update in the trainer's default precision (`--precision auto`: float32 at the demo's width), rollouts
  from a bf16 view of the policy refreshed after every step (`--rollout-dtype bfloat16`), mismatch corrected per
  token (`token_tis`, cap 3);
- int8: what `--rollout-quantize auto` picks for a model at least 256 wide on a CPU with native bf16, forced here on
  the demo's model: a bf16 autocast update (`--precision bf16`), rollouts from an int8 view of the policy (bf16
  activations, re-quantised after every step), `token_tis` (cap 3).

Accuracy is the task checker's mean over a step's completions; a run's figure is the mean of its last 10 steps.

    .venv/bin/python benchmarks/grpo_parity.py [--steps 40] [--seeds 0 1 2] [--configs exact fast int8]
                                               [--base /tmp/openseek-parity]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "exact": dict(precision="float32", rollout_dtype="auto"),
    "fast": dict(precision="auto", rollout_dtype="bfloat16"),
    "int8": dict(precision="bf16", rollout_dtype="bfloat16", rollout_quantize="int8"),
}
LAST = 10  # steps averaged per run


def demo_args(base: Path, seed: int = 0):
    from openseek.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--run-dir", str(base), "--seed", str(seed)])


def make_base(base: Path) -> Path:
    """The demo's data and pretraining stages (reused when already in `base`); returns the pretrained checkpoint."""
    from openseek.demo import Demo, _completed
    from openseek.train.trainer import list_checkpoints

    demo = Demo(demo_args(base))
    base.mkdir(parents=True, exist_ok=True)
    demo.stage("data", (base / "data" / "corpus.jsonl").is_file(), demo.make_data)
    demo.stage("pretrain", _completed(base / "pretrain"), demo.pretrain)
    return list_checkpoints(base / "pretrain")[-1]


def child(base: Path, config: str, seed: int, steps: int, out: Path) -> None:
    """One GRPO run, as the demo configures it, in this process."""
    import torch

    import openseek
    from openseek.demo import Demo
    from openseek.rewards import format_reward
    from openseek.tokenizer import Tokenizer
    from openseek.train.grpo import GRPOConfig, train
    from openseek.train.config import TrainConfig
    from openseek.train.trainer import list_checkpoints

    a = demo_args(base, seed)
    demo = Demo(a)
    start = list_checkpoints(base / "pretrain")[-1]
    torch.set_num_threads(1)
    model, tokenizer = openseek.load(start, dtype=torch.float32), Tokenizer.from_dir(start)
    settings = CONFIGS[config]
    grpo_cfg = GRPOConfig(group_size=a.group_size, prompts_per_step=a.prompts_per_step,
                          max_new_tokens=a.max_new_tokens, temperature=1.0, beta=0.0, loss_type="dapo",
                          epsilon_high=0.28, dynamic_sampling=True, template="plain",
                          rollout_dtype=settings["rollout_dtype"],
                          rollout_quantize=settings.get("rollout_quantize", "none"))
    train_cfg = TrainConfig(run_dir=str(out), steps=steps, lr=a.grpo_lr, schedule="constant", weight_decay=0.0,
                            checkpoint_every=steps, keep_checkpoints=1, resume=False, seed=seed, device="cpu",
                            threads="1", precision=settings["precision"])
    rows = demo.problems(a.grpo_prompts, seed=a.seed + 1, split="train")
    train(model, tokenizer, rows, [demo.task.reward, format_reward], grpo_cfg, train_cfg, weights=[1.0, 0.1],
          accuracy_fn=demo.task.reward)


def summarise(run: Path) -> dict:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rows = [r for r in rows if "accuracy" in r]
    return {"accuracy": statistics.mean(r["accuracy"] for r in rows[-LAST:]),
            "step_s": statistics.median(r["time/step"] for r in rows[1:]),
            "generation_s": statistics.median(r["time/generation"] for r in rows[1:]),
            "update_s": statistics.median(r["time/update"] for r in rows[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--base", type=Path, default=Path("/tmp/openseek-parity"))
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, seed, out = args.child
        child(args.base, config, int(seed), args.steps, Path(out))
        return
    print(f"pretrained start: {make_base(args.base)}")
    results = {name: [] for name in args.configs}
    for i, seed in enumerate(args.seeds):
        for name in args.configs if i % 2 == 0 else reversed(args.configs):
            out = args.base / "runs" / f"{name}-{seed}"
            if not (out / "report.json").is_file():
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--base", str(args.base),
                                "--child", name, str(seed), str(out)], check=True)
                print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s")
            results[name].append(summarise(out))
            print(f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name][-1].items()))
    stats = {}
    for name, runs in results.items():
        accuracies = [r["accuracy"] for r in runs]
        se = statistics.stdev(accuracies) / math.sqrt(len(accuracies)) if len(accuracies) > 1 else float("nan")
        stats[name] = (statistics.mean(accuracies), se)
        print(f"{name}: accuracy (mean of the last {LAST} steps) {stats[name][0]:.3f} ± {se:.3f} (SE, "
              f"{len(runs)} seeds); step {statistics.median(r['step_s'] for r in runs):.2f} s, generation "
              f"{statistics.median(r['generation_s'] for r in runs):.2f} s, update "
              f"{statistics.median(r['update_s'] for r in runs):.2f} s")
    exact, exact_se = stats.get("exact", (None, None))
    for name, (mean, se) in stats.items():
        if name != "exact" and exact is not None:
            bound = 2 * math.sqrt(se**2 + exact_se**2)
            print(f"{name} − exact = {mean - exact:+.3f}; two standard errors of the difference: {bound:.3f} -> "
                  f"{'within' if abs(mean - exact) <= bound else 'OUTSIDE'}")


if __name__ == "__main__":
    main()
