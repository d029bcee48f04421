"""Countdown: combine the given numbers, each exactly once, with + - * / and parentheses to reach the target.

Problems are built backwards from a random chain of operations with whole intermediate results, so each has a
known solution: nums 3, 5, 12 → 51 is solved by `<think> 12+5=17 , 17*3=51 </think><answer> (12+5)*3 </answer>`.
Any other expression that uses the numbers once and reaches the target is credited too (exact arithmetic).
"""

from __future__ import annotations

import random
import re

from openseek.rewards import countdown_correct, countdown_reward
from openseek.tasks import Task, r1_solution


class Countdown(Task):
    reward = staticmethod(countdown_reward)

    def __init__(self, numbers: int = 3, max_number: int = 20, max_target: int = 200, test_percent: int = 10):
        if numbers < 2:
            raise ValueError("countdown needs at least 2 numbers")
        self.numbers, self.max_number, self.max_target, self.test_percent = numbers, max_number, max_target, test_percent
        self.name = f"countdown:numbers={numbers},max_number={max_number}"

    def sample(self, rng: random.Random) -> dict:
        while True:
            order = [rng.randint(1, self.max_number) for _ in range(self.numbers)]
            value, expression, steps = order[0], str(order[0]), []
            for n in order[1:]:
                choices = ["+", "*"] + (["-"] if value > n else []) + (["/"] if n > 1 and value % n == 0 else [])
                op = rng.choice(choices)
                new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
                steps.append(f"{value}{op}{n}={new}")
                loose = re.search(r"[+-]", expression) is not None
                expression = (f"({expression})" if op in "*/" and loose else expression) + f"{op}{n}"
                value = new
            if 1 <= value <= self.max_target:
                break
        nums = sorted(order)
        return {
            "id": f"{','.join(map(str, nums))}->{value}",
            "prompt": f"Using the numbers {', '.join(map(str, nums))}, each exactly once, with + - * / and "
                      f"parentheses, make {value}.",
            "answer": str(value),
            "nums": nums,
            "target": value,
            "solution_expression": expression,
            "solution_steps": steps,
        }

    def solution(self, row: dict) -> str:
        return r1_solution(" , ".join(row["solution_steps"]), row["solution_expression"])

    def is_correct(self, pred: str | None, row: dict) -> bool:
        return countdown_correct(pred, row["nums"], row["target"])

    def same_answer(self, a: str, b: str) -> bool:
        return re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b)
