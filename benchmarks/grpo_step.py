"""Claim: one GRPO step of `openseek grpo` is ≥3× faster than TRL's `GRPOTrainer` (transformers generate backend).

Same HF checkpoint (the ~27M qwen2 of benchmarks/generate.py: hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 8192, random weights saved by transformers), a small byte-level BPE trained here, the same
prompts, the same custom reward, G = 8 completions for each of 2 prompts per step, 128 new tokens, β = 0.04 (both
load a frozen reference), one update per rollout, GRPO loss (per-sequence mean), lr 1e-6, float32, CPU, 2 threads.
Both run in one process and alternate step by step: each trainer runs in its own thread (2 intra-op threads each)
and waits for its turn, so only one side computes at a time and both see the same conditions. A step is everything: generation, rewards,
reference log-probs, forward, backward and the optimizer. The first step of each is a warm-up, not counted.
Prints every step's wall and process CPU time, the medians and their ratios (wall time is the claim; CPU time is the
quieter measure on a shared machine).

    .venv/bin/python benchmarks/grpo_step.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

import openseek
from openseek.tasks import get_task
from openseek.tokenizer import train_bpe
from openseek.train import grpo as grpo_module
from openseek.train.grpo import GRPOConfig
from openseek.train.grpo import train as grpo_train
from openseek.train.trainer import TrainConfig, Trainer

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


class Turns:
    """One trainer running in its own thread, one step per turn: `step()` lets it run exactly one step and waits
    for it, returning (wall, process CPU) seconds of that step. The main thread hands out turns alternately, so
    the two trainers run under the same conditions (same kind of thread, 2 intra-op threads) and never together."""

    def __init__(self, train_fn):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.times: list[tuple[float, float]] = []
        self.error: BaseException | None = None

        def body():
            torch.set_num_threads(2)
            try:
                train_fn(self)
            except BaseException as exc:  # noqa: BLE001 — reported by step()
                self.error = exc
                self.done.release()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def begin(self) -> None:  # called by the trainer at the start of a step: wait for the turn
        self.go.acquire()
        self.start = (time.perf_counter(), time.process_time())

    def end(self) -> None:  # called by the trainer when the step is over
        self.times.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))
        self.done.release()

    def step(self) -> tuple[float, float]:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error
        return self.times[-1]


def train_openseek(turns: Turns, directory: Path, prompts: list[str], steps: int, out: Path) -> None:
    from openseek.tokenizer import Tokenizer

    model = openseek.load(directory, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(directory)
    grpo = GRPOConfig(group_size=G, prompts_per_step=PROMPTS_PER_STEP, max_new_tokens=NEW_TOKENS, beta=BETA,
                      loss_type="grpo", template="plain")
    train_cfg = TrainConfig(run_dir=str(out), steps=steps, lr=LR, schedule="constant", weight_decay=0.0,
                            progress=False, device="cpu")

    # A step starts when the loop rolls out and ends when it logs the step.
    roll_out, log = grpo_module.roll_out, Trainer.log

    def gated_roll_out(*args, **kwargs):
        turns.begin()
        return roll_out(*args, **kwargs)

    def gated_log(self, *args, **kwargs):
        log(self, *args, **kwargs)
        turns.end()

    grpo_module.roll_out, Trainer.log = gated_roll_out, gated_log
    try:
        grpo_train(model, tokenizer, [{"prompt": p} for p in prompts], [reward_digits], grpo, train_cfg)
    finally:
        grpo_module.roll_out, Trainer.log = roll_out, log


def train_trl(turns: Turns, directory: Path, prompts: list[str], steps: int, out: Path) -> None:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    class Gate(transformers.TrainerCallback):  # a step: everything between on_step_begin and on_step_end
        def on_step_begin(self, args, state, control, **kwargs):
            turns.begin()

        def on_step_end(self, args, state, control, **kwargs):
            turns.end()

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=True,
        bf16=False, report_to="none", max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_level="error",
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          callbacks=[Gate()])
    generate = trainer._generate_single_turn  # timed only to report where TRL's step goes

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            TRL_GENERATION.append(time.perf_counter() - start)

    trainer._generate_single_turn = timed_generate
    trainer.train()


TRL_GENERATION: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps of each (the first is a warm-up, not counted)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = make_checkpoint(tmp / "model")
        model = tmp / "model"
        trl = Turns(lambda turns: train_trl(turns, model, prompts, args.steps, tmp / "trl"))
        ours = Turns(lambda turns: train_openseek(turns, model, prompts, args.steps, tmp / "openseek"))
        times = {"trl": [], "openseek": []}
        for i in range(args.steps):
            order = (("trl", trl), ("openseek", ours)) if i % 2 == 0 else (("openseek", ours), ("trl", trl))
            for name, turns in order:
                times[name].append(turns.step())
            (trl_wall, trl_cpu), (our_wall, our_cpu) = times["trl"][-1], times["openseek"][-1]
            print(f"step {i + 1:2d}: TRL {trl_wall:6.2f}s (cpu {trl_cpu:6.2f}s)   "
                  f"openseek {our_wall:6.2f}s (cpu {our_cpu:6.2f}s)", flush=True)
        trl.thread.join()
        ours.thread.join()
        metrics = [json.loads(line) for line in (tmp / "openseek" / "metrics.jsonl").read_text().splitlines()][1:]
    split = {k: statistics.median(m[f"time/{k}"] for m in metrics) for k in ("generation", "scoring", "update")}
    print(f"TRL generation (median s): {statistics.median(TRL_GENERATION[1:]):.2f}")
    print("openseek step split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
          + " (scoring = rewards + reference log-probs; update = forward + backward + optimizer)")
    for i, what in enumerate(("wall", "process CPU")):
        trl_s = statistics.median(t[i] for t in times["trl"][1:])
        ours_s = statistics.median(t[i] for t in times["openseek"][1:])
        ratio = trl_s / ours_s
        print(f"median step ({what} time): TRL GRPOTrainer {trl_s:.2f}s, openseek grpo {ours_s:.2f}s -> "
              f"{ratio:.2f}x faster (floor {FLOOR}x: {'PASS' if ratio >= FLOOR else 'FAIL'})")


if __name__ == "__main__":
    main()
