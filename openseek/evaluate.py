"""`openseek eval`: DeepSeek-R1's evaluation protocol on built-in tasks, benchmark files or completions made elsewhere.

    openseek eval --model DIR --task arithmetic --n 16 --k 1,4,16 --output-dir runs/eval
    openseek eval --model DIR --dataset math500.jsonl --temperature 0.6 --top-p 0.95 --output-dir runs/eval
    openseek eval --completions vllm_outputs.jsonl --output-dir runs/eval      # rows {"id", "answer", "completions"}

Each problem gets n samples from the Engine; every completion is judged by the shared answer checking
(`openseek.rewards`). Metrics, each with its standard error across problems:
- pass@1: the mean over the n samples (R1 reports this rather than greedy accuracy, which is noisy for long CoT);
- pass@k: Chen et al.'s unbiased estimator 1 - C(n-c, k) / C(n, k) for c correct of n, for each k ≤ n;
- maj@k: majority vote over the extracted answers of k samples, averaged over the n // k disjoint groups of k
  consecutive samples. Answers that are correct form one vote (they all equal the gold answer); wrong answers
  vote together when they are equivalent to each other; completions without an answer do not vote. A tie goes to
  the answer whose first vote came earliest in the group; a group with no answer at all scores 0;
- greedy accuracy: at temperature 0 (then n = 1), or from an extra greedy pass with `--greedy`.
Outputs: OUT/summary.json, OUT/results.jsonl (one row per problem: id, answer, completions, extracted answers,
`correct` per completion) and OUT/results.md, the table also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from openseek.flags import add_compile_argument, add_precision_arguments, add_threads_argument
from openseek.rewards import check_answers, extract_answer
from openseek.tasks import TEMPLATES, Task, format_prompt, get_task, load_math_file
from openseek.tasks.math_file import DatasetError, _gold, jsonl_objects


# ---- metrics ------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): the chance that k of the n samples, drawn without replacement,
    include at least one of the c correct ones."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(classes: list[int | None]) -> int | None:
    """The class with most votes (None = no answer, no vote); a tie goes to the class that voted first."""
    counts: dict[int, int] = {}
    for cls in classes:
        if cls is not None:
            counts[cls] = counts.get(cls, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(cls for cls in classes if cls is not None and counts[cls] == best)


def maj_at_k(classes: list[int | None], correct_class: int, k: int) -> float:
    """maj@k for one problem: the share of the n // k consecutive groups of k samples whose vote is correct."""
    groups = [classes[i : i + k] for i in range(0, len(classes) - k + 1, k)]
    return sum(majority_vote(g) == correct_class for g in groups) / len(groups)


CORRECT = 0  # the answer class of every correct completion


def answer_classes(extracted: list[str | None], correct: list[bool],
                   same: Callable[[list[tuple[str, str]]], list[bool]]) -> list[int | None]:
    """Give each completion its vote: CORRECT for correct ones, a shared class for equivalent wrong answers
    (`same` judges pairs of distinct wrong answers), None when there is no answer."""
    wrong = sorted({a for a, ok in zip(extracted, correct) if a is not None and not ok}, key=extracted.index)
    pairs = [(wrong[i], wrong[j]) for i in range(len(wrong)) for j in range(i)]
    equal = dict(zip(pairs, same(pairs))) if pairs else {}
    class_of: dict[str, int] = {}
    for i, answer in enumerate(wrong):
        class_of[answer] = next((class_of[wrong[j]] for j in range(i) if equal[(answer, wrong[j])]), i + 1)
    return [CORRECT if ok else None if a is None else class_of[a] for a, ok in zip(extracted, correct)]


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def check_ks(ks: list[int], n: int) -> list[int]:
    for k in ks:
        if k < 1:
            raise ValueError(f"k={k}: k must be at least 1")
        if k > n:
            raise ValueError(f"k={k} > n={n}: pass@k and maj@k need at least k samples per problem "
                             f"(raise --n to {k} or drop k={k})")
    return sorted(set(ks))


def default_ks(n: int) -> list[int]:
    return sorted({k for k in (1, 4, 16, 64) if k <= n} | {n})


# ---- scoring ------------------------------------------------------------------------------------------------

@dataclass
class Checker:
    """How a problem's completions are judged: correctness against the row, and equivalence of two answers."""

    is_correct: Callable[[list[tuple[str | None, dict]]], list[bool]]
    same: Callable[[list[tuple[str, str]]], list[bool]]

    @classmethod
    def for_task(cls, task: Task | None) -> Checker:
        if task is None:  # math answers: batched math-verify checks
            return cls(lambda items: check_answers([(p, row["answer"]) for p, row in items]), check_answers)
        return cls(lambda items: [task.is_correct(p, row) for p, row in items],
                   lambda pairs: [task.same_answer(a, b) for a, b in pairs])


def score_rows(rows: list[dict], checker: Checker) -> list[dict]:
    """Add `extracted`, `correct` and `classes` (maj@k votes) to rows that carry `completions`."""
    extracted = [[extract_answer(c) for c in row["completions"]] for row in rows]
    verdicts = iter(checker.is_correct([(a, row) for row, answers in zip(rows, extracted) for a in answers]))
    for row, answers in zip(rows, extracted):
        row["extracted"] = answers
        row["correct"] = [next(verdicts) for _ in answers]
        row["classes"] = answer_classes(answers, row["correct"], checker.same)
    return rows


def summarize(rows: list[dict], ks: list[int]) -> dict:
    """Every metric (and its standard error across problems) from scored rows."""
    if not rows:
        raise ValueError("nothing to summarize: no problems")
    n_min = min(len(r["correct"]) for r in rows)
    ks = check_ks(ks, n_min)
    metrics: dict[str, float] = {}

    def add(name: str, per_problem: list[float]) -> None:
        metrics[name], metrics[f"{name}_stderr"] = _mean_and_stderr(per_problem)

    add("pass@1", [sum(r["correct"]) / len(r["correct"]) for r in rows])
    for k in ks:
        if k > 1:
            add(f"pass@{k}", [pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in rows])
    for k in ks:
        add(f"maj@{k}", [maj_at_k(r["classes"], CORRECT, k) for r in rows])
    if all("greedy" in r for r in rows):
        add("greedy_accuracy", [float(r["greedy"]["correct"]) for r in rows])
    completions = [a for r in rows for a in r["extracted"]]
    metrics["answered"] = sum(a is not None for a in completions) / len(completions)
    return {"metrics": metrics, "problems": len(rows), "n": n_min, "k": ks}


def markdown_table(summary: dict) -> str:
    metrics = summary["metrics"]
    lines = ["| metric | value | ± stderr |", "|---|---|---|"]
    for name, value in metrics.items():
        if not name.endswith("_stderr"):
            err = metrics.get(f"{name}_stderr")
            lines.append(f"| {name} | {100 * value:.2f}% | {'' if err is None else f'{100 * err:.2f}%'} |")
    return "\n".join(lines) + "\n"


# ---- generation ---------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """How completions are drawn (recorded in summary.json)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    template: str = "r1-zero"


def generate(engine, tokenizer, prompts: list[str], sampling: Sampling, progress: bool = True,
             desc: str = "eval") -> list[list[dict]]:
    """n completions per prompt text: [{"text", "tokens", "finish_reason"}, ...], in chunks that fill the
    engine's batch, with a progress bar over problems."""
    from tqdm import tqdm

    from openseek.engine import stop_token_ids

    encoded = [tokenizer.encode(p, add_special_tokens=sampling.template != "chat") for p in prompts]
    per_call = max(1, engine.max_batch_size // sampling.n)
    outputs = []
    with tqdm(total=len(prompts), desc=desc, unit="problem", disable=not progress) as bar:
        for start in range(0, len(encoded), per_call):
            batch = engine.generate(
                encoded[start : start + per_call], max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, n=sampling.n, seed=sampling.seed + start,
                stop_token_ids=stop_token_ids(engine.cfg, tokenizer),
            )
            for samples in batch:
                outputs.append([
                    {"text": tokenizer.decode(s.token_ids, skip_special_tokens=True), "tokens": len(s.token_ids),
                     "finish_reason": s.finish_reason}
                    for s in samples
                ])
            bar.update(len(batch))
    return outputs


@dataclass
class EvalResult:
    summary: dict
    rows: list[dict] = field(repr=False)

    @property
    def accuracy(self) -> float:
        """pass@1 (the mean over samples): the number to track during training."""
        return self.summary["metrics"]["pass@1"]

    def markdown(self) -> str:
        return markdown_table(self.summary)


def evaluate(model_or_engine, tokenizer, rows: list[dict], *, task: Task | None = None, n: int = 1,
             ks: list[int] | None = None, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512,
             template: str = "r1-zero", seed: int = 0, greedy: bool = False, progress: bool = True) -> EvalResult:
    """Generate n completions per row (`prompt`, `answer`, task columns) and score them. Takes a Model or an
    Engine; `task` judges with the task's own check (countdown), else answers are checked with math-verify."""
    from openseek.engine import Engine

    if temperature == 0 and n > 1:
        raise ValueError(f"temperature 0 makes all {n} samples identical: use n=1 (or sample with temperature > 0)")
    ks = check_ks(ks or default_ks(n), n)
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}: use one of {', '.join(TEMPLATES)}")
    engine = model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine)
    sampling = Sampling(n, temperature, top_p, max_new_tokens, seed, template)
    prompts = [format_prompt(r["prompt"], template, tokenizer) for r in rows]
    started = time.time()
    outputs = generate(engine, tokenizer, prompts, sampling, progress)
    results = [{**row, "completions": [o["text"] for o in out], "tokens": [o["tokens"] for o in out],
                "finish_reasons": [o["finish_reason"] for o in out]} for row, out in zip(rows, outputs)]
    checker = Checker.for_task(task)
    score_rows(results, checker)
    if temperature == 0:
        for row in results:
            row["greedy"] = {"completion": row["completions"][0], "extracted": row["extracted"][0],
                             "correct": row["correct"][0]}
    elif greedy:
        greedy_outputs = generate(engine, tokenizer, prompts, Sampling(1, 0.0, 1.0, max_new_tokens, seed, template),
                                  progress, desc="eval (greedy)")
        greedy_texts = [out[0]["text"] for out in greedy_outputs]
        answers = [extract_answer(t) for t in greedy_texts]
        for row, text, answer, ok in zip(results, greedy_texts, answers, checker.is_correct(list(zip(answers, results)))):
            row["greedy"] = {"completion": text, "extracted": answer, "correct": ok}
    summary = summarize(results, ks)
    tokens = [t for r in results for t in r["tokens"]]
    summary["metrics"]["truncated"] = sum(f == "length" for r in results for f in r["finish_reasons"]) / len(tokens)
    summary.update(
        sampling=vars(sampling), mean_completion_tokens=sum(tokens) / len(tokens),
        seconds=round(time.time() - started, 3),
    )
    return EvalResult(summary, results)


# ---- completions made elsewhere -----------------------------------------------------------------------------

def load_completions(path) -> list[dict]:
    """Rows {"id", "answer", "completions": [str, ...], ...} from JSONL. `id` keeps its JSON type (7 stays 7,
    "7" stays "7") into results.jsonl; a row without one is named by its line number, as a string."""
    rows = []
    for where, line_no, row in jsonl_objects(path):
        completions = row.get("completions")
        if completions is None:
            raise DatasetError(f"{where}: field 'completions' is missing (the row has: {', '.join(row) or 'no fields'})")
        if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
            raise DatasetError(f"{where}: field 'completions' must be a non-empty list of strings")
        rows.append({**row, "id": row.get("id", str(line_no)), "answer": _gold(row, where)})
    return rows


def score_completions(rows: list[dict], ks: list[int] | None = None, task: Task | None = None) -> EvalResult:
    """Score completions made elsewhere with the same checks and metrics as generated ones."""
    n_min = min(len(r["completions"]) for r in rows)
    ks = check_ks(ks or default_ks(n_min), n_min)
    results = score_rows([dict(r) for r in rows], Checker.for_task(task))
    return EvalResult(summarize(results, ks), results)


# ---- output -------------------------------------------------------------------------------------------------

def write_outputs(result: EvalResult, output_dir, **about) -> Path:
    """summary.json, results.jsonl and results.md in `output_dir` (each written whole, then renamed)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**about, **result.summary, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    keep = ("id", "prompt", "answer", "completions", "extracted", "correct", "greedy", "tokens", "finish_reasons")
    files = {
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "results.jsonl": "".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in result.rows),
        "results.md": markdown_table(result.summary),
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out


# ---- command line -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (HF format, with its tokenizer) or hub id")
    source.add_argument("--completions", help="score completions made elsewhere: JSONL rows {id, answer, completions}")
    parser.add_argument("--task", help="built-in task, e.g. arithmetic, arithmetic:digits=4,ops=+-, countdown")
    parser.add_argument("--dataset", help="benchmark JSONL (question/problem/prompt + answer; GSM8K '#### n' parsed)")
    parser.add_argument("--num-problems", type=int, default=None,
                        help="problems to evaluate (default: all of a dataset, 200 held-out ones of a task)")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 16; 1 at temperature 0)")
    parser.add_argument("--k", default=None, help="comma-separated k for pass@k and maj@k (default 1,4,16,n up to n)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--template", choices=TEMPLATES, default="r1-zero",
                        help="prompt: R1-Zero's template, the model's chat template, or the bare question")
    parser.add_argument("--greedy", action="store_true", help="also run a greedy pass and report greedy accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_precision_arguments(parser)
    add_compile_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="rows the engine decodes at once")
    parser.add_argument("--output-dir", required=True)


def _parse_ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k must be comma-separated integers, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad input (files, flags, k > n): the reason, without a traceback
        print(f"openseek eval: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    ks = _parse_ks(args.k)
    task = get_task(args.task) if args.task else None
    if args.completions:
        if args.dataset:
            raise ValueError("--completions rows carry their own answers: do not pass --dataset")
        rows = load_completions(args.completions)
        result = score_completions(rows[: args.num_problems], ks, task)
        about = {"completions": str(args.completions), "task": task.name if task else None}
    else:
        if bool(task) == bool(args.dataset):
            raise ValueError("--model needs exactly one of --task NAME or --dataset FILE.jsonl")
        n = args.n if args.n is not None else (1 if args.temperature == 0 else 16)
        if args.temperature == 0 and n > 1:
            raise ValueError(f"--temperature 0 makes all {n} samples identical: use --n 1")
        ks = check_ks(ks or default_ks(n), n)  # refuse k > n before loading anything
        if task:
            rows = task.generate(args.num_problems or 200, seed=args.seed, split="test")
        else:
            rows = load_math_file(args.dataset)[: args.num_problems]
        import openseek
        from openseek.device import resolve_device
        from openseek.tokenizer import Tokenizer

        device = str(resolve_device(args.device))
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        model = openseek.load(args.model, dtype=dtype, device=device, quantize=args.quantize,
                              group_size=args.group_size).eval()
        tokenizer = Tokenizer.from_dir(args.tokenizer or args.model)
        engine = openseek.Engine(model, max_batch_size=args.batch_size, threads=args.threads, compile=args.compile,
                                 cuda_graphs=args.cuda_graphs)
        result = evaluate(engine, tokenizer, rows, task=task, n=n, ks=ks, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, template=args.template,
                          seed=args.seed, greedy=args.greedy)
        about = {"model": str(args.model), "task": task.name if task else None,
                 "dataset": str(args.dataset) if args.dataset else None, "device": device, "dtype": dtype,
                 "quantize": args.quantize}
    out = write_outputs(result, args.output_dir, **about)
    print(result.markdown(), end="")
    print(f"wrote {out / 'summary.json'}, {out / 'results.jsonl'} and {out / 'results.md'}")
    return 0
