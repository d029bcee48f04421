"""The demo's tasks: which problems it pretrains, reinforces and tests on, and the mixed-quality corpus it writes.

`arithmetic` (the default, `make demo`): 3-digit additions; most worked solutions forget the carries, a few carry
correctly, and GRPO turns the rare correct habit into the model's first choice.

`reflection`: R1's first finding in miniature, reasoning that grows longer under RL because longer pays. 3-digit
additions, three habits in the corpus:
- `direct` (most common): no working at all, the carries forgotten — `<think> </think><answer> 763 </answer>`;
- `careless` (common): the column steps with every carry forgotten (the default task's careless solution);
- `checked` (rare, `--correct-fraction`): the column steps, a result, then a check that adds the columns again the
  other way round (b + a), carrying correctly, and a verdict: `same`, or `differs` and the checked result taken.
  Its first pass forgets the carries half of the time, so half of the checked solutions correct themselves:
  `<think> 8+5=13 , 7+9=16 , 4+3=7 so 763 . check 5+8=13 , 9+7+1=17 , 3+4+1=8 so 873 . differs , take 873
  </think><answer> 873 </answer>`.
GRPO trains on all 3-digit problems; the held-out ones are the harder ones, with at least two carries (a third of
the problems), where every habit but the checked one fails: what is measured is whether the longer habit RL chose
carries over to the problems that need it most. (Held-out problems with more digits than the training ones, 4–5 and
then 4, were tried first: a model this small misreads numbers whose digits do not sit at fixed positions, and
reached 1–4% there whatever RL did; benchmarks/RESULTS.md.) The reward is the same rule-based accuracy + format as
the default task's: nothing rewards length.

`has_check` and `has_correction` are the documented pattern counters of the reflective steps: a completion contains
a check step when the word `check` appears in it, a correction when `differs` does.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from openseek.tasks import get_task
from openseek.tasks.arithmetic import _add_steps

CHECK = re.compile(r"\bcheck\b")
CORRECTION = re.compile(r"\bdiffers\b")


def has_check(completion: str) -> bool:
    return CHECK.search(completion) is not None


def has_correction(completion: str) -> bool:
    return CORRECTION.search(completion) is not None


def _careless_sums(a: int, b: int) -> tuple[list[str], int]:
    """The column steps with every carry forgotten and the number they spell (the last sum, then the earlier
    columns' last digits)."""
    width = max(len(str(a)), len(str(b)))
    columns = list(zip(str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]))
    sums = [int(x) + int(y) for x, y in columns]
    steps = [f"{x}+{y}={s}" for (x, y), s in zip(columns, sums)]
    return steps, int(str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1])))


def careless_solution(row: dict) -> str:
    """The same column method with every carry forgotten: 478 + 395 → `8+5=13 , 7+9=16 , 4+3=7` → 763."""
    steps, answer = _careless_sums(row["a"], row["b"])
    return f"<think> {' , '.join(steps)} </think><answer> {answer} </answer>"


def direct_solution(row: dict) -> str:
    """No working, the carries forgotten: 478 + 395 → `<think> </think><answer> 763 </answer>`."""
    return f"<think> </think><answer> {_careless_sums(row['a'], row['b'])[1]} </answer>"


def checked_solution(row: dict, careless_first: bool) -> str:
    """A first pass (carries forgotten when `careless_first`), then the check: b + a column by column, carrying
    correctly, and the verdict. The answer is always the checked (correct) sum."""
    a, b = row["a"], row["b"]
    first, first_sum = _careless_sums(a, b) if careless_first else (_add_steps(a, b), a + b)
    verdict = "same" if first_sum == a + b else f"differs , take {a + b}"
    return (f"<think> {' , '.join(first)} so {first_sum} . check {' , '.join(_add_steps(b, a))} so {a + b} . "
            f"{verdict} </think><answer> {a + b} </answer>")


@dataclass(frozen=True)
class DemoTask:
    """One demo task: the problems of each stage (task specs of `openseek.tasks.get_task`; rows whose numbers have
    fewer than `min_digits` digits are skipped), how a corpus document is written, and the flag defaults that
    differ from the default task's."""

    name: str
    description: str
    corpus: str  # the pretraining corpus's problems (train split)
    rl: str  # GRPO's problems (train split)
    heldout: str  # evaluation (test split: never in the corpus nor in RL)
    write: Callable[[dict, random.Random, float], str]  # (row, rng, correct_fraction) -> a worked solution
    min_digits: int = 1
    heldout_keep: Callable[[dict], bool] | None = None  # which held-out problems count (None: all)
    reasoning: bool = False  # log GRPO's completions and chart length, checks and corrections per step
    defaults: dict = field(default_factory=dict)

    def tasks(self) -> dict:
        return {role: get_task(spec) for role, spec in (("corpus", self.corpus), ("rl", self.rl),
                                                         ("heldout", self.heldout))}


def carries(row: dict) -> int:
    """How many columns of a + b carry into the next."""
    count, carry = 0, 0
    for x, y in zip(str(row["a"]).zfill(9)[::-1], str(row["b"]).zfill(9)[::-1]):
        carry = (int(x) + int(y) + carry) // 10
        count += carry
    return count


def _arithmetic_document(row: dict, rng: random.Random, correct_fraction: float) -> str:
    task = get_task("arithmetic:digits=3,ops=+")
    return task.solution(row) if rng.random() < correct_fraction else careless_solution(row)


def _reflection_document(row: dict, rng: random.Random, correct_fraction: float) -> str:
    draw = rng.random()
    if draw < correct_fraction:
        return checked_solution(row, careless_first=rng.random() < 0.5)
    return careless_solution(row) if draw < correct_fraction + (1 - correct_fraction) * 0.4 else direct_solution(row)


ADDITION = "arithmetic:digits=3,ops=+"
DEMO_TASKS = {
    "arithmetic": DemoTask(
        "arithmetic", "3-digit addition", ADDITION, ADDITION, ADDITION, _arithmetic_document, min_digits=3,
        defaults=dict(correct_fraction=0.3, pretrain_steps=800, grpo_steps=20, grpo_rounds=2, max_new_tokens=48,
                      grpo_lr=1e-4)),
    "reflection": DemoTask(
        "reflection", "3-digit addition, held out with two carries or more, where checking the result pays",
        ADDITION, ADDITION, ADDITION, _reflection_document, min_digits=3, heldout_keep=lambda row: carries(row) >= 2,
        reasoning=True,
        defaults=dict(correct_fraction=0.2, pretrain_steps=800, grpo_steps=60, grpo_rounds=3, max_new_tokens=80,
                      grpo_lr=5e-5)),
}


# ---- what RL did to the reasoning, step by step (R1's Figure 3) ----


def reasoning_curve(completions_path, keep: Callable[[str], bool] | None = None) -> list[dict]:
    """Per GRPO step, from the completions it trained on (`completions.jsonl`): how many were right, the mean length
    in tokens of the right ones and of the wrong ones separately (the Dr. GRPO check: length inflation shows as wrong
    answers growing), the share with a check step and with a correction, accuracy and format reward. A step without
    right (or wrong) completions has None for their length. `keep` takes only the completions whose text it
    accepts (`has_check`: the same figures within the checked habit, where a change of habit cannot move them)."""
    steps: dict[int, list[dict]] = {}
    with open(completions_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if keep is None or keep(row["completion"]):
                steps.setdefault(row["step"], []).append(row)
    curve = []
    for step, rows in sorted(steps.items()):
        right = [r["tokens"] for r in rows if r["rewards"]["accuracy_reward"] >= 1.0]
        wrong = [r["tokens"] for r in rows if r["rewards"]["accuracy_reward"] < 1.0]
        curve.append({
            "step": step, "completions": len(rows), "correct": len(right), "incorrect": len(wrong),
            "length_correct": sum(right) / len(right) if right else None,
            "length_incorrect": sum(wrong) / len(wrong) if wrong else None,
            "length": sum(r["tokens"] for r in rows) / len(rows),
            "check_share": sum(has_check(r["completion"]) for r in rows) / len(rows),
            "correction_share": sum(has_correction(r["completion"]) for r in rows) / len(rows),
            "accuracy": len(right) / len(rows),
            "format_reward": sum(r["rewards"]["format_reward"] for r in rows) / len(rows),
        })
    return curve


def window_mean(curve: list[dict], key: str, steps: slice) -> float | None:
    """The mean of `key` over the completions of a window of steps (`length_correct` weighs each step by its right
    completions, `length_incorrect` by its wrong ones, the shares by all), or None when the window has none."""
    weight = {"length_correct": "correct", "length_incorrect": "incorrect"}.get(key, "completions")
    rows = [row for row in curve[steps] if row[key] is not None]
    total = sum(row[weight] for row in rows)
    return sum(row[key] * row[weight] for row in rows) / total if total else None


def growth(curve: list[dict], key: str, window: int = 10) -> float | None:
    """Last-`window` over first-`window` GRPO steps' mean of `key` (R1's "response length grows")."""
    first, last = window_mean(curve, key, slice(0, window)), window_mean(curve, key, slice(-window, None))
    return last / first if first and last is not None else None


def plot_reasoning(curve: list[dict], heldout: list[tuple[int, float]], path) -> None:
    """Response length (right and wrong answers apart) beside accuracy, per GRPO step, as R1's Figure 3 pairs them;
    the share of completions with a check step and with a correction beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in curve]
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, label in (("length_correct", "correct"), ("length_incorrect", "incorrect"), ("length", "all")):
        ax[0].plot(steps, [row[key] for row in curve], label=label, linewidth=1.2 if key != "length" else 0.8)
    ax[0].set(title="response length (tokens)", xlabel="GRPO step")
    ax[0].legend()
    ax[1].plot(steps, [row["accuracy"] for row in curve], label="training samples (T=1)", linewidth=1)
    ax[1].plot([s for s, _ in heldout], [a for _, a in heldout], marker="o", label="held-out, harder (greedy)")
    ax[1].set(title="accuracy", xlabel="GRPO step", ylim=(0, 1))
    ax[1].legend()
    ax[2].plot(steps, [row["check_share"] for row in curve], label="with a check step")
    ax[2].plot(steps, [row["correction_share"] for row in curve], label="with a correction")
    ax[2].set(title="reflective steps (share of completions)", xlabel="GRPO step", ylim=(0, 1))
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
