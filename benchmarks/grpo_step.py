"""Claim: one GRPO step of `openseek grpo` is ≥3× faster than TRL's `GRPOTrainer` (transformers generate backend).

Same HF checkpoint (the ~27M qwen2 of benchmarks/generate.py: hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 8192, random weights saved by transformers), a small byte-level BPE trained here, the same
prompts, the same custom reward, G = 8 completions for each of 2 prompts per step, 128 new tokens, β = 0.04 (both
load a frozen reference), one update per rollout, GRPO loss (per-sequence mean), lr 1e-6, float32, CPU, 2 threads.
The two run in one process, alternating round by round; each round is a fresh trainer for `--steps` steps and the
first step of every round is a warm-up that is not counted. A step is everything: generation, rewards, reference
log-probs, forward, backward and the optimizer. Prints every step, the medians and their ratio.

    .venv/bin/python benchmarks/grpo_step.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import openseek
from openseek.tasks import get_task
from openseek.tokenizer import train_bpe
from openseek.train.grpo import GRPOConfig
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


def run_trl(directory: Path, prompts: list[str], steps: int, out: Path) -> list[float]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=True,
        bf16=False, report_to="none", max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          callbacks=[StepTimer()])
    trainer.train()
    return times


def run_openseek(directory: Path, prompts: list[str], steps: int, out: Path, seed: int) -> list[float]:
    from openseek.tokenizer import Tokenizer

    model = openseek.load(directory, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(directory)
    grpo = GRPOConfig(group_size=G, prompts_per_step=PROMPTS_PER_STEP, max_new_tokens=NEW_TOKENS, beta=BETA,
                      loss_type="grpo", template="plain")
    train_cfg = TrainConfig(run_dir=str(out), steps=steps, lr=LR, schedule="constant", weight_decay=0.0,
                            progress=False, seed=seed, device="cpu")
    grpo_train(model, tokenizer, [{"prompt": p} for p in prompts], [reward_digits], grpo, train_cfg)
    return [json.loads(line)["time/step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per round (the first is not counted)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    times = {"trl": [], "openseek": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = make_checkpoint(tmp / "model")
        for r in range(args.rounds):
            order = ("trl", "openseek") if r % 2 == 0 else ("openseek", "trl")
            for name in order:
                out = tmp / f"{name}-{r}"
                if name == "trl":
                    steps = run_trl(tmp / "model", prompts, args.steps, out)
                else:
                    steps = run_openseek(tmp / "model", prompts, args.steps, out, seed=r)
                times[name] += steps[1:]
                print(f"round {r} {name:9s} step times: " + " ".join(f"{s:.2f}s" for s in steps), flush=True)
    trl_s, ours_s = statistics.median(times["trl"]), statistics.median(times["openseek"])
    ratio = trl_s / ours_s
    print(f"\nmedian step: TRL GRPOTrainer {trl_s:.2f}s, openseek grpo {ours_s:.2f}s -> {ratio:.2f}x faster "
          f"(floor {FLOOR}x: {'PASS' if ratio >= FLOOR else 'FAIL'})")


if __name__ == "__main__":
    main()
