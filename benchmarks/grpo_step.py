"""Claim: one GRPO step of `openseek grpo` is ≥3× faster than TRL's `GRPOTrainer` (transformers generate backend).

Same HF checkpoint (the ~27M qwen2 of benchmarks/generate.py: hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 8192, random weights saved by transformers), a small byte-level BPE trained here, the same
prompts, the same custom reward, G = 8 completions for each of 2 prompts per step, 128 new tokens, β = 0.04 (both
load a frozen reference), one update per rollout, GRPO loss (per-sequence mean), lr 1e-6, float32, CPU, 2 threads.
Both run in one process and alternate step by step: after each TRL step, one openseek step (its trainer runs in a
thread that waits for its turn, so only one side computes at a time). A step is everything: generation, rewards,
reference log-probs, forward, backward and the optimizer. The first step of each is a warm-up, not counted.
Prints every step, the medians and their ratio.

    .venv/bin/python benchmarks/grpo_step.py [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import openseek
from openseek.tasks import get_task
from openseek.tokenizer import train_bpe
from openseek.train import grpo as grpo_module
from openseek.train.grpo import GRPOConfig, Rollouts
from openseek.train.grpo import train as grpo_train
from openseek.train.trainer import TrainConfig

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


class Alternator:
    """Runs the openseek trainer in a thread, one step at a time, between TRL's steps (TRL's trainer owns the
    main thread). `step()` lets one openseek step run and waits for it; only one side computes at any time."""

    def __init__(self, directory: Path, prompts: list[str], steps: int, out: Path):
        import threading

        from openseek.tokenizer import Tokenizer

        model = openseek.load(directory, dtype=torch.float32)
        tokenizer = Tokenizer.from_dir(directory)
        grpo = GRPOConfig(group_size=G, prompts_per_step=PROMPTS_PER_STEP, max_new_tokens=NEW_TOKENS, beta=BETA,
                          loss_type="grpo", template="plain")
        train_cfg = TrainConfig(run_dir=str(out), steps=steps, lr=LR, schedule="constant", weight_decay=0.0,
                                progress=False, device="cpu")
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.step_times: list[float] = []
        gate = self

        class Gated(Rollouts):  # waits for its turn before each step; reports the step's time when it ends
            def __next__(self):
                gate.go.acquire()
                return super().__next__()

            def pop_metrics(self):
                metrics = super().pop_metrics()
                gate.step_times.append(metrics["time/step"])
                gate.done.release()
                return metrics

        def run():
            with patch_rollouts(Gated):
                grpo_train(model, tokenizer, [{"prompt": p} for p in prompts], [reward_digits], grpo, train_cfg)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def step(self) -> float:
        self.go.release()
        self.done.acquire()
        return self.step_times[-1]


class patch_rollouts:
    """Make `openseek.train.grpo.train` build the given Rollouts subclass."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        self.saved, grpo_module.Rollouts = grpo_module.Rollouts, self.cls

    def __exit__(self, *exc):
        grpo_module.Rollouts = self.saved


def run(directory: Path, prompts: list[str], steps: int, out: Path) -> dict[str, list[float]]:
    """TRL's GRPOTrainer for `steps` steps; after each of its steps, one openseek step."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    times = {"trl": [], "openseek": []}
    ours = Alternator(directory, prompts, steps, out / "openseek")

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.start)
            times["openseek"].append(ours.step())
            print(f"step {len(times['trl'])}: TRL {times['trl'][-1]:6.2f}s   openseek {times['openseek'][-1]:6.2f}s",
                  flush=True)

    args = TRLConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=True,
        bf16=False, report_to="none", max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_level="error",
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          callbacks=[StepTimer()])
    trainer.train()
    ours.thread.join()
    return times


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
        times = run(tmp / "model", prompts, args.steps, tmp)
    trl_s, ours_s = statistics.median(times["trl"][1:]), statistics.median(times["openseek"][1:])
    ratio = trl_s / ours_s
    print(f"\nmedian step: TRL GRPOTrainer {trl_s:.2f}s, openseek grpo {ours_s:.2f}s -> {ratio:.2f}x faster "
          f"(floor {FLOOR}x: {'PASS' if ratio >= FLOOR else 'FAIL'})")


if __name__ == "__main__":
    main()
