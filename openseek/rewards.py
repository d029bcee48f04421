"""Answer checking and rewards: the one implementation shared by GRPO's rewards and `openseek eval`.

Two steps, kept apart so each can be trusted on its own:
- `extract_answer(text)` finds what the completion committed to: its `<answer>…</answer>` blocks, else its
  `\\boxed{…}` ones, else the last `#### …` line. Thinking (`<think>…</think>`, including a `<think>` the prompt
  template already opened) is never the answer, and several blocks that disagree mean no answer at all.
- `answers_match(pred, gold)` decides equivalence with math-verify (fractions, decimals, LaTeX, thousands
  separators, sets and tuples). Before that, cheap rules refuse what a reward hacker would try: empty, hedged
  ("3 or 4", "3, 4" against a single value), absurdly long, malformed (unbalanced braces) answers, unknown LaTeX
  commands (`\\input{…}`) and non-finite values (`\\frac{1}{0}`). math-verify runs in worker processes that are
  killed when a check exceeds its time limit: sympy can sit in C code (a power tower) where no signal reaches it,
  and math-verify's own SIGALRM timeout fails outside the main thread.

Reward functions have the signature `fn(completions, prompts, **columns) -> list[float]`; `score()` calls one
safely (validated output; a hang or an exception becomes reward 0 with a warning, never a dead training run).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Callable

log = logging.getLogger("openseek.rewards")

MAX_ANSWER_CHARS = 1000  # longer "answers" are never credited (and never reach the parser)
CHECK_TIMEOUT_S = 5.0  # per equivalence check, in a worker process
REWARD_TIMEOUT_S = 120.0  # per call of a custom reward function

RewardFn = Callable[..., list]

# ---- extraction --------------------------------------------------------------------------------------------

_THINK_TAG = re.compile(r"</?think>")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def visible_text(text: str) -> str:
    """The completion without its thinking. A `</think>` with no open block closes one the prompt template
    opened, so everything before it was thinking; an unclosed `<think>` thinks to the end. One linear pass."""
    visible, depth, pos = [], 0, 0
    for tag in _THINK_TAG.finditer(text):
        if depth == 0:
            visible.append(text[pos : tag.start()])
        pos = tag.end()
        if tag.group() == "<think>":
            depth += 1
        elif depth:
            depth -= 1
        else:
            visible = []
    if depth == 0:
        visible.append(text[pos:])
    return " ".join(visible)


def _answer_blocks(text: str) -> list[str] | None:
    """Contents of the `<answer>…</answer>` blocks; None when a block opens and never closes. One linear pass."""
    blocks, pos = [], 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start)
        if end < 0:
            return None
        blocks.append(text[start + len("<answer>") : end])
        pos = end + len("</answer>")
    return blocks


def _boxed_contents(text: str) -> list[str] | None:
    """Contents of every `\\boxed{…}` (balanced braces); None when one of them never closes (malformed)."""
    found = []
    for match in _BOX.finditer(text):
        depth, start = 1, match.end()
        i = start
        while i < len(text) and depth:
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return None
        found.append(text[start : i - 1])
    return found


def _same(values: list[str]) -> str | None:
    """The one value several blocks agree on (whitespace aside), or None when they disagree or are empty."""
    normalized = {re.sub(r"\s+", " ", v).strip().rstrip(".").strip() for v in values}
    if len(normalized) != 1:
        return None
    return normalized.pop() or None


def extract_answer(text: str | None) -> str | None:
    """The final answer a completion committed to, or None when it committed to none (or to several)."""
    if not text:
        return None
    text = visible_text(text)
    blocks = _answer_blocks(text)
    if blocks is None:  # opened but never closed: the model did not finish committing
        return None
    if blocks:
        values = []
        for block in blocks:
            boxes = _boxed_contents(block)
            if boxes is None:
                return None
            values.extend(boxes or [block])
        return _same(values)
    boxes = _boxed_contents(text)
    if boxes is None:
        return None
    if boxes:
        return _same(boxes)
    if "####" in text:
        return _same([text[text.rindex("####") + 4 :].split("\n", 1)[0]])
    return None


# ---- refusing hacks before any parsing ---------------------------------------------------------------------

# LaTeX commands an answer may use; anything else (\input, \def, \write, \hello …) is not credited.
_ALLOWED_COMMANDS = set(
    """frac dfrac tfrac cfrac sqrt cdot times div pm mp le leq ge geq lt gt ne neq approx infty pi circ degree
    text textbf textit textrm textnormal mathrm mathbf mathit mathbb mathcal mathsf operatorname mbox left right
    big Big bigg Bigg bigl bigr Bigl Bigr quad qquad dots ldots cdots vdots ddots displaystyle boxed
    sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp lg min max gcd lcm det deg mod bmod pmod
    alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau
    upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega
    in notin cup cap setminus emptyset varnothing subset subseteq supset supseteq mid nmid angle triangle
    overline bar hat vec widehat tilde binom dbinom tbinom begin end prime cong sim equiv perp parallel
    to rightarrow Rightarrow implies iff lceil rceil lfloor rfloor langle rangle vert lvert rvert not leqslant geqslant
    ell sum prod int lim partial underline emph textsf""".split()
)
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_HEDGE_WORDS = re.compile(r"\\text\{\s*(?:or|and)\s*\}|\\lor\b|\\vee\b|\bor\b|\band\b|\beither\b|;")
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\\,|\{,\})(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_TAG = re.compile(r"</?[A-Za-z_]+>")


def _clean(answer: str) -> str:
    """Surface noise that carries no meaning: math delimiters, a final period, thousands separators."""
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", answer).strip()
    answer = answer.rstrip(".").strip()
    return _THOUSANDS.sub("", answer)


def _top_level_values(answer: str) -> int:
    """How many values an answer lists: top-level commas, `or`/`and`, `;` and `\\\\` outside environments.
    One enclosing bracket pair is a tuple/interval/set, i.e. its elements count: "(3, 4)" lists two values."""
    text = _HEDGE_WORDS.sub(",", answer)
    text = re.sub(r"\\left|\\right", "", text).replace("\\{", "{").replace("\\}", "}")
    text = re.sub(r"\\begin\{[^}]*\}", "(", text)
    text = re.sub(r"\\end\{[^}]*\}", ")", text)
    text = text.replace("\\\\", ",").strip()
    if len(text) >= 2 and text[0] in "([{" and text[-1] in ")]}":
        depth = 0
        for i, ch in enumerate(text):
            depth += (ch in "([{") - (ch in ")]}")
            if depth == 0 and i < len(text) - 1:
                break
        else:
            text = text[1:-1]
    depth, count = 0, 1
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        count += ch == "," and depth == 0
    return count


def refusal(pred: str | None, gold: str) -> str | None:
    """Why `pred` cannot be credited whatever the gold answer is, or None when it deserves a real check."""
    if pred is None or not pred.strip():
        return "no answer"
    if len(pred) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if not _balanced(re.sub(r"\\[{}\\]", "", pred)):
        return "unbalanced braces"
    if sum(pred.count(c) for c in "([") != sum(pred.count(c) for c in ")]"):
        return "unbalanced brackets"
    unknown = sorted(set(_COMMAND.findall(pred)) - _ALLOWED_COMMANDS)
    if unknown:
        return f"LaTeX command \\{unknown[0]} is not allowed in an answer"
    if _TAG.search(pred):
        return "answer contains markup tags"
    for sign in ("\\pm", "\\mp", "±", "∓"):
        if sign in pred and sign not in gold:
            return f"hedged with {sign}"
    pred_values, gold_values = _top_level_values(_clean(pred)), _top_level_values(_clean(gold))
    if pred_values != gold_values:
        return f"lists {pred_values} values where the answer has {gold_values} (hedging)"
    return None


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def _as_number(answer: str) -> Fraction | None:
    if _NUMBER.fullmatch(answer):
        return Fraction(answer)
    return None


# ---- math-verify in killable worker processes ---------------------------------------------------------------

def _serve_checks() -> None:
    """Worker loop: one JSON `[pred, gold]` per line in, `true`/`false` per line out. Runs as a plain script so
    it never imports torch; memory is capped so a runaway expression dies here, not in the caller."""
    import resource

    limit = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)  # math-verify warns that its own timeout is off: ours is the process kill
    from math_verify import parse, verify
    from sympy import nan, zoo

    print("ready", flush=True)
    for line in sys.stdin:
        pred, gold = json.loads(line)
        try:
            gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
            pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
            finite = all(not (hasattr(p, "has") and p.has(zoo, nan)) for p in pred_parsed)
            verdict = bool(gold_parsed and pred_parsed and finite and verify(gold_parsed, pred_parsed, timeout_seconds=None))
        except BaseException:  # noqa: BLE001 — any failure to check is "not credited", and the worker lives on
            verdict = False
        sys.stdout.write("true\n" if verdict else "false\n")
        sys.stdout.flush()


class CheckerUnavailable(RuntimeError):
    """The math-verify worker could not start: every answer would silently score 0, so this is never swallowed."""


class _Worker:
    """One checking process, run as a plain script (`-P`: its folder is not put on sys.path)."""

    START_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not counted against any check's time limit

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--serve-checks"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.ready = False

    def send(self, pred: str, gold: str) -> None:
        if not self.ready:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.START_TIMEOUT_S)
            if not ready or self.proc.stdout.readline().strip() != "ready":
                self.close()
                raise CheckerUnavailable("the math-verify worker process did not start (is math-verify installed?)")
            self.ready = True
        self.proc.stdin.write(json.dumps([pred, gold]) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class AnswerChecker:
    """A small pool of math-verify worker processes with a hard time limit per check. Reused across calls
    (starting one costs about half a second); a worker that times out or dies is killed and replaced."""

    def __init__(self, workers: int | None = None):
        self.max_workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def check(self, pairs: list[tuple[str, str]], timeout: float = CHECK_TIMEOUT_S) -> list[bool]:
        with self.lock:
            return self._check(pairs, timeout)

    def _check(self, pairs, timeout):
        verdicts = [False] * len(pairs)
        todo = list(range(len(pairs)))[::-1]
        while len(self.workers) < min(self.max_workers, len(pairs)):
            self.workers.append(_Worker())
        idle, busy = list(self.workers), {}  # busy: stdout fd -> (worker, pair index, deadline)
        while todo or busy:
            while todo and idle:
                worker, i = idle.pop(), todo.pop()
                try:
                    worker.send(*pairs[i])
                except OSError:  # died between checks: replace it and retry this pair once
                    worker = self._replace(worker)
                    worker.send(*pairs[i])
                busy[worker.proc.stdout.fileno()] = (worker, i, time.monotonic() + timeout)
            wait = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
            ready, _, _ = select.select(list(busy), [], [], wait)
            for fd in ready:
                worker, i, _ = busy.pop(fd)
                line = worker.proc.stdout.readline()
                if line:
                    verdicts[i] = line.strip() == "true"
                    idle.append(worker)
                else:
                    log.warning("answer check worker died on %r vs %r; not credited", pairs[i][0][:80], pairs[i][1][:80])
                    idle.append(self._replace(worker))
            now = time.monotonic()
            for fd, (worker, i, deadline) in list(busy.items()):
                if now >= deadline:
                    log.warning("answer check exceeded %.1fs on %r vs %r; not credited", timeout, pairs[i][0][:80], pairs[i][1][:80])
                    del busy[fd]
                    idle.append(self._replace(worker))
        return verdicts

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close()
        fresh = _Worker()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        with self.lock:
            for worker in self.workers:
                worker.close()
            self.workers = []


_checker: AnswerChecker | None = None
_checker_lock = threading.Lock()
_cache: dict[tuple[str, str], bool] = {}  # verdicts (a timeout included: a check that hung once is not retried)


def _default_checker() -> AnswerChecker:
    global _checker
    with _checker_lock:
        if _checker is None:
            import atexit

            _checker = AnswerChecker()
            atexit.register(_checker.close)
        return _checker


def check_answers(pairs: list[tuple[str | None, str]], timeout: float = CHECK_TIMEOUT_S) -> list[bool]:
    """`answers_match` for many (pred, gold) pairs at once, checked in parallel by the worker pool."""
    verdicts: list[bool | None] = [None] * len(pairs)
    pending = {}
    for i, (pred, gold) in enumerate(pairs):
        gold = str(gold)
        if refusal(pred, gold) is not None:
            verdicts[i] = False
            continue
        pred, gold = _clean(pred), _clean(gold)
        if pred == gold:
            verdicts[i] = True
        elif (a := _as_number(pred)) is not None and (b := _as_number(gold)) is not None:
            verdicts[i] = a == b
        elif (pred, gold) in _cache:
            verdicts[i] = _cache[pred, gold]
        else:
            pending.setdefault((pred, gold), []).append(i)
    if pending:
        keys = list(pending)
        for key, verdict in zip(keys, _default_checker().check(keys, timeout)):
            if len(_cache) < 100_000:
                _cache[key] = verdict
            for i in pending[key]:
                verdicts[i] = verdict
    return verdicts


def answers_match(pred: str | None, gold: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the extracted answer `pred` is mathematically the gold answer (see the module docstring)."""
    return check_answers([(pred, gold)], timeout)[0]


# ---- rewards ------------------------------------------------------------------------------------------------

_R1_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def prefilled_think(prompt: str | None) -> bool:
    """Whether the prompt template already opened the think block (the completion starts inside it)."""
    return bool(prompt) and prompt.rstrip().endswith("<think>")


def format_reward(completions: list[str], prompts: list[str] | None = None, **_) -> list[float]:
    """R1's format reward: 1 for exactly `<think>…</think><answer>…</answer>` with a non-empty answer, else 0.
    When the prompt ends in `<think>` the completion is judged as if it started with it."""
    rewards = []
    for i, completion in enumerate(completions):
        if prompts is not None and prefilled_think(prompts[i]):
            completion = "<think>" + completion
        once = all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
        match = _R1_FORMAT.fullmatch(completion) if once else None  # counts first: the regex then runs in linear time
        ok = match is not None and match.group(2).strip() != ""
        rewards.append(float(ok))
    return rewards


def accuracy_reward(completions: list[str], prompts: list[str] | None = None, *, answer: list[str], **_) -> list[float]:
    """1 when the completion's extracted answer matches the row's `answer` column (math-verify), else 0."""
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} answers")
    preds = [extract_answer(c) for c in completions]
    return [float(v) for v in check_answers(list(zip(preds, map(str, answer))))]


_COUNTDOWN_CHARS = re.compile(r"[\d\s+\-*/()]+")


def countdown_value(expression: str | None, nums: list[int]) -> Fraction | None:
    """The value of a countdown expression that uses each of `nums` exactly once with + - * / and parentheses,
    computed exactly; None for anything else (other numbers, unary minus, division by zero, junk)."""
    if not expression or len(expression) > 200:
        return None
    expression = re.sub(r"\\times|\\cdot|×", "*", expression)
    expression = re.sub(r"\\div|÷", "/", expression).strip().strip("$")
    stated = None
    if "=" in expression:  # "(3+5)*2 = 16": the stated result must be the expression's value
        expression, stated = expression.split("=", 1)
        if not re.fullmatch(r"\s*\d+\s*", stated):
            return None
    if not _COUNTDOWN_CHARS.fullmatch(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return left / right  # ZeroDivisionError is caught below
        raise ValueError("not allowed in a countdown expression")

    try:
        result = value(tree)
    except (ValueError, ZeroDivisionError):
        return None
    if stated is not None and int(stated) != result:
        return None
    return result if sorted(used) == sorted(int(n) for n in nums) else None


def countdown_correct(pred: str | None, nums: list[int], target: int) -> bool:
    return countdown_value(pred, nums) == target


def countdown_reward(completions: list[str], prompts: list[str] | None = None, *, nums: list, target: list, **_) -> list[float]:
    """1 when the answer is an expression using each number of `nums` once that evaluates to `target`, else 0."""
    return [float(countdown_correct(extract_answer(c), n, t)) for c, n, t in zip(completions, nums, target)]


REWARDS: dict[str, RewardFn] = {"format": format_reward, "accuracy": accuracy_reward, "countdown": countdown_reward}
_TRUSTED = set(REWARDS.values())  # built-ins run in-process: they cannot hang (checks have their own limit)


class RewardError(ValueError):
    """A reward function that cannot be loaded or that returned something other than one number per completion."""


def load_reward(spec: str) -> RewardFn:
    """A reward by built-in name (`format`, `accuracy`, `countdown`) or from a file: `path/to/file.py:function`."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise RewardError(f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'file.py:function'")
    path, name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise RewardError(f"reward {spec!r}: file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"openseek_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise RewardError(f"reward {spec!r}: importing {path} failed: {exc!r}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardError(f"reward {spec!r}: {path} has no function {name!r} (it has: {', '.join(available) or 'none'})")
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _validate(fn: RewardFn, values, expected: int) -> list[float]:
    name = reward_name(fn)
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward function {name} returned {type(values).__name__}, expected a list of {expected} numbers")
    values = list(values)
    if len(values) != expected:
        raise RewardError(f"reward function {name} returned {len(values)} rewards for {expected} completions")
    for i, v in enumerate(values):
        if not isinstance(v, Real):
            raise RewardError(f"reward function {name} returned {v!r} ({type(v).__name__}) at position {i}, expected a number")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {name} returned {v!r} at position {i}, expected a finite number")
    return [float(v) for v in values]


def _run_in_child(conn, fn, completions, prompts, columns) -> None:
    """Body of the forked child: ("ok", rewards) | ("invalid", why) | ("error", exception)."""
    global _checker
    _checker = None  # the parent's worker pipes are not ours to use: start our own if the reward needs them
    try:
        values = fn(completions, prompts, **columns)
        conn.send(("ok", _validate(fn, values, len(completions))))
    except RewardError as exc:
        conn.send(("invalid", str(exc)))
    except BaseException as exc:  # noqa: BLE001 — reported to the parent, which logs it
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def score(fn: RewardFn, completions: list[str], prompts: list[str], columns: dict | None = None,
          timeout: float = REWARD_TIMEOUT_S) -> list[float]:
    """Call a reward function safely: one finite number per completion or a `RewardError` naming the function.
    An exception or a call running past `timeout` seconds gives reward 0 for the batch and a warning, so a
    broken verifier cannot kill or hang training. Custom functions run in a forked child that is killed on
    timeout (a thread cannot stop code stuck in C); the built-in rewards run in-process."""
    columns = columns or {}
    name = reward_name(fn)
    if fn in _TRUSTED:
        try:
            values = fn(completions, prompts, **columns)
        except (RewardError, CheckerUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("reward %s raised %r; reward 0 for this batch", name, exc)
            return [0.0] * len(completions)
        return _validate(fn, values, len(completions))
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_in_child, args=(child, fn, completions, prompts, columns), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            log.warning("reward %s ran past %.0fs; reward 0 for this batch", name, timeout)
            return [0.0] * len(completions)
        try:
            status, payload = parent.recv()
        except EOFError:
            log.warning("reward %s died (exit code %s); reward 0 for this batch", name, proc.exitcode)
            return [0.0] * len(completions)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
    if status == "invalid":
        raise RewardError(payload)
    if status == "error":
        log.warning("reward %s raised %s; reward 0 for this batch", name, payload)
        return [0.0] * len(completions)
    return payload


if __name__ == "__main__" and sys.argv[1:] == ["--serve-checks"]:
    _serve_checks()
