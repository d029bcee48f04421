"""Claim: one GRPO step of `openseek grpo` (its defaults) is ≥3× faster than TRL's `GRPOTrainer` (its defaults,
transformers generate backend), each run as its own process, as a user runs them.

Same HF checkpoint (the ~31M qwen2 of benchmarks/generate.py: hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 8192, random weights saved by transformers), a small byte-level BPE trained here, the same
prompts, the same custom reward, G = 8 completions for each of 2 prompts per step, 128 new tokens, β = 0.04 (both
load a frozen reference), one update per rollout, GRPO loss (per-sequence mean), lr 1e-6, CPU. TRL runs with
`use_cpu=True` and otherwise its defaults (float32 on CPU); openseek runs `openseek grpo` from the command line with
its defaults (`--precision auto`, `--threads auto`), and again with `--precision float32 --threads 2` (equal math).
The runs alternate (TRL, openseek, openseek-float32, then the next round in reverse order), each a fresh process; a
step is everything: generation, rewards, reference log-probs, forward, backward and the optimizer; the first step of
each run is a warm-up, not counted. Prints each run's median step and split (generation / scoring / update) and the
ratios, over all runs and round by round (this VM's speed drifts by up to 2× within minutes as neighbours load
its memory system; each run's line gives the read bandwidth measured just before it, so a reader can see the phase).
`--busy` adds one competing CPU-bound process for the whole measurement; `--skip-float32` leaves out the equal-math
run.

    .venv/bin/python benchmarks/grpo_step.py [--steps 6] [--rounds 2] [--busy] [--skip-float32]
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


def run_openseek(directory: Path, prompts_file: Path, steps: int, out: Path, *flags: str) -> list[dict]:
    """`openseek grpo` as a user runs it; per-step timings from its metrics.jsonl."""
    command = [sys.executable, "-m", "openseek.cli", "grpo", "--model", str(directory), "--dataset", str(prompts_file),
               "--reward", f"{Path(__file__).resolve()}:reward_digits", "--template", "plain",
               "--group-size", str(G), "--prompts-per-step", str(PROMPTS_PER_STEP), "--max-new-tokens",
               str(NEW_TOKENS), "--beta", str(BETA), "--lr", str(LR), "--steps", str(steps), "--output-dir", str(out),
               "--no-progress", *flags]
    subprocess.run(command, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": m["time/step"], "generation": m["time/generation"], "scoring": m["time/scoring"],
             "update": m["time/update"]} for m in rows]


def trl_child(directory: Path, prompts_file: Path, steps: int, out: Path) -> list[dict]:
    """TRL's GRPOTrainer in this process (the child): per-step wall time and the generation inside it."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    steps_out, generation = [], []

    class Timer(transformers.TrainerCallback):  # a step: everything between on_step_begin and on_step_end
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, generation[:] = time.perf_counter(), []

        def on_step_end(self, args, state, control, **kwargs):
            steps_out.append({"step": time.perf_counter() - self.start, "generation": sum(generation)})

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=True,
        report_to="none", max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_level="error",
    )
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(directory), callbacks=[Timer()])
    generate = trainer._generate_single_turn  # timed only to report where TRL's step goes

    def timed_generate(*a, **k):
        start = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            generation.append(time.perf_counter() - start)

    trainer._generate_single_turn = timed_generate
    trainer.train()
    return steps_out


def read_bandwidth() -> float:
    """GB/s of a 2-thread sum over 256 MiB (best of 3): the machine's phase just before a run."""
    x = torch.ones(2**26)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def run_trl(directory: Path, prompts_file: Path, steps: int, out: Path) -> list[dict]:
    result = subprocess.run([sys.executable, __file__, "--trl-child", str(directory), str(prompts_file), str(steps),
                             str(out)], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


SIDES = {
    "TRL GRPOTrainer": lambda d, p, n, o: run_trl(d, p, n, o),
    "openseek grpo (defaults)": lambda d, p, n, o: run_openseek(d, p, n, o),
    "openseek grpo --precision float32 --threads 2": lambda d, p, n, o: run_openseek(
        d, p, n, o, "--precision", "float32", "--threads", "2"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is a warm-up, not counted)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="one competing CPU-bound process throughout")
    parser.add_argument("--skip-float32", action="store_true", help="only TRL and openseek's defaults")
    parser.add_argument("--trl-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        directory, prompts_file, steps, out = args.trl_child
        print(json.dumps(trl_child(Path(directory), Path(prompts_file), int(steps), Path(out))))
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            prompts = make_checkpoint(tmp / "model")
            prompts_file = tmp / "prompts.jsonl"
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            sides = [name for name in SIDES if not (args.skip_float32 and "float32" in name)]
            steps, per_round = {name: [] for name in sides}, []
            torch.set_num_threads(2)
            for r in range(args.rounds):
                per_round.append({})
                for name in sides if r % 2 == 0 else reversed(sides):
                    bandwidth = read_bandwidth()
                    run = SIDES[name](tmp / "model", prompts_file, args.steps, tmp / f"run-{r}-{len(steps[name])}")
                    steps[name] += run[1:]
                    per_round[r][name] = statistics.median(s["step"] for s in run[1:])
                    print(f"round {r + 1} {name}: median step {per_round[r][name]:.2f}s (read bandwidth before: "
                          f"{bandwidth:.1f} GB/s)", flush=True)
    finally:
        if hog is not None:
            hog.kill()
    print(f"\n{'busy' if args.busy else 'quiet'} machine; median over {args.rounds} runs x {args.steps - 1} steps")
    medians = {}
    for name, rows in steps.items():
        medians[name] = statistics.median(s["step"] for s in rows)
        split = ", ".join(f"{k} {statistics.median(s[k] for s in rows):.2f}s" for k in ("generation", "scoring",
                                                                                       "update") if k in rows[0])
        print(f"{name:48s} step {medians[name]:6.2f}s   ({split})")
    trl = medians["TRL GRPOTrainer"]
    for name in sides[1:]:
        ratio = trl / medians[name]
        rounds = [f"{r['TRL GRPOTrainer'] / r[name]:.2f}x" for r in per_round]
        print(f"{name}: {ratio:.2f}x TRL's speed (floor {FLOOR}x: {'PASS' if ratio >= FLOOR else 'FAIL'}); "
              f"round by round {', '.join(rounds)}")


if __name__ == "__main__":
    main()
