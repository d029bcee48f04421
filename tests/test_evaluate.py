"""`openseek eval`: metrics against closed forms and hand-made votes, scoring of outside completions through the
CLI, generation through the Engine on a model whose answers are known, and bad input refused with the reason."""

import inspect
import itertools
import json
import math

import pytest

import openseek
from helpers_eval import QUESTIONS, REPLY, build_model, build_tokenizer, save_model_dir
from openseek.cli import main as cli
from openseek.engine import Engine, stop_token_ids
from openseek.evaluate import (
    CORRECT, answer_classes, check_ks, evaluate, maj_at_k, majority_vote, pass_at_k, score_completions, summarize,
)
from openseek.rewards import check_answers
from openseek.tasks import get_task
from openseek.tasks.arithmetic import Arithmetic


# ---- metrics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 1 / 4), (4, 1, 2, 1 - 3 / 6), (5, 2, 3, 1 - 1 / 10), (10, 3, 4, 1 - 35 / 210), (8, 0, 4, 0.0),
    (4, 3, 2, 1.0), (16, 16, 16, 1.0), (16, 1, 16, 1.0), (64, 5, 1, 5 / 64),
])
def test_pass_at_k_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("n,c,k", [(6, 2, 3), (7, 3, 2), (5, 1, 5), (8, 4, 4)])
def test_pass_at_k_equals_enumerating_every_subset(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-15)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("classes,winner", [
    ([CORRECT, 1, 1, None], 1),
    ([1, CORRECT, CORRECT, 1], 1),  # 2-2 tie: the answer that voted first wins
    ([CORRECT, 1, 1, CORRECT], CORRECT),
    ([None, None, 2, CORRECT], 2),  # 1-1 tie; blanks do not vote
    ([None, None, None, None], None),
    ([3, 2, CORRECT, CORRECT, 3, 2, 2], 2),
])
def test_majority_vote_and_ties(classes, winner):
    assert majority_vote(classes) == winner


def test_maj_at_k_averages_disjoint_groups():
    votes = [CORRECT, 1, CORRECT, 1, 1, 1, None, CORRECT, CORRECT, 1]  # n = 10
    assert maj_at_k(votes, CORRECT, 1) == 4 / 10
    assert maj_at_k(votes, CORRECT, 2) == 4 / 5  # groups: (C,1) (C,1) (1,1) (-,C) (C,1); ties go to C
    assert maj_at_k(votes, CORRECT, 4) == 1 / 2  # (C,1,C,1) tie -> C first; (1,1,-,C) -> 1; last 2 unused
    assert maj_at_k(votes, CORRECT, 10) == 0.0  # 1 has 5 votes, C has 4
    assert maj_at_k([None] * 4, CORRECT, 4) == 0.0


def test_equivalent_wrong_answers_vote_together():
    extracted = ["8", "9", "9.0", "\\frac{18}{2}", "x", None, "8.0"]
    correct = [True, False, False, False, False, False, True]
    classes = answer_classes(extracted, correct, check_answers)
    assert classes[0] == classes[6] == CORRECT and classes[5] is None
    assert classes[1] == classes[2] == classes[3] != classes[4]
    assert maj_at_k(classes, CORRECT, 7) == 0.0  # three votes for 9 beat two for 8


def test_summary_numbers_by_hand():
    rows = [
        {"correct": [True, False, False, False], "extracted": ["1", "2", "2", None], "classes": [0, 1, 1, None]},
        {"correct": [True, True, False, True], "extracted": ["5", "5", "6", "5"], "classes": [0, 0, 1, 0]},
    ]
    summary = summarize(rows, [1, 2, 4])
    m = summary["metrics"]
    assert m["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert m["pass@1_stderr"] == pytest.approx(math.sqrt(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 1 / 2))
    assert m["pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert m["pass@4"] == 1.0 and m["pass@4_stderr"] == 0.0
    assert m["maj@4"] == 0.5  # row 1: "2" outvotes the correct "1"; row 2: 3 correct votes
    assert m["maj@2"] == 0.5  # row 1: (C,2) tie -> C, (2,-) -> 2; row 2: (C,C) -> C, (6,C) tie -> 6
    assert m["answered"] == 7 / 8
    assert (summary["problems"], summary["n"], summary["k"]) == (2, 4, [1, 2, 4])


def test_k_greater_than_n_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="k=32 > n=16: pass@k and maj@k need at least k samples per problem"):
        check_ks([1, 32], 16)


# ---- scoring completions made elsewhere ---------------------------------------------------------------------

COMPLETION_ROWS = [
    {"id": "gsm-1", "answer": "#### 1,200", "completions": [
        "<think>600*2</think><answer>1200</answer>", "\\boxed{1,200}", "<answer>1200 or 1300</answer>",
        "<think>\\boxed{1200}</think>"]},
    {"answer": "\\frac{1}{2}", "completions": [
        "<answer>0.5</answer>", "<answer>0.25</answer>", "<answer>\\frac{1}{4}</answer>", "#### 1/2"]},
    {"id": 7, "answer": "3", "completions": ["\\boxed{3} \\boxed{4}", "<answer></answer>", "<answer>4</answer>",
                                             "<answer>\\input{3}</answer>"]},
]
EXPECTED_CORRECT = [[True, True, False, False], [True, False, False, True], [False, False, False, False]]
EXPECTED_EXTRACTED = [["1200", "1,200", "1200 or 1300", None], ["0.5", "0.25", "\\frac{1}{4}", "1/2"],
                      [None, None, "4", "\\input{3}"]]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_completions_mode_through_the_cli(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "outside.jsonl", COMPLETION_ROWS)
    out = tmp_path / "eval"
    assert cli(["eval", "--completions", str(source), "--k", "1,2,4", "--output-dir", str(out)]) == 0

    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["gsm-1", "2", 7]  # the row's id as it was, else its line number
    assert [r["answer"] for r in results] == ["1,200", "\\frac{1}{2}", "3"]
    assert [r["correct"] for r in results] == EXPECTED_CORRECT
    assert [r["extracted"] for r in results] == EXPECTED_EXTRACTED

    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["pass@1"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 1 / 6) + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    # maj@4: row 1: correct 2 votes vs "1200 or 1300" 1 -> right; row 2: 0.25 and 1/4 are one wrong answer with
    # 2 votes, tying the 2 correct ones; the correct one voted first -> right; row 3: only "4" and "\input{3}"
    # (distinct wrong answers) vote -> wrong
    assert m["maj@4"] == pytest.approx(2 / 3)
    # maj@2: row 1: (1200, 1,200) right, (hedge, none) wrong; row 2: (0.5, 0.25) tie -> 0.5, (1/4, 1/2) tie -> 1/4
    assert m["maj@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["answered"] == 9 / 12
    assert summary["problems"] == 3 and summary["n"] == 4 and summary["k"] == [1, 2, 4]
    assert summary["completions"] == str(source) and "date" in summary

    table = (out / "results.md").read_text()
    assert "| pass@1 | 33.33% |" in table and "| maj@4 | 66.67% |" in table
    assert table in capsys.readouterr().out


def test_completion_ids_keep_their_json_type(tmp_path):
    rows = [{"id": 7, "answer": "3", "completions": ["<answer>3</answer>"]},
            {"id": "7", "answer": "3", "completions": ["<answer>4</answer>"]},
            {"id": "0042", "answer": "3", "completions": ["<answer>3</answer>"]}]
    out = tmp_path / "eval"
    assert cli(["eval", "--completions", str(_write_jsonl(tmp_path / "ids.jsonl", rows)), "--k", "1",
                "--output-dir", str(out)]) == 0
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert ids == [7, "7", "0042"] and isinstance(ids[0], int) and isinstance(ids[1], str)


def test_completions_scored_by_a_task(tmp_path):
    rows = [{"id": "c", "answer": "24", "nums": [1, 3, 4, 6], "target": 24,
             "completions": ["<answer>6/(1-3/4)</answer>", "<answer>24</answer>", "<answer>6*4</answer>"]}]
    result = score_completions(rows, [1], get_task("countdown"))
    assert result.rows[0]["correct"] == [True, False, False]


@pytest.mark.parametrize("bad,message", [
    ({"completions": ["<answer>1</answer>"]}, "line 2: field 'answer' is missing"),
    ({"answer": "1"}, "line 2: field 'completions' is missing"),
    ({"answer": "1", "completions": "<answer>1</answer>"}, "line 2: field 'completions' must be a non-empty list"),
    ('{"answer": "1", ', "line 2: not valid JSON"),
])
def test_bad_completion_rows_name_line_and_field(tmp_path, capsys, bad, message):
    source = _write_jsonl(tmp_path / "bad.jsonl", [COMPLETION_ROWS[0], bad])
    assert cli(["eval", "--completions", str(source), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(source) in err
    assert not (tmp_path / "out").exists()


def test_k_greater_than_n_is_refused_by_the_cli(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "outside.jsonl", COMPLETION_ROWS)
    assert cli(["eval", "--completions", str(source), "--k", "1,8", "--output-dir", str(tmp_path / "o")]) == 2
    assert "k=8 > n=4" in capsys.readouterr().err
    assert cli(["eval", "--model", str(tmp_path / "none"), "--task", "arithmetic", "--n", "4", "--k", "16",
                "--output-dir", str(tmp_path / "o")]) == 2
    assert "k=16 > n=4" in capsys.readouterr().err


def test_benchmark_row_without_question_is_refused_before_loading_the_model(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "bench.jsonl", [{"question": "q", "answer": "1"}, {"answer": "2"}])
    assert cli(["eval", "--model", str(tmp_path / "none"), "--dataset", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{data} line 2: no question field" in capsys.readouterr().err


# ---- generation through the Engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_model(tokenizer), tokenizer


ROWS = [{"id": str(i), "prompt": q, "answer": a} for i, (q, a) in enumerate(QUESTIONS.items())]


def test_greedy_evaluation_of_a_known_model(tiny):
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ROWS, template="plain", max_new_tokens=16, progress=False)
    assert [r["completions"] for r in result.rows] == [["<think> easy</think><answer> 8</answer>"]] * 3
    assert [r["correct"] for r in result.rows] == [[True], [False], [False]]
    assert result.accuracy == pytest.approx(1 / 3)
    assert result.summary["metrics"]["greedy_accuracy"] == pytest.approx(1 / 3)
    assert result.summary["metrics"]["truncated"] == 0.0
    assert result.rows[0]["finish_reasons"] == ["stop"]


def test_sampled_evaluation_is_consistent_and_reproducible(tiny):
    model, tokenizer = tiny
    kwargs = dict(n=16, ks=[1, 4, 16], temperature=3.0, template="plain", max_new_tokens=16, seed=5, progress=False)
    result = evaluate(model, tokenizer, ROWS, greedy=True, **kwargs)
    again = evaluate(model, tokenizer, ROWS, **kwargs)
    assert [r["completions"] for r in result.rows] == [r["completions"] for r in again.rows]
    counts = []
    for row in result.rows:
        # at temperature 3 a sample may also lose the answer format (None); the model knows only 8 and 9
        assert set(row["extracted"]) <= {"8", "9", None} and len(row["extracted"]) == 16
        assert row["correct"] == [a == row["answer"] for a in row["extracted"]]
        assert row["greedy"]["extracted"] == "8"
        counts.append(sum(row["correct"]))
    assert 0 < counts[0] < 16 and 0 < counts[1] < 16 and counts[2] == 0  # both answers were sampled
    m = result.summary["metrics"]
    assert m["pass@1"] == pytest.approx(sum(c / 16 for c in counts) / 3)
    assert m["pass@4"] == pytest.approx(sum(pass_at_k(16, c, 4) for c in counts) / 3)
    assert m["greedy_accuracy"] == pytest.approx(1 / 3)


def test_evaluate_with_a_task_uses_its_check(tiny):
    model, tokenizer = tiny
    rows = [Arithmetic.row(3, "+", 5), Arithmetic.row(4, "+", 5)]
    assert rows[0]["prompt"] in QUESTIONS
    result = evaluate(model, tokenizer, rows, task=get_task("arithmetic"), template="plain", max_new_tokens=16,
                      progress=False)
    assert [r["correct"] for r in result.rows] == [[True], [False]]


def test_temperature_zero_with_several_samples_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="temperature 0 makes all 4 samples identical"):
        evaluate(model, tokenizer, ROWS, n=4, temperature=0.0)


def test_cli_generates_and_scores_a_dataset(tmp_path, capsys):
    model_dir = save_model_dir(tmp_path / "model")
    data = _write_jsonl(tmp_path / "bench.jsonl", [
        {"question": q, "answer": f"The sum is {a}.\n#### {a}"} for q, a in QUESTIONS.items()])
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(model_dir), "--dataset", str(data), "--template", "plain", "--n", "8",
                "--k", "1,8", "--temperature", "3", "--max-new-tokens", "16", "--greedy", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(model_dir) and summary["dataset"] == str(data)
    assert summary["sampling"] == {"n": 8, "temperature": 3.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 0,
                                   "template": "plain"}
    assert summary["metrics"]["greedy_accuracy"] == pytest.approx(1 / 3)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["1", "2", "3"] and [r["answer"] for r in results] == ["8", "9", "7"]
    assert all(len(r["completions"]) == len(r["correct"]) == 8 for r in results)
    assert "| pass@8 |" in capsys.readouterr().out


class _Stopped(Exception):
    """Raised by a patched Engine.generate once it has seen its arguments."""


def test_eval_and_grpo_stop_on_the_same_ids_for_one_model_dir(tmp_path, monkeypatch, capsys):
    """config.json, generation_config.json and the tokenizer each name a different EOS: eval and GRPO both stop on
    all three, through the one rule `openseek.engine.stop_token_ids`."""
    from openseek.tokenizer import Tokenizer

    directory = save_model_dir(tmp_path / "model")
    tokenizer = Tokenizer.from_dir(directory)
    (eight,), (close,) = tokenizer.encode(" 8"), tokenizer.encode("</answer>")
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = close
    (directory / "config.json").write_text(json.dumps(config))
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [eight]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    assert len({eight, close, tokenizer.eos_token_id}) == 3
    expected = stop_token_ids(openseek.load(directory).cfg, tokenizer)
    assert expected == sorted({eight, close, tokenizer.eos_token_id})

    seen = []
    generate = Engine.generate

    def recording(self, *args, **kwargs):
        seen.append(inspect.signature(generate).bind(self, *args, **kwargs).arguments["stop_token_ids"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", recording)
    data = _write_jsonl(tmp_path / "bench.jsonl", [{"question": q, "answer": a} for q, a in QUESTIONS.items()])
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(directory), "--dataset", str(data), "--template", "plain",
                "--temperature", "0", "--max-new-tokens", "16", "--output-dir", str(out)]) == 0
    assert seen == [expected]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # the model says "<think> easy</think><answer> 8</answer>" + EOS; generation_config's EOS (" 8") ends it early
    assert [r["completions"] for r in results] == [[REPLY + " 8"]] * 3
    assert [r["finish_reasons"] for r in results] == [["stop"]] * 3
    assert [r["tokens"] for r in results] == [[len(tokenizer.encode(REPLY)) + 1]] * 3

    def recording_then_stop(self, *args, **kwargs):
        seen.append(inspect.signature(generate).bind(self, *args, **kwargs).arguments["stop_token_ids"])
        raise _Stopped  # the first rollout's generation is all this test needs

    monkeypatch.setattr(Engine, "generate", recording_then_stop)
    with pytest.raises(_Stopped):
        cli(["grpo", "--model", str(directory), "--task", "arithmetic", "--task-size", "8", "--group-size", "2",
             "--prompts-per-step", "2", "--max-new-tokens", "4", "--run-dir", str(tmp_path / "grpo")])
    assert seen == [expected, expected]
