"""Claim: MTP speculative decoding (the model's own MTP module drafting for it) makes batch-1 greedy decoding of the
demo's trained model ≥ 1.6× faster with one draft token per step, at ≥ 80% acceptance, with identical output.

The model: `--model DIR` (the demo's final model, `runs/demo/model`), or — without it — the demo's data and
pretraining stages (3-digit additions with worked column steps, MTP loss λ = 0.3) run in `--run-dir` for
`--pretrain-steps` steps and reused on later runs. Prompts: the demo's held-out problems (BOS + question), decoded
greedily until EOS or `--max-new-tokens`. Plain and speculative decoding (k = 1, 2, 3) alternate within each run, at
batch 1 and batch 8; the table gives median tokens/s, the speed-up over plain at the same batch size, the acceptance
rate, tokens gained per step, and whether every output equals plain decoding's.

Plain decoding is the baseline at its own best settings: the Engine's defaults, which look for finished rows every
FINISH_CHECK_EVERY (8) steps — setting that to 1 for plain cut the demo model's plain decoding from 702 to 537
tok/s (benchmarks/RESULTS.md). Speculation must check every step (its rows gain different numbers of tokens), and
that cost is counted against it. Every engine decodes once untimed before the timed runs (`demo.compare_speculation`),
and the order of the engines reverses every run. `--threads N` fixes N threads for every engine, plain and
speculative; `--threads auto` lets each engine measure and choose (a separate, labelled setting).

    .venv/bin/python benchmarks/speculative.py [--model runs/demo/model] [--runs 5] [--threads 1|auto] [--compile]
    .venv/bin/python benchmarks/speculative.py --size deep --run-dir runs/bench_speculative_deep --pretrain-steps 500

What speculation gains depends on how much the draft costs against the model: the demo's model has 4 layers, so its
MTP layer adds a quarter to every step; DeepSeek-V3 has 61 and one MTP layer. `--size deep` pretrains the same
recipe at 16 layers, as a model of realistic depth for the claim.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import openseek
from openseek import demo
from openseek.engine import engine as engine_module
from openseek.threads import parse_threads
from openseek.tokenizer import BOS, Tokenizer
from openseek.train.trainer import list_checkpoints

CLAIM_SPEEDUP, CLAIM_ACCEPTANCE = 1.6, 0.8


def demo_model(args) -> Path:
    """The model directory: --model, else the last checkpoint of the demo's pretraining run in --run-dir."""
    if args.model:
        return Path(args.model)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    pipeline = demo.Demo(parser.parse_args(["--run-dir", args.run_dir, "--size", args.size,
                                            "--pretrain-steps", str(args.pretrain_steps),
                                            "--threads", "auto" if args.threads is None else str(args.threads)]))
    run = pipeline.run
    pipeline.stage("data", (run / "data" / "corpus.jsonl").is_file() and (run / "tokenizer").is_dir(),
                   pipeline.make_data)
    pipeline.stage("pretrain", demo._completed(run / "pretrain"), pipeline.pretrain)
    return list_checkpoints(run / "pretrain")[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a trained model with an MTP module (default: pretrain the demo's)")
    parser.add_argument("--run-dir", default="runs/bench_speculative", help="where the fallback model is trained")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--size", choices=sorted(demo.SIZES), default="small",
                        help="the fallback model's preset: the demo's (small), or deep (16 layers, as deep relative to "
                             "its MTP layer as a real model)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out problems decoded per run")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=parse_threads, default=1, metavar="N|auto",
                        help="CPU threads of every engine (the demo's model runs fastest on one); auto: each engine "
                             "measures and chooses")
    parser.add_argument("--compile", action="store_true",
                        help="every engine, plain and speculative, with its decode step compiled")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = "auto (each engine measures)" if args.threads is None else f"{args.threads} thread(s), fixed"

    directory = demo_model(args)
    model = openseek.load(directory, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(directory)
    heldout = demo.Demo(argparse.Namespace(run_dir=args.run_dir, device="cpu", seed=0, heldout=args.prompts,
                                           threads=args.threads))
    prompts = [tokenizer.encode(BOS + row["prompt"]) for row in heldout.problems(args.prompts, seed=0, split="test")]
    print(f"model {directory}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.cfg.num_nextn_predict_layers} MTP layer(s); {len(prompts)} prompts, {args.runs} runs, "
          f"{threads}, decode step {'compiled' if args.compile else 'eager'}; plain decoding at the Engine's "
          f"defaults (finished rows checked every {engine_module.FINISH_CHECK_EVERY} steps), speculation every step")
    rows = demo.compare_speculation(model, prompts, ks=[1, 2, 3], batch_sizes=[1, 8], runs=args.runs,
                                    max_new_tokens=args.max_new_tokens, threads=args.threads, compile=args.compile)
    print("| batch | draft tokens k | tokens/s | speed-up | acceptance | tokens per step | output identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        k = "— (plain)" if r["k"] == 0 else r["k"]
        extra = ("", "", "") if r["k"] == 0 else (f"{r['acceptance']:.1%}", f"{r['mean_accepted_length']:.2f}",
                                                  "yes" if r["identical"] else "NO")
        print(f"| {r['batch']} | {k} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {' | '.join(extra)} |")
    print(json.dumps(rows))
    claim = next(r for r in rows if r["k"] == 1 and r["batch"] == 1)
    held = claim["speedup"] >= CLAIM_SPEEDUP and claim["acceptance"] >= CLAIM_ACCEPTANCE and claim["identical"]
    print(f"claim (batch 1, k = 1: ≥ {CLAIM_SPEEDUP}× at ≥ {CLAIM_ACCEPTANCE:.0%} acceptance, identical output): "
          f"{claim['speedup']:.2f}× at {claim['acceptance']:.1%} → {'HOLDS' if held else 'DOES NOT HOLD'}")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
