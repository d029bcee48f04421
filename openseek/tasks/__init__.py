"""Verifiable tasks for RL and evaluation: generated problems with checkable answers, and math benchmark files.

A task makes rows `{"id", "prompt", "answer", ...}` reproducibly from a seed, keeps a held-out `test` split
disjoint from `train` (each problem's split is fixed by a hash of the problem itself, whatever the seed), writes
a worked solution for a row in the R1 format (`<think> steps </think><answer> x </answer>`, to pretrain a small
model on) and judges an extracted answer. `get_task("arithmetic:digits=4,ops=+-")` takes options after a colon.
"""

from __future__ import annotations

import hashlib
import random

from openseek.rewards import accuracy_reward, answers_match

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
TEMPLATES = ("r1-zero", "chat", "plain")


def format_prompt(question: str, template: str = "r1-zero", tokenizer=None) -> str:
    """The text the model continues: R1-Zero's template, the tokenizer's chat template, or the bare question."""
    if template == "r1-zero":
        return R1_ZERO_TEMPLATE.format(prompt=question)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("the chat template needs a tokenizer")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    if template == "plain":
        return question
    raise ValueError(f"unknown prompt template {template!r}: use one of {', '.join(TEMPLATES)}")


def r1_solution(steps: str, answer: str) -> str:
    return f"<think> {steps} </think><answer> {answer} </answer>"


def split_of(key: str, test_percent: int) -> str:
    """`test` for a fixed ~test_percent% of problems (by hash of the problem), `train` for the rest."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < test_percent else "train"


class Task:
    """A generated task. Subclasses draw one problem (`sample`), name it (`key`), solve and judge it."""

    name = "task"
    test_percent = 10
    reward = staticmethod(accuracy_reward)  # the GRPO reward that checks this task's answers

    def sample(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def key(self, row: dict) -> str:
        return row["id"]

    def solution(self, row: dict) -> str:
        raise NotImplementedError

    def is_correct(self, pred: str | None, row: dict) -> bool:
        return answers_match(pred, row["answer"])

    def same_answer(self, a: str, b: str) -> bool:
        """Whether two extracted answers are one vote in maj@k."""
        return answers_match(a, b)

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` distinct problems of `split` ("train" or "test"), the same for the same seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        rng = random.Random(f"{self.name}:{seed}:{split}")
        rows, seen = [], set()
        for _ in range(100 * n + 10_000):
            if len(rows) == n:
                return rows
            row = self.sample(rng)
            key = self.key(row)
            if key not in seen and split_of(key, self.test_percent) == split:
                seen.add(key)
                rows.append(row)
        raise ValueError(f"task {self.name}: found only {len(rows)} distinct {split} problems, {n} asked for")


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ValueError(f"task option {item!r} is not key=value")
        key, value = item.split("=", 1)
        options[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return options


def get_task(spec: str, **options) -> Task:
    """A built-in task by name, options after a colon: `arithmetic`, `arithmetic:digits=4,ops=+-*`, `countdown`."""
    from openseek.tasks.arithmetic import Arithmetic
    from openseek.tasks.countdown import Countdown

    tasks = {"arithmetic": Arithmetic, "countdown": Countdown}
    name, _, rest = spec.partition(":")
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(tasks)} (for a JSONL file use --dataset)")
    options = {**_parse_options(rest), **options}
    try:
        return tasks[name](**options)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: bad options {options} ({exc})") from exc


from openseek.tasks.math_file import DatasetError, load_math_file  # noqa: E402

__all__ = ["DatasetError", "R1_ZERO_TEMPLATE", "Task", "format_prompt", "get_task", "load_math_file", "split_of"]
