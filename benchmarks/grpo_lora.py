"""Claim (issue 15): a GRPO step with LoRA r = 16 on a Qwen2.5-0.5B-shaped model takes ≤ 0.5× the peak memory of
our full-parameter step and ≤ 0.7× that of TRL's GRPOTrainer with the same `peft` LoRA config, and is ≥ 2× faster
than TRL + PEFT.

Same HF checkpoint for all (random weights saved by transformers, Qwen2.5-0.5B's shape: hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings; a small BPE trained here), the same prompts
and custom reward, G = 8 completions for each of 2 prompts per step, `--new-tokens` new tokens, β = 0.04 (the
full-parameter run keeps a frozen copy as its reference; the LoRA runs use the base with adapters disabled), one
update per rollout, lr 1e-5, LoRA r = 16, α = 32, dropout 0 on q/k/v/o/gate/up/down_proj. Each of the three runs in
its own process, so its peak RSS (getrusage) is its own; on a GPU the peak allocated CUDA memory is printed too. A
step is everything: generation, rewards, reference log-probs, forward, backward and the optimizer; the first step
is a warm-up, not counted. Prints each run's median step time and peak memory, then the claim's three ratios.

    .venv/bin/python benchmarks/grpo_lora.py [--steps 6] [--new-tokens 64] [--device cpu|cuda] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SHAPE = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, max_position_embeddings=4096, tie_word_embeddings=True)
G, PROMPTS_PER_STEP, BETA, LR = 8, 2, 0.04, 1e-5
RANK, ALPHA, TARGETS = 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = ("openseek-full", "openseek-lora", "trl-peft")


def reward_digits(completions, prompts=None, **columns):
    """The custom reward every run calls: the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def make_checkpoint(directory: Path) -> None:
    """The bench model (transformers writes the weights), its tokenizer and the prompts."""
    import transformers

    from openseek.tasks import get_task
    from openseek.tokenizer import train_bpe

    rows = get_task("arithmetic").generate(2000, seed=0)
    tokenizer = train_bpe([f"{r['prompt']} {r['answer']}. {r['prompt'].lower()}" for r in rows], 8192)
    config = transformers.Qwen2Config(**SHAPE, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    (directory / "prompts.json").write_text(json.dumps([r["prompt"] for r in rows[:64]]))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)


def run_openseek(directory: Path, out: Path, args, lora: bool) -> list[float]:
    import openseek
    from openseek.tokenizer import Tokenizer
    from openseek.train.grpo import GRPOConfig
    from openseek.train.grpo import train as grpo_train
    from openseek.train.config import TrainConfig

    prompts = json.loads((directory / "prompts.json").read_text())
    grpo = GRPOConfig(group_size=G, prompts_per_step=PROMPTS_PER_STEP, max_new_tokens=args.new_tokens, beta=BETA,
                      loss_type="grpo", template="plain")
    extra = dict(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=",".join(TARGETS)) if lora else {}
    train_cfg = TrainConfig(run_dir=str(out), steps=args.steps, lr=LR, schedule="constant", weight_decay=0.0,
                            progress=False, device=args.device, threads=str(args.threads), **extra)  # as TRL's
    model = openseek.load(directory, dtype=torch.float32)
    grpo_train(model, Tokenizer.from_dir(directory), [{"prompt": p} for p in prompts], [reward_digits], grpo,
               train_cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["time/step"] for m in metrics]


def run_trl(directory: Path, out: Path, args) -> list[float]:
    import peft
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    times, started = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started[-1])

    cuda = args.device == "cuda"
    config = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G,
        gradient_accumulation_steps=1, max_completion_length=args.new_tokens, beta=BETA, num_iterations=1,
        loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant", temperature=1.0, use_cpu=not cuda,
        bf16=cuda, report_to="none", max_steps=args.steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_level="error",
    )
    prompts = json.loads((directory / "prompts.json").read_text())
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(directory), reward_funcs=reward_digits, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(directory),
                          callbacks=[Clock()], peft_config=lora)
    trainer.train()
    return times


def child(args) -> None:
    """One run in this process; prints one JSON line: median step seconds and peak memory."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    directory, out = Path(args.model), Path(args.out)
    if args.run == "trl-peft":
        import transformers

        transformers.logging.set_verbosity_error()
        times = run_trl(directory, out, args)
    else:
        times = run_openseek(directory, out, args, lora=args.run == "openseek-lora")
    result = {"run": args.run, "step_s": statistics.median(times[1:]), "steps": times,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps of each run (the first is a warm-up)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per completion")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=8, help="intra-op threads of each run")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "model")
        results = {}
        for run in RUNS:
            command = [sys.executable, __file__, "--run", run, "--model", str(tmp / "model"), "--out",
                       str(tmp / run), "--steps", str(args.steps), "--new-tokens", str(args.new_tokens),
                       "--device", args.device, "--threads", str(args.threads)]
            lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
            results[run] = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
            r = results[run]
            cuda = f", peak CUDA {r['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in r else ""
            print(f"{run:14s} step {r['step_s']:7.2f} s (median of {len(r['steps']) - 1}), "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB{cuda}", flush=True)
    memory = "peak_cuda_gb" if args.device == "cuda" else "peak_rss_gb"
    ours, full, trl = (results[r] for r in ("openseek-lora", "openseek-full", "trl-peft"))
    print(f"LoRA / full-parameter peak memory: {ours[memory] / full[memory]:.2f}× (claim ≤ 0.5×)")
    print(f"LoRA / TRL+PEFT peak memory:       {ours[memory] / trl[memory]:.2f}× (claim ≤ 0.7×)")
    print(f"TRL+PEFT / LoRA step time:         {trl['step_s'] / ours['step_s']:.2f}× (claim ≥ 2×)")


if __name__ == "__main__":
    main()
