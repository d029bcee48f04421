"""Multi-digit arithmetic: a + b, a - b (a ≥ b) and a * b, solved column by column from the last digit.

The worked solution is short and mechanical, so a ~1M-parameter model can pick the method up from pretraining
and RL can sharpen it: 478 + 395 → `<think> 8+5=13 , 7+9+1=17 , 4+3+1=8 </think><answer> 873 </answer>`
(a `+1`/`-1` carries or borrows into the next column; the answer is the last result then the earlier last digits).

`min_digits` draws problems of varying length instead: a digit count between `min_digits` and `digits`, uniformly,
then numbers of exactly that many digits (the multiplier keeps `multiplier_digits`), so short and long problems are
equally common and a split by digit count (train on short ones, test on long ones) is a split by difficulty.
"""

from __future__ import annotations

import random

from openseek.tasks import Task, r1_solution


class Arithmetic(Task):
    def __init__(self, digits: int = 3, ops: str = "+", multiplier_digits: int = 1, test_percent: int = 10,
                 min_digits: int | None = None):
        if digits < 1 or multiplier_digits < 1:
            raise ValueError("digits and multiplier_digits must be at least 1")
        if min_digits is not None and not 1 <= min_digits <= digits:
            raise ValueError(f"min_digits must be between 1 and digits ({digits}), not {min_digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be made of + - *, not {ops!r}")
        self.digits, self.ops, self.multiplier_digits, self.test_percent = digits, ops, multiplier_digits, test_percent
        self.min_digits = min_digits
        self.name = (f"arithmetic:digits={digits},ops={ops}" + (f",multiplier_digits={multiplier_digits}" if "*" in ops else "")
                     + (f",min_digits={min_digits}" if min_digits is not None else ""))

    def sample(self, rng: random.Random) -> dict:
        op = rng.choice(self.ops)
        if self.min_digits is not None:
            d = rng.randint(self.min_digits, self.digits)
            m = self.multiplier_digits if op == "*" else d
            a, b = rng.randrange(10 ** (d - 1), 10**d), rng.randrange(10 ** (m - 1), 10**m)
            if op == "-" and a < b:
                a, b = b, a
            return self.row(a, op, b)
        a = rng.randrange(10**self.digits)
        b = rng.randrange(10 ** (self.multiplier_digits if op == "*" else self.digits))
        if op == "-" and a < b:
            a, b = b, a
        return self.row(a, op, b)

    @staticmethod
    def row(a: int, op: str, b: int) -> dict:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"id": f"{a}{op}{b}", "prompt": f"What is {a} {op} {b}?", "answer": str(value), "a": a, "op": op, "b": b}

    def solution(self, row: dict) -> str:
        a, op, b = row["a"], row["op"], row["b"]
        steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
        return r1_solution(" , ".join(steps), row["answer"])


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs from the last column to the first, the shorter number padded with zeros."""
    width = max(len(str(a)), len(str(b)))
    return list(zip(map(int, str(a).zfill(width)[::-1]), map(int, str(b).zfill(width)[::-1])))


def _add_steps(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    for x, y in _columns(a, b):
        total = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    steps, borrow = [], 0
    for x, y in _columns(a, b):
        top = x + 10 if x - borrow < y else x
        steps.append(f"{top}" + ("-1" if borrow else "") + f"-{y}={top - borrow - y}")
        borrow = int(top > x)
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    if b < 10:
        steps, carry = [], 0
        for x in map(int, str(a)[::-1]):
            total = x * b + carry
            steps.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        return steps
    partials = [int(d) * 10**i * a for i, d in enumerate(str(b)[::-1])]
    steps = [f"{a}*{int(d) * 10**i}={p}" for i, (d, p) in enumerate(zip(str(b)[::-1], partials))]
    return steps + ["+".join(map(str, partials)) + f"={a * b}"]
