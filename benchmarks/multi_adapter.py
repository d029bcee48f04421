"""Claim: a batch whose rows use different LoRA adapters (and the base) decodes at ≥ 0.8× the throughput of a batch
whose rows all use one adapter, on the same server (multi_lora.py: per-row factors gathered into batched low-rank
products, never merged).

The model: a random llama-shaped checkpoint (`--hidden`, `--layers`, float32) and two rank-`--rank` adapters on every
linear layer of its blocks (random, non-zero, saved in PEFT's format), written once to `--work-dir`. Each
measurement is its own process: the base with both adapters loaded (`load_adapters`, as `openseek serve --adapter
a=DIR --adapter b=DIR` does), `--requests` streaming requests submitted at once (random `--prompt-len`-token
prompts, `--new-tokens` greedy tokens each, EOS ignored) and timed from submission to the last token, after one
untimed round. Modes: `mixed` (request i uses base, a, b in turn), `single` (every request uses adapter a) and, for
context, `base` (every request the base: no adapter work at all). Modes alternate, `--runs` processes each; the table
gives median generated tokens/s and the ratio to `single`.

    .venv/bin/python benchmarks/multi_adapter.py [--runs 3] [--threads 2] [--work-dir runs/bench_multi_adapter]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CLAIM = 0.8
MODES = ("mixed", "single", "base")


def build(work: Path, args) -> None:
    """The base checkpoint and adapters a/ and b/ in `work` (kept for later runs)."""
    import openseek
    from openseek import Model, ModelConfig
    from openseek.lora import LoRAConfig, apply_lora, save_adapter

    if (work / "b" / "adapter_config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=1024, eos_token_id=[0])
    openseek.save(Model(cfg).eval(), work / "base")
    for seed, name in enumerate(("a", "b"), start=1):
        model = openseek.load(work / "base", dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=args.rank))
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.02)
        save_adapter(model, work / name)


def worker(args) -> None:
    """One measurement: print {"mode", "tokens_per_s"} as JSON."""
    import openseek
    from openseek.engine import Engine
    from openseek.multi_lora import load_adapters

    work = Path(args.work_dir)
    model = openseek.load(work / "base", dtype=torch.float32)
    load_adapters(model, {"a": work / "a", "b": work / "b"})
    engine = Engine(model, max_batch_size=args.requests, threads=args.threads, prefix_cache_tokens=0)
    prompts = torch.randint(1, 8192, (args.requests, args.prompt_len), generator=torch.Generator().manual_seed(0))
    adapters = {"mixed": [i % 3 for i in range(args.requests)], "single": [1] * args.requests,
                "base": [0] * args.requests}[args.worker]

    def round_() -> float:
        start = time.perf_counter()
        handles = [engine.submit(p.tolist(), args.new_tokens, temperature=0, stop_token_ids=[], adapter=a)
                   for p, a in zip(prompts, adapters)]
        produced = sum(len(h.result().token_ids) for h in handles)
        return produced / (time.perf_counter() - start)

    round_()  # untimed: first-call costs
    print(json.dumps({"mode": args.worker, "tokens_per_s": round_()}))
    engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/bench_multi_adapter")
    parser.add_argument("--runs", type=int, default=3, help="processes per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    build(work, args)
    figures = {mode: [] for mode in MODES}
    for run in range(args.runs):
        for mode in MODES if run % 2 == 0 else MODES[::-1]:  # alternate, reversing the order every run
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", mode], check=True,
                                 capture_output=True, text=True).stdout
            figures[mode].append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
            print(f"run {run} {mode}: {figures[mode][-1]:.1f} tok/s", file=sys.stderr)
    single = statistics.median(figures["single"])
    print(f"| batch of {args.requests} | median tok/s | runs | vs single |\n|---|---|---|---|")
    for mode in MODES:
        median = statistics.median(figures[mode])
        print(f"| {mode} | {median:.1f} | {', '.join(f'{v:.1f}' for v in figures[mode])} | {median / single:.2f}× |")
    ratio = statistics.median(figures["mixed"]) / single
    print(f"mixed / single = {ratio:.2f} (claim ≥ {CLAIM}): {'holds' if ratio >= CLAIM else 'FAILS'}")
    return 0 if ratio >= CLAIM else 1


if __name__ == "__main__":
    sys.exit(main())
