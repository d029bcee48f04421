"""Claim: a competing CPU-bound process slows openseek's decode no more than it slows transformers'.

On two cores, torch's two OpenMP threads wait at every parallel region for the slower one; when another process
takes a core, that wait becomes a scheduler time slice, and small per-token ops collapse. This script measures the
slowdown factor (time with a competing busy loop ÷ time on a quiet machine) for transformers' `generate` and for
the openseek Engine at several thread settings, each run in its own process as a user runs it, alternating quiet
and busy. Model: the ~31M qwen2 of benchmarks/generate.py, greedy, batch 1, 64-token prompt, 64 new tokens
(the mean of 3 generations after a warm-up).

    .venv/bin/python benchmarks/contention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT, NEW = 64, 64
SETTINGS = {  # name: (system, threads (0 = auto), extra environment)
    "transformers (2 threads)": ("transformers", 2, {}),
    "openseek --threads auto (default)": ("openseek", 0, {}),
    "openseek --threads 2": ("openseek", 2, {}),
    "openseek --threads 2, OMP_WAIT_POLICY=PASSIVE": ("openseek", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "openseek --threads 1": ("openseek", 1, {}),
}


def child(directory: str, system: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads or 2)
    prompt = torch.randint(0, 8192, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    if system == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

        def run():
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                               min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    else:
        import openseek

        engine = openseek.Engine(openseek.load(directory, dtype=torch.float32), max_batch_size=1,
                                 threads=threads or None)

        def run():
            engine.generate(prompt.tolist(), NEW, temperature=0, stop_token_ids=[])
    run()
    start = time.perf_counter()
    for _ in range(3):  # long enough for `auto` to have probed and settled
        run()
    return (time.perf_counter() - start) / 3


def measure(directory: str, name: str) -> float:
    system, threads, env = SETTINGS[name]
    out = subprocess.run([sys.executable, __file__, "--child", directory, system, str(threads)],
                         env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name}: the child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    import transformers

    from generate import hf_config

    times = {name: {"quiet": [], "busy": []} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(hf_config("qwen2"), dtype=torch.float32).save_pretrained(directory)
        for i in range(args.rounds):
            for condition in ("quiet", "busy") if i % 2 == 0 else ("busy", "quiet"):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
                try:
                    for name in SETTINGS:
                        times[name][condition].append(measure(directory, name))
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                print(f"round {i + 1} {condition}: " + ", ".join(f"{n} {t[condition][-1]:.2f}s"
                                                                  for n, t in times.items()), flush=True)
    print(f"\nbatch 1, {PROMPT}-token prompt, {NEW} new tokens, float32; median of {args.rounds} runs each")
    print(f"{'setting':48s} {'quiet':>8s} {'busy':>8s} {'slowdown':>9s}")
    for name, t in times.items():
        quiet, busy = statistics.median(t["quiet"]), statistics.median(t["busy"])
        print(f"{name:48s} {quiet:7.2f}s {busy:7.2f}s {busy / quiet:8.2f}x")


if __name__ == "__main__":
    main()
