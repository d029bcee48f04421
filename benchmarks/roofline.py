"""Claim: how close the Engine's batch-1 decode comes to this machine's memory-bandwidth roofline, per precision.

Decode at batch 1 reads every weight once per step, so tokens/s ≤ read bandwidth ÷ weight bytes per step (a tied
embedding counts once, as the lm_head). This script measures the read bandwidth (`x.sum()` over 1 GiB of float32,
best of 5), then decodes greedily with the Engine on a random Qwen2.5-0.5B-shaped checkpoint (hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings) at float32, bfloat16, int8 and int4
(each in its own process, as a user runs `openseek chat`), and prints tokens/s and the fraction of the roofline.

    .venv/bin/python benchmarks/roofline.py [--threads 2] [--prompt 64] [--new 128] [--precisions ...] [--compile]

`--compile` also measures each precision with the decode step compiled (`Engine(compile=True)`; compilation in the
warm-up, outside the timing), right after the eager run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRECISIONS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
              "int4": ("bfloat16", "int4")}
SHAPE = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, max_position_embeddings=4096, tie_word_embeddings=True, qkv_bias=True)


def bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s: the best of 5 sums over 1 GiB of float32."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_checkpoint(directory: Path) -> None:
    import openseek
    from openseek.config import ModelConfig
    from openseek.model import Model

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", eos_token_id=[0], **SHAPE)
    model = Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    openseek.save(model, directory)


def decode(directory: str, precision: str, threads: int, prompt: int, new: int, compile: bool) -> dict:
    """In a child process: load at `precision`, one warm-up, then the best of 3 greedy decodes, less the prefill
    (as benchmarks/vs_llamacpp.py measures llama.cpp)."""
    import openseek
    from openseek.quantize import weight_bytes_per_step

    torch.set_num_threads(threads)
    dtype, quantize = PRECISIONS[precision]
    model = openseek.load(directory, dtype=dtype, quantize=quantize)
    engine = openseek.Engine(model, max_batch_size=1, compile=compile, threads=threads)  # exactly --threads
    ids = [list(range(10, 10 + prompt))]

    def run(n: int) -> float:
        start = time.perf_counter()
        engine.generate(ids, n, temperature=0, stop_token_ids=[])
        return time.perf_counter() - start

    run(8)
    decode = min(run(new) - run(1) for _ in range(3))  # the prompt's prefill and first token taken out
    return {"precision": precision, "tokens_per_s": (new - 1) / decode, "weight_bytes": weight_bytes_per_step(model)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--compile", action="store_true", help="also with Engine(compile=True), alternating")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "PRECISION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(decode(args.child[0], args.child[1], args.threads, args.prompt, args.new,
                                args.child[2] == "compiled")))
        return
    bw = bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp))
        for precision in args.precisions:
            for mode in ("eager", "compiled") if args.compile else ("eager",):
                out = subprocess.run([sys.executable, __file__, "--child", tmp, precision, mode, "--threads",
                                      str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{precision}: the decode process failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                roofline = bw / r["weight_bytes"]
                print(f"{precision:9s} {mode:8s} {r['tokens_per_s']:6.1f} tok/s   weights/step "
                      f"{r['weight_bytes'] / 1e6:7.1f} MB   roofline {roofline:6.1f} tok/s   "
                      f"fraction {r['tokens_per_s'] / roofline:.2f}", flush=True)


if __name__ == "__main__":
    main()
