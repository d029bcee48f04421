"""R1's findings in miniature: the reflection task's corpus and pattern counters, the per-step reasoning curve, the
demo's template for SFT, and benchmarks/r1_findings.py end to end at toy size (the figures are the benchmark's)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from openseek.demo import PLAIN_CHAT_TEMPLATE
from openseek.demo_tasks import (
    carries,
    checked_solution,
    direct_solution,
    growth,
    has_check,
    has_correction,
    reasoning_curve,
    window_mean,
)
from openseek.tasks import get_task
from openseek.tokenizer import BOS, EOS, train_bpe

ROOT = Path(__file__).resolve().parents[1]
ROW = get_task("arithmetic").row(478, "+", 395)


def test_the_three_habits_and_the_pattern_counters():
    assert direct_solution(ROW) == "<think> </think><answer> 763 </answer>"
    corrected = checked_solution(ROW, careless_first=True)
    assert corrected == ("<think> 8+5=13 , 7+9=16 , 4+3=7 so 763 . check 5+8=13 , 9+7+1=17 , 3+4+1=8 so 873 . "
                         "differs , take 873 </think><answer> 873 </answer>")
    confirmed = checked_solution(ROW, careless_first=False)
    assert confirmed.endswith("so 873 . check 5+8=13 , 9+7+1=17 , 3+4+1=8 so 873 . same </think><answer> 873 </answer>")
    assert (has_check(corrected), has_correction(corrected)) == (True, True)
    assert (has_check(confirmed), has_correction(confirmed)) == (True, False)
    assert (has_check(direct_solution(ROW)), has_correction(direct_solution(ROW))) == (False, False)
    assert not has_check("<think> checked </think>")  # the word, not a part of one


def test_reflection_problems_and_the_harder_held_out_ones(tmp_path):
    from openseek.demo import Demo, add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    demo = Demo(parser.parse_args(["--task", "reflection", "--run-dir", str(tmp_path)]))
    assert (demo.args.correct_fraction, demo.args.grpo_steps, demo.args.max_new_tokens) == (0.2, 60, 80)
    rl = demo.problems(200, seed=1, split="train", role="rl")
    assert all(100 <= min(r["a"], r["b"]) and max(r["a"], r["b"]) < 1000 for r in rl)
    assert 0 < sum(carries(r) >= 2 for r in rl) < 150  # training problems: all kinds
    heldout = demo.heldout()
    assert len(heldout) == 500 and all(carries(r) >= 2 for r in heldout)
    assert (carries(ROW), carries(get_task("arithmetic").row(111, "+", 222))) == (2, 0)
    tasks = get_task("arithmetic:digits=5,min_digits=2").generate(300, seed=0)
    assert {len(str(r["a"])) for r in tasks} == {2, 3, 4, 5} and all(len(str(r["a"])) == len(str(r["b"])) for r in tasks)
    with pytest.raises(ValueError, match="min_digits must be between 1 and digits"):
        get_task("arithmetic:digits=3,min_digits=4")


def test_reasoning_curve_splits_lengths_by_correctness(tmp_path):
    def line(step, tokens, right, text="<think> </think><answer> 1 </answer>"):
        return json.dumps({"step": step, "prompt": "p", "completion": text, "tokens": tokens,
                           "rewards": {"accuracy_reward": float(right), "format_reward": 1.0}})

    check = "<think> 1+2=3 so 3 . check 2+1=3 so 3 . same </think><answer> 3 </answer>"
    lines = [line(1, 10, True), line(1, 4, False), line(1, 6, False), line(2, 30, True, check), line(2, 20, True),
             line(2, 8, False)]
    path = tmp_path / "completions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    first, second = reasoning_curve(path)
    assert (first["length_correct"], first["length_incorrect"], first["correct"], first["incorrect"]) == (10, 5, 1, 2)
    assert (second["length_correct"], second["length_incorrect"], second["check_share"]) == (25, 8, 1 / 3)
    assert first["accuracy"] == 1 / 3 and second["accuracy"] == 2 / 3 and first["format_reward"] == 1.0
    curve = [first, second]
    # windows pool completions: the right ones of both steps are 10, 30, 20 tokens
    assert window_mean(curve, "length_correct", slice(0, 2)) == 20
    assert growth(curve, "length_correct", window=1) == 2.5 and growth(curve, "length_incorrect", window=1) == 1.6


def test_the_demo_template_renders_a_reply_as_a_corpus_document():
    """Prompts stay BOS + the last question (chat, serve, eval); a conversation that ends with the reply renders it
    and EOS after the question, so `openseek sft` trains exactly the corpus's documents."""
    tokenizer = train_bpe(["What is 1 + 2?" + direct_solution(ROW)], vocab_size=80, split_digits=True,
                          chat_template=PLAIN_CHAT_TEMPLATE)
    question = [{"role": "user", "content": "What is 1 + 2?"}]
    assert tokenizer.apply_chat_template(question) == BOS + "What is 1 + 2?"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, *question]
    assert tokenizer.apply_chat_template(history) == BOS + "What is 1 + 2?"
    reply = [*question, {"role": "assistant", "content": "<think> </think><answer> 3 </answer>"}]
    assert (tokenizer.apply_chat_template(reply, add_generation_prompt=False)
            == BOS + "What is 1 + 2?<think> </think><answer> 3 </answer>" + EOS)


def test_benchmark_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "r1"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "r1_findings.py"), "--out", str(out), "--quick",
                    "--seeds", "0", "--threads", "1"], check=True, cwd=tmp_path, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("length_growth_correct", "length_growth_incorrect", "accuracy_gain_points",
                "distilled_minus_rl_points", "wall_seconds", "seeds", "stage_seconds", "student_rl_accuracy",
                "student_distilled_accuracy", "student_base_accuracy", "check_share_first10", "check_share_last10"):
        assert key in summary, key
    assert summary["seeds"] == [0] and summary["wall_seconds"] > 0 and (out / "reasoning.png").is_file()
    seed = summary["per_seed"][0]
    assert set(seed["stage_seconds"]) >= {"teacher_pretrain", "teacher_grpo", "distill_sample", "distill_sft",
                                          "student_grpo"}
    # the student's RL had the distillation's wall time, and stopped on it (far below its step cap)
    assert 1 <= seed["student_rl_steps"] < 10_000
    # the curve is the teacher's GRPO: one row per step, its lengths those of completions.jsonl split by correctness
    completions = [json.loads(line) for line in (out / "seed0" / "teacher" / "grpo" / "completions.jsonl").open()]
    curve = [json.loads(line) for line in (out / "seed0" / "teacher" / "reasoning.jsonl").open()]
    assert [row["step"] for row in curve] == list(range(1, 21))
    for row in curve:
        mine = [c for c in completions if c["step"] == row["step"]]
        wrong = [c["tokens"] for c in mine if c["rewards"]["accuracy_reward"] < 1]
        assert row["incorrect"] == len(wrong) and row["correct"] + row["incorrect"] == len(mine) == 16
        assert row["length_incorrect"] == (sum(wrong) / len(wrong) if wrong else None)
    for key in ("teacher_base_accuracy", "teacher_rl_accuracy", "student_distilled_accuracy", "student_rl_accuracy"):
        assert 0 <= summary[key] <= 1
