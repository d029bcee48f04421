"""Built-in tasks are reproducible, keep train and test apart, and their worked solutions are right; math files
load with their gold answers, and a bad row names its line and field."""

import json

import pytest

from openseek.rewards import extract_answer, format_reward
from openseek.tasks import DatasetError, R1_ZERO_TEMPLATE, format_prompt, get_task, load_math_file
from openseek.tasks.arithmetic import Arithmetic

SPECS = ["arithmetic", "arithmetic:digits=4,ops=+-*", "arithmetic:digits=2,ops=*,multiplier_digits=2", "countdown",
         "countdown:numbers=4"]


@pytest.mark.parametrize("spec", SPECS)
def test_generation_is_reproducible_and_splits_are_disjoint(spec):
    task = get_task(spec)
    train = task.generate(200, seed=3)
    assert train == task.generate(200, seed=3)
    assert train != task.generate(200, seed=4)
    assert len({r["id"] for r in train}) == 200
    test_ids = {r["id"] for r in task.generate(40, seed=3, split="test")}
    other_seed_train = {r["id"] for r in task.generate(200, seed=99)}
    assert not test_ids & ({r["id"] for r in train} | other_seed_train)
    assert all(isinstance(r["prompt"], str) and isinstance(r["answer"], str) for r in train)


@pytest.mark.parametrize("spec", SPECS)
def test_worked_solutions_are_correct_and_well_formed(spec):
    task = get_task(spec)
    rows = task.generate(100, seed=0)
    solutions = [task.solution(r) for r in rows]
    assert format_reward(solutions, [r["prompt"] for r in rows]) == [1.0] * 100
    assert all(task.is_correct(extract_answer(s), r) for s, r in zip(solutions, rows))
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    assert task.reward(solutions, [r["prompt"] for r in rows], **columns) == [1.0] * 100


@pytest.mark.parametrize("a,op,b,solution", [
    (478, "+", 395, "<think> 8+5=13 , 7+9+1=17 , 4+3+1=8 </think><answer> 873 </answer>"),
    (478, "+", 5, "<think> 8+5=13 , 7+0+1=8 , 4+0=4 </think><answer> 483 </answer>"),
    (478, "-", 395, "<think> 8-5=3 , 17-9=8 , 4-1-3=0 </think><answer> 83 </answer>"),
    (1000, "-", 1, "<think> 10-1=9 , 10-1-0=9 , 10-1-0=9 , 1-1-0=0 </think><answer> 999 </answer>"),
    (478, "*", 5, "<think> 8*5=40 , 7*5+4=39 , 4*5+3=23 </think><answer> 2390 </answer>"),
    (478, "*", 95, "<think> 478*5=2390 , 478*90=43020 , 2390+43020=45410 </think><answer> 45410 </answer>"),
])
def test_arithmetic_solution_text(a, op, b, solution):
    row = Arithmetic.row(a, op, b)
    assert row["prompt"] == f"What is {a} {op} {b}?"
    assert Arithmetic().solution(row) == solution


def test_countdown_row_and_solution():
    task = get_task("countdown")
    row = task.generate(1, seed=0)[0]
    assert row["prompt"].startswith("Using the numbers ") and row["prompt"].endswith(f"make {row['target']}.")
    assert task.is_correct(row["solution_expression"], row)
    assert not task.is_correct(str(row["target"]), row)  # the bare target is not a solution
    assert task.same_answer("(1+2)*3", " (1 + 2) * 3") and not task.same_answer("(1+2)*3", "3*(1+2)")


def test_bad_task_specs():
    with pytest.raises(ValueError, match="unknown task 'algebra'"):
        get_task("algebra")
    with pytest.raises(ValueError, match="ops must be made of"):
        get_task("arithmetic:ops=/")
    with pytest.raises(ValueError, match="bad options"):
        get_task("arithmetic:colour=red")
    with pytest.raises(ValueError, match="found only .* distinct"):
        get_task("arithmetic:digits=1").generate(200, seed=0)  # 100 one-digit sums exist in all


def test_prompt_templates():
    assert format_prompt("What is 1 + 1?") == R1_ZERO_TEMPLATE.format(prompt="What is 1 + 1?")
    assert format_prompt("What is 1 + 1?").endswith("User: What is 1 + 1?. Assistant:")
    assert format_prompt("q", "plain") == "q"

    class Chat:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}<assistant><think>"

    assert format_prompt("q", "chat", Chat()) == "<user>q<assistant><think>"
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt("q", "alpaca")


def _jsonl(tmp_path, rows, name="bench.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_gsm8k_math_and_aime_rows(tmp_path):
    path = _jsonl(tmp_path, [
        {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 1,072"},
        {"problem": "Compute $\\frac{1}{2}+\\frac14$.", "answer": "\\frac{3}{4}", "unique_id": "test/algebra/1.json"},
        {"prompt": "AIME 2024 I 1", "answer": 204, "id": "aime-1"},
        "",
        {"problem": "MATH without an answer field", "solution": "So it is $\\boxed{\\sqrt{2}}$."},
    ])
    rows = load_math_file(path)
    assert [(r["id"], r["prompt"][:9], r["answer"]) for r in rows] == [
        ("1", "Natalia s", "1,072"), ("test/algebra/1.json", "Compute $", "\\frac{3}{4}"),
        ("aime-1", "AIME 2024", "204"), ("5", "MATH with", "\\sqrt{2}"),
    ]
    assert rows[0]["question"].startswith("Natalia")  # original fields are kept


@pytest.mark.parametrize("bad_row,message", [
    ({"answer": "3", "text": "what?"}, "line 2: no question field: expected one of question, problem, prompt \\(the row has: answer, text\\)"),
    ({"question": "what?"}, "line 2: field 'answer' is missing"),
    ({"question": "what?", "answer": "  "}, "line 2: field 'answer' is empty"),
    ({"question": "what?", "answer": "#### "}, "line 2: field 'answer' is empty"),
    ({"question": "what?", "answer": None}, "line 2: field 'answer' is missing"),
    ({"question": ["what?"], "answer": "1"}, "line 2: field 'question' must be a non-empty string"),
    ('{"question": "what?", "answer": 1', "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
])
def test_bad_rows_name_line_and_field(tmp_path, bad_row, message):
    path = _jsonl(tmp_path, [{"question": "ok?", "answer": "1"}, bad_row])
    with pytest.raises(DatasetError, match=message) as err:
        load_math_file(path)
    assert str(path) in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_math_file(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match="no rows"):
        load_math_file(_jsonl(tmp_path, [""]))
