"""Math benchmark files in JSONL: GSM8K, MATH-500 and AIME style rows.

A row needs a question (`question`, `problem` or `prompt`) and a gold `answer`. GSM8K's answers are worked
solutions ending in `#### 42`: the part after the last `####` is the gold answer. A MATH row without `answer`
but with a `solution` takes the solution's `\\boxed{…}`. Other fields are kept; `id` (or `unique_id`, or the
line number) names the row in results.
"""

from __future__ import annotations

import json
from pathlib import Path

from openseek.rewards import _boxed_contents

QUESTION_FIELDS = ("question", "problem", "prompt")


class DatasetError(ValueError):
    """A benchmark file that cannot be used; the message names the file, line and field at fault."""


def _gold(row: dict, where: str) -> str:
    answer = row.get("answer")
    if answer is None and isinstance(row.get("solution"), str):
        boxes = _boxed_contents(row["solution"]) or []
        if boxes:
            return boxes[-1].strip()
    if answer is None:
        raise DatasetError(f"{where}: field 'answer' is missing (the row has: {', '.join(row) or 'no fields'})")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DatasetError(f"{where}: field 'answer' must be a string or a number, not {type(answer).__name__}")
    answer = str(answer)
    if "####" in answer:
        answer = answer[answer.rindex("####") + 4 :]
    answer = answer.strip()
    if not answer:
        raise DatasetError(f"{where}: field 'answer' is empty")
    return answer


def parse_row(row, where: str, line: int) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field = next((f for f in QUESTION_FIELDS if f in row), None)
    if field is None:
        raise DatasetError(
            f"{where}: no question field: expected one of {', '.join(QUESTION_FIELDS)} "
            f"(the row has: {', '.join(row) or 'no fields'})"
        )
    question = row[field]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: field {field!r} must be a non-empty string")
    return {**row, "id": str(row.get("id", row.get("unique_id", line))), "prompt": question, "answer": _gold(row, where)}


def jsonl_objects(path: str | Path) -> list[tuple[str, int, dict]]:
    """(where, line number, object) for each non-blank line of a JSONL file. A missing or empty file, bad JSON or a
    line that is not an object raises `DatasetError` naming the file and line. Shared by eval, GRPO and sample."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            out.append((where, line_no, row))
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def load_math_file(path: str | Path) -> list[dict]:
    """Rows `{"id", "prompt", "answer", ...}` from a JSONL benchmark file; a bad row raises `DatasetError`."""
    return [parse_row(row, where, line_no) for where, line_no, row in jsonl_objects(path)]
