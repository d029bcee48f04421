"""Claim: one GRPO step of `openseek grpo` (its defaults) is ≥3× faster than TRL's `GRPOTrainer` (its defaults,
transformers generate backend), each run as its own process, as a user runs them — and, separately, how the two
compare when both do the same arithmetic.

Same HF checkpoint (the ~31M qwen2 of benchmarks/generate.py: hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 8192, random weights saved by transformers), a small byte-level BPE trained here, the same
prompts, the same custom reward, G = 8 completions for each of 2 prompts per step, 128 new tokens (both stop at
EOS), β = 0.04 (both load a frozen reference), one update per rollout, GRPO loss (per-sequence mean), lr 1e-6, CPU.
TRL runs with `use_cpu=True`; openseek runs `openseek grpo` from the command line. Three pairs (`--pairs`, all by
default):

  (a) defaults — each trainer as a user gets it. TRL 1.16 (`trl/trainer/base_config.py`): `bf16=True` — accelerate
      runs every forward (generation, reference and policy log-probs, the loss) under bf16 autocast, weights and
      AdamW state in float32 — and `gradient_checkpointing=True`: activations are dropped in the forward and the
      forward is recomputed in the backward (TRL turns it off while generating). openseek: `--precision auto` (bf16
      autocast for the update where the CPU has native bf16, i.e. avx512_bf16 or amx_bf16, and the model is ≥ 256
      wide; float32 elsewhere), `--rollout-dtype auto` (a bf16 copy of the weights for the rollouts when the update
      is bf16) and `--rollout-quantize auto` (that copy int8 where our VNNI kernel runs), the copy re-made from the
      updated weights after every update (`refresh_view`, timed as part of the step).
  (b) equal math, float32 — TRL `bf16=False, gradient_checkpointing=False`; openseek `--precision float32
      --rollout-dtype float32 --rollout-quantize none` (rollouts sample the trained module itself).
  (c) equal math, bf16 — TRL `bf16=True, gradient_checkpointing=False`; openseek `--precision bf16 --rollout-dtype
      bfloat16 --rollout-quantize none` (bf16 rollouts, no int8). Where the CPU lacks native bf16, openseek refuses
      `--precision bf16` (it would run emulated); the pair is then reported as a skipped row, not run.

Threads are pinned: `--threads N` runs both sides on exactly N intra-op threads (openseek `--threads N`, which its
rollout Engine obeys too; TRL's process `torch.set_num_threads(N)`); `auto` adds a separate, labelled pair (a) with
openseek's `--threads auto` (its default: measured on the work) against TRL at torch's default count (all cores).

A step is timed the same way on both sides: wall clock from the end of one step to the end of the next, i.e.
everything — generation, rewards, reference log-probs, forward, backward, optimizer, openseek's rollout-copy refresh,
logging. The split: generation, scoring (rewards and log-probs of the rollout), update (the rest for TRL: its
forward/backward/optimizer and the Trainer's bookkeeping) and refresh (0 for TRL, which samples the trained module).
The first step of each run is a warm-up, not counted. Both sides' generated tokens per step are recorded; if the
medians differ by more than 10% the headline ratio is generated tokens per second instead of seconds per step, and
the output says so in capitals.

The runs alternate (every side of every pair in turn, then the next round in reverse order), each a fresh process,
with `uptime` and the read bandwidth measured just before each (this VM's speed drifts by up to 2× within minutes
as neighbours load its memory system). `--busy` adds one competing CPU-bound process for the whole measurement.

    .venv/bin/python benchmarks/grpo_step.py [--steps 6] [--rounds 2] [--pairs defaults float32 bf16]
                                             [--threads 2 auto] [--busy]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from openseek.tasks import get_task
from openseek.tokenizer import train_bpe

G, PROMPTS_PER_STEP, NEW_TOKENS, BETA, LR, FLOOR = 8, 2, 128, 0.04, 1e-6, 3.0
TOKEN_TOLERANCE = 0.10  # generated tokens per step may differ by this much before s/step stops being comparable

# pair: (label, TRL GRPOConfig overrides, openseek flags)
PAIRS = {
    "defaults": ("(a) defaults", {}, []),
    "float32": ("(b) equal math, float32", {"bf16": False, "gradient_checkpointing": False},
                ["--precision", "float32", "--rollout-dtype", "float32", "--rollout-quantize", "none"]),
    "bf16": ("(c) equal math, bf16", {"bf16": True, "gradient_checkpointing": False},
             ["--precision", "bf16", "--rollout-dtype", "bfloat16", "--rollout-quantize", "none"]),
}


def reward_digits(completions, prompts=None, **columns):
    """The custom reward both trainers call: the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def make_checkpoint(directory: Path) -> list[str]:
    """Save the bench model and tokenizer (transformers writes the weights); return the prompt texts."""
    import transformers

    rows = get_task("arithmetic").generate(2000, seed=0)
    tokenizer = train_bpe([f"{r['prompt']} {r['answer']}. {r['prompt'].lower()}" for r in rows], 8192)
    config = transformers.Qwen2Config(
        vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1408, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so sampling is far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"tokenizer: {tokenizer.vocab_size} tokens")
    return [r["prompt"] for r in rows[:64]]


class Refused(Exception):
    """A side that declined to run this configuration on this machine (its message says why)."""


def run_openseek(directory: Path, prompts_file: Path, steps: int, out: Path, flags: list[str],
                 threads: str) -> dict:
    """`openseek grpo` as a user runs it; per-step timings and generated tokens from its metrics.jsonl."""
    command = [sys.executable, "-m", "openseek.cli", "grpo", "--model", str(directory), "--dataset", str(prompts_file),
               "--reward", f"{Path(__file__).resolve()}:reward_digits", "--template", "plain",
               "--group-size", str(G), "--prompts-per-step", str(PROMPTS_PER_STEP), "--max-new-tokens",
               str(NEW_TOKENS), "--beta", str(BETA), "--lr", str(LR), "--steps", str(steps), "--output-dir", str(out),
               "--no-progress", "--threads", threads, *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        if "no native bf16" in result.stderr:
            raise Refused(result.stderr.strip().splitlines()[-1])
        raise RuntimeError(f"openseek grpo failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    steps_out = [{"step": m["time/wall"], "generation": m["time/generation"], "scoring": m["time/scoring"],
                  "update": m["time/update"], "refresh": m["time/refresh"],
                  "tokens": m["completion_length/mean"] * G * PROMPTS_PER_STEP} for m in rows]
    return {"steps": steps_out, "settings": f"precision {report.get('precision')}, threads "
                                            f"{sorted({m['threads'] for m in rows})}"}


def trl_child(directory: Path, prompts_file: Path, steps: int, out: Path, overrides: dict, threads: int) -> dict:
    """TRL's GRPOTrainer in this process (the child): per-step wall time, its split and generated tokens."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    steps_out, generation, rollout, tokens = [], [], [], []

    class Timer(transformers.TrainerCallback):  # a step: from the end of the previous one to the end of this one
        last = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:  # the first (warm-up) step starts here
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            wall, gen, roll = now - self.last, sum(generation), sum(rollout)
            steps_out.append({"step": wall, "generation": gen, "scoring": roll - gen, "update": wall - roll,
                              "refresh": 0.0, "threads": torch.get_num_threads()})
            generation[:], rollout[:], self.last = [], [], now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * G * PROMPTS_PER_STEP)

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=True,
        report_to="none", max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_level="error", **overrides,
    )
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(directory), callbacks=[Timer()])
    # timed only to report where TRL's step goes: generation, and the whole rollout (generation + rewards +
    # reference and old log-probs); the step's wall clock is the Timer's
    for name, into in (("_generate_single_turn", generation), ("_generate_and_score_completions", rollout)):
        def timed(*a, _inner=getattr(trainer, name), _into=into, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                _into.append(time.perf_counter() - start)

        setattr(trainer, name, timed)
    trainer.train()
    for row, n in zip(steps_out, tokens):
        row["tokens"] = n
    settings = (f"bf16 {args.bf16} (accelerate mixed precision: {trainer.accelerator.mixed_precision}), "
                f"gradient_checkpointing {args.gradient_checkpointing}, weights "
                f"{next(trainer.model.parameters()).dtype}, threads {sorted({r['threads'] for r in steps_out})}")
    return {"steps": steps_out, "settings": settings}


def run_trl(directory: Path, prompts_file: Path, steps: int, out: Path, overrides: dict, threads: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--trl-child", str(directory), str(prompts_file), str(steps),
                             str(out), json.dumps(overrides), "0" if threads == "auto" else threads,
                             "--new-tokens", str(NEW_TOKENS)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"TRL failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    global NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is a warm-up, not counted)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--threads", nargs="+", default=["2", "auto"],
                        help="a count pins both sides to it, in every pair; auto adds pair (a) at openseek's "
                             "--threads auto against TRL at torch's default count")
    parser.add_argument("--busy", action="store_true", help="one competing CPU-bound process throughout")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="max new tokens (smoke runs only: the "
                        f"claim is at {NEW_TOKENS})")
    parser.add_argument("--trl-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    NEW_TOKENS = args.new_tokens
    if args.trl_child:
        directory, prompts_file, steps, out, overrides, threads = args.trl_child
        print(json.dumps(trl_child(Path(directory), Path(prompts_file), int(steps), Path(out), json.loads(overrides),
                                   int(threads))))
        return
    from machine import state  # here: the module is also imported as the reward file, from elsewhere

    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step of each run is a warm-up)")
    # (pair, threads) combinations: every pair at every pinned count; `auto` only with the defaults pair
    combos = [(pair, t) for t in args.threads for pair in args.pairs if t != "auto" or pair == "defaults"]
    if not combos:
        parser.error("nothing to run: --threads auto goes only with --pairs defaults")
    runs = [(pair, t, side) for pair, t in combos for side in ("TRL", "openseek")]
    steps = {run: [] for run in runs}
    settings, refused, per_round = {}, {}, []
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            prompts = make_checkpoint(tmp / "model")
            prompts_file = tmp / "prompts.jsonl"
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            torch.set_num_threads(2)
            for r in range(args.rounds):
                per_round.append({})
                for run in runs if r % 2 == 0 else reversed(runs):
                    pair, t, side = run
                    if (pair, t) in refused:
                        continue
                    label, overrides, flags = PAIRS[pair]
                    out = tmp / f"run-{r}-{pair}-{t}-{side}"
                    machine = state()
                    try:
                        if side == "TRL":
                            result = run_trl(tmp / "model", prompts_file, args.steps, out, overrides, t)
                        else:
                            result = run_openseek(tmp / "model", prompts_file, args.steps, out, flags, t)
                    except Refused as e:
                        refused[pair, t] = f"openseek refused: {e}"
                        print(f"round {r + 1} {label}, threads {t}, {side}: SKIPPED ({e})", flush=True)
                        continue
                    settings[run] = result["settings"]
                    steps[run] += result["steps"][1:]
                    per_round[r][run] = median(result["steps"][1:], "step")
                    print(f"round {r + 1} {label}, threads {t}, {side}: median step {per_round[r][run]:.2f}s, "
                          f"{median(result['steps'][1:], 'tokens'):.0f} generated tokens/step  [before: {machine}]",
                          flush=True)
    finally:
        if hog is not None:
            hog.kill()

    print(f"\n{'busy' if args.busy else 'quiet'} machine; {NEW_TOKENS} new tokens; medians over {args.rounds} runs x {args.steps - 1} steps; "
          "step = wall clock end to end")
    for pair, t in combos:
        label = f"{PAIRS[pair][0]}, threads {t}"
        if (pair, t) in refused:
            print(f"{label}: SKIPPED on this machine ({refused[pair, t]})")
            continue
        summary = {}
        for side in ("TRL", "openseek"):
            rows = steps[pair, t, side]
            summary[side] = {"step": median(rows, "step"), "tokens": median(rows, "tokens")}
            split = ", ".join(f"{k} {median(rows, k):.2f}s" for k in ("generation", "scoring", "update", "refresh"))
            print(f"{label:36s} {side:8s} step {summary[side]['step']:6.2f}s ({split}); "
                  f"{summary[side]['tokens']:.0f} tokens/step, {summary[side]['tokens'] / summary[side]['step']:.0f} "
                  f"tokens/s; {settings[pair, t, side]}")
        trl, ours = summary["TRL"], summary["openseek"]
        gap = abs(ours["tokens"] - trl["tokens"]) / max(trl["tokens"], 1.0)
        if gap > TOKEN_TOLERANCE:
            ratio = (ours["tokens"] / ours["step"]) / (trl["tokens"] / trl["step"])
            headline = (f"GENERATED TOKENS DISAGREE BY {gap:.0%} (> {TOKEN_TOLERANCE:.0%}): s/step is not comparable; "
                        f"openseek {ratio:.2f}x TRL's generated tokens/s")
        else:
            ratio = trl["step"] / ours["step"]
            headline = f"tokens/step agree within {gap:.1%}; openseek {ratio:.2f}x TRL's speed (s/step)"
        rounds = [f"{rr[pair, t, 'TRL'] / rr[pair, t, 'openseek']:.2f}x" for rr in per_round
                  if (pair, t, "TRL") in rr and (pair, t, "openseek") in rr]
        claim = f" (claim >= {FLOOR}x: {'PASS' if ratio >= FLOOR else 'FAIL'})" if pair == "defaults" else ""
        print(f"{label}: {headline}{claim}; s/step ratio round by round {', '.join(rounds)}")


if __name__ == "__main__":
    main()
