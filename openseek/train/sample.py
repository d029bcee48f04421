"""`openseek sample`: rejection sampling (R1's stage 3). k completions per prompt from the Engine; those every
reward accepts become SFT conversations.

    openseek sample --model runs/grpo/checkpoints/step_00000200 --task countdown --k 8 --output sft.jsonl

Each kept completion is written as one JSONL line, ready for `openseek sft`:

    {"messages": [{"role": "user", "content": <the question>},
                  {"role": "assistant", "content": "<think>\\n<reasoning>\\n</think>\\n\\n<answer>"}],
     "id": ..., "rewards": {...}}

A completion is accepted when every reward function gives it at least `--min-reward` (default 1: correct and, with
the default rewards, well formatted). Rows are written as they are accepted to `<output>.partial`, which is renamed
to `<output>` at the end, so an interrupted run keeps what it found and never leaves a file that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

import openseek
from openseek.device import resolve_device
from openseek.flags import add_compile_argument, add_precision_arguments, add_threads_argument
from openseek.tasks import TEMPLATES
from openseek.tokenizer import THINK, prompt_opens_reasoning
from openseek.train.rollout import generate_and_score, load_rows, resolve_rewards, unique_names
from openseek.tokenizer import load_tokenizer

_THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


def to_messages(question: str, prompt_text: str, completion: str) -> list[dict]:
    """The user question and the assistant turn with its reasoning inside <think>. A template that opened the
    think block itself (R1's chat template) gave a completion that starts inside it."""
    if prompt_opens_reasoning(prompt_text):
        completion = THINK + completion
    match = _THINK.match(completion)
    reasoning, answer = (match.group(1), match.group(2)) if match else ("", completion)
    content = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.strip()}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": content}]


def sample(model, tokenizer, rows: list[dict], reward_fns: list, output, k: int = 4, max_new_tokens: int = 512,
           temperature: float = 0.7, top_p: float = 0.95, template: str = "chat", min_reward: float = 1.0,
           keep_per_prompt: int | None = None, batch_prompts: int = 16, seed: int = 0, progress: bool = True,
           threads: int | None = None, compile: bool = False, cuda_graphs: bool = False) -> dict:
    """Generate k completions per row, keep the accepted ones (deduplicated), write them to `output` as messages
    JSONL (with the decode step compiled when `compile`, replayed as CUDA graphs when `cuda_graphs`). Returns
    counts: prompts, completions, accepted, prompts_with_accepted."""
    from tqdm import tqdm

    from openseek.engine import Engine

    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    engine = Engine(model, max_batch_size=max(64, min(batch_prompts * k, 256)), threads=threads,
                    compile=compile, cuda_graphs=cuda_graphs)
    names = unique_names(reward_fns)
    counts = {"prompts": 0, "completions": 0, "accepted": 0, "prompts_with_accepted": 0}
    bar = tqdm(total=len(rows), desc="sample", unit="prompt", disable=not progress)
    with partial.open("w", encoding="utf-8") as out:
        for start in range(0, len(rows), batch_prompts):
            chunk = rows[start : start + batch_prompts]
            scored = generate_and_score(engine, tokenizer, chunk, reward_fns, n=k, template=template,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed + start)
            completions, texts, rewards = scored.texts, scored.prompt_texts, scored.per_fn.tolist()
            for p, row in enumerate(chunk):
                kept = {}
                for i in range(p * k, (p + 1) * k):
                    values = [r[i] for r in rewards]
                    if all(v >= min_reward for v in values) and completions[i] not in kept:
                        kept[completions[i]] = dict(zip(names, values))
                kept = list(kept.items())[:keep_per_prompt]
                for completion, values in kept:
                    record = {"messages": to_messages(row["prompt"], texts[p], completion),
                              "id": row.get("id", start + p), "rewards": values}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["accepted"] += len(kept)
                counts["prompts_with_accepted"] += bool(kept)
            out.flush()
            counts["prompts"] += len(chunk)
            counts["completions"] += len(completions)
            bar.update(len(chunk))
            bar.set_postfix(accepted=counts["accepted"])
    bar.close()
    os.replace(partial, output)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (HF format, with its tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--dataset", help="JSONL prompts: `prompt`, `question` or `problem`, maybe `answer`")
    parser.add_argument("--task", help="built-in task instead of a dataset: arithmetic, countdown")
    parser.add_argument("--task-size", type=int, default=1000, help="prompts generated from --task")
    parser.add_argument("--reward", action="append",
                        help="reward that must accept a completion: format, accuracy, countdown or file.py:function "
                             "(repeatable; default: the task's checker + format)")
    parser.add_argument("--min-reward", type=float, default=1.0, help="each reward must be at least this")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--keep-per-prompt", type=int, help="at most this many accepted completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--template", default="chat", choices=TEMPLATES)
    parser.add_argument("--batch-prompts", type=int, default=16, help="prompts generated together")
    parser.add_argument("--output", required=True, help="JSONL file of accepted `messages`")
    parser.add_argument("--seed", type=int, default=0)
    add_precision_arguments(parser)
    add_compile_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def main(args: argparse.Namespace) -> int:
    rows, task = load_rows(args)
    reward_fns, _ = resolve_rewards(args.reward, task, rows)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = openseek.load(args.model, dtype=args.dtype or torch.float32, device=resolve_device("auto"),
                          quantize=args.quantize, group_size=args.group_size)
    counts = sample(model, tokenizer, rows, reward_fns, args.output, k=args.k, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, template=args.template,
                    min_reward=args.min_reward, keep_per_prompt=args.keep_per_prompt,
                    batch_prompts=args.batch_prompts, seed=args.seed, progress=args.progress,
                    threads=args.threads, compile=args.compile, cuda_graphs=args.cuda_graphs)
    rate = counts["accepted"] / max(1, counts["completions"])
    print(f"kept {counts['accepted']} of {counts['completions']} completions ({rate:.1%}); "
          f"{counts['prompts_with_accepted']} of {counts['prompts']} prompts have one -> {args.output}")
    return 0
