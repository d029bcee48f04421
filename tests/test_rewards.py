"""Answer checking credits equivalent forms and none of the hacks; rewards are validated and cannot hang."""

import logging
import threading
import time

import pytest

from openseek.rewards import (
    RewardError, accuracy_reward, answers_match, check_answers, countdown_correct, countdown_reward,
    extract_answer, format_reward, load_reward, score,
)

HUGE = "9" * 200_000
BOMB = "2^{2^{2^{2^{2^{2}}}}}"  # sympy evaluates the power tower in C, where no signal reaches it

# (completion, gold answer, credited?)
CASES = [
    # equivalent forms: credited
    ("<think>7+5=12</think><answer> 12 </answer>", "12", True),
    ("<think>half</think><answer>\\frac{1}{2}</answer>", "0.5", True),
    ("<answer>0.5</answer>", "\\frac12", True),
    ("<answer>1,000</answer>", "1000", True),
    ("<answer>1000</answer>", "1,000", True),
    ("<answer>10\\,000</answer>", "10000", True),
    ("So the answer is \\boxed{\\dfrac{3}{4}}.", "0.75", True),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72", True),
    ("first try\n#### 41\nno, recount\n#### 42", "42", True),
    ("<answer>(1, 2)</answer>", "(1,2)", True),
    ("<answer>2, 1</answer>", "1, 2", True),
    ("<answer>x = 5</answer>", "5", True),
    ("<answer>$42$</answer>", "42", True),
    ("<answer>42.</answer>", "42", True),
    ("<answer>\\boxed{7}</answer>", "7", True),
    ("prefilled think says \\boxed{9} </think><answer>4</answer>", "4", True),
    ("<answer>\\sqrt{2}/2</answer>", "\\frac{1}{\\sqrt{2}}", True),
    ("<answer>\\text{(B)}</answer>", "B", True),
    ("\\boxed{5} and, checking again, \\boxed{5}", "5", True),
    ("<answer>\\begin{pmatrix}1\\\\2\\end{pmatrix}</answer>", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("<answer>3.0</answer>", "3", True),
    ("<answer>[3, 4)</answer>", "[3,4)", True),
    # hacks and wrong answers: not credited
    ("<think>12</think><answer></answer>", "12", False),
    ("<answer>3 or 4</answer>", "3", False),
    ("<answer>3, 4</answer>", "3", False),
    ("<answer>either 41 or 42</answer>", "42", False),
    ("<answer>\\{3, 4\\}</answer>", "3", False),
    ("<answer>x = 3, y = 4</answer>", "4", False),
    ("<answer>3 \\pm 1</answer>", "4", False),
    ("<answer>41 \\\\ 42</answer>", "42", False),
    ("<answer>3</answer> hmm <answer>4</answer>", "3", False),
    ("\\boxed{3} wait, no: \\boxed{4}", "4", False),
    ("<think>the answer is <answer>5</answer> \\boxed{5}</think>", "5", False),
    ("<think>still thinking \\boxed{5}", "5", False),
    ("<answer>5", "5", False),
    (f"<answer>{HUGE}</answer>", "12", False),
    (f"<answer>{HUGE}</answer>", HUGE[:10], False),
    ("<answer>\\frac{1}{0}</answer>", "1", False),
    ("<answer>\\frac{1}{0}</answer>", "\\infty", False),
    ("<answer>\\boxed{5</answer>", "5", False),
    ("<answer>5}</answer>", "5", False),
    ("<answer>\\input{/etc/passwd} 42</answer>", "42", False),
    ("<answer>\\def\\x{42}\\x</answer>", "42", False),
    (f"<answer>{BOMB}</answer>", "3", False),
    ("", "1", False),
    ("<answer>13</answer>", "12", False),
]


@pytest.mark.parametrize("completion,gold,credited", CASES, ids=range(len(CASES)))
def test_answer_checking_table(completion, gold, credited):
    assert answers_match(extract_answer(completion), gold, timeout=3) is credited


def test_table_is_large_and_mixed():
    assert len(CASES) >= 30
    assert sum(c for *_, c in CASES) >= 15 and sum(not c for *_, c in CASES) >= 15


def test_batch_checking_agrees_with_single_checks():
    pairs = [(extract_answer(c), g) for c, g, _ in CASES if BOMB not in c]
    assert check_answers(pairs, timeout=3) == [credited for c, _, credited in CASES if BOMB not in c]


@pytest.mark.parametrize("text,expected", [
    ("<think>a</think><answer> 12 </answer>", "12"),
    ("<answer>The total is \\boxed{8}</answer>", "8"),
    ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
    ("\\boxed{{a}{b}}", "{a}{b}"),
    ("#### 1,234\nthanks", "1,234"),
    ("prefilled 99 </think> final <answer>7</answer>", "7"),
    ("<think>a<think>nested \\boxed{1}</think>b</think> \\boxed{2}", "2"),
    ("<answer>1</answer><answer> 1 </answer>", "1"),
    ("<answer>1</answer><answer>2</answer>", None),
    ("<answer>  </answer>", None),
    ("<think><answer>5</answer></think>", None),
    ("\\boxed{5", None),
    ("no answer here", None),
    ("", None),
    (None, None),
    # adversarial shapes that a backtracking parser would take minutes on: each is one linear pass
    ("<answer>" * 25_000, None),
    ("<think>" * 10_000 + "</think>" * 10_000 + "<answer>3</answer>", "3"),
    ("<think><think>" * 10_000 + "</think>" * 10_000 + "<answer>3</answer>", None),  # still thinking
    ("\\boxed{" * 25_000, None),
    ("</think>" * 25_000 + "\\boxed{4}", "4"),
], ids=range(20))
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_time_limit_cuts_a_hanging_check_and_the_pool_recovers(caplog):
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="openseek.rewards"):
        assert answers_match(BOMB, "7", timeout=1) is False
    assert time.monotonic() - start < 30  # without the kill this check runs for many minutes
    assert "exceeded 1.0s" in caplog.text
    assert answers_match("\\frac{6}{8}", "0.75", timeout=3) is True


def test_checking_works_off_the_main_thread():
    # math-verify's own SIGALRM timeout raises outside the main thread; ours runs in worker processes
    verdicts = []
    thread = threading.Thread(target=lambda: verdicts.append(answers_match("\\frac{2}{4}", "0.5")))
    thread.start()
    thread.join()
    assert verdicts == [True]


def test_format_reward():
    completions = [
        "<think>7+5=12</think><answer>12</answer>",
        "<think>a</think>\n<answer>12</answer>\n",
        "7+5=12</think><answer>12</answer>",  # prompt prefilled <think>
        "7+5=12</think><answer>12</answer>",  # not prefilled: missing <think>
        "<think>a</think><answer></answer>",
        "<think>a</think><think>b</think><answer>1</answer>",
        "<think>a</think><answer>1</answer> and more",
        "<answer>1</answer>",
    ]
    prompts = ["Q: <think>" if i == 2 else "Q:" for i in range(len(completions))]
    assert format_reward(completions, prompts) == [1, 1, 1, 0, 0, 0, 0, 0]


def test_accuracy_reward_uses_the_answer_column():
    completions = ["<answer>12</answer>", "<answer>13</answer>", "<think>12</think>", "\\boxed{0.5}"]
    assert accuracy_reward(completions, ["q"] * 4, answer=["12", "12", "12", "1/2"]) == [1, 0, 0, 1]


def test_countdown_checks_numbers_and_value_exactly():
    nums, target = [1, 3, 4, 6], 24
    assert countdown_correct("6/(1-3/4)", nums, target)  # fractional intermediate, exact arithmetic
    assert countdown_correct("6 / (1 - 3/4) = 24", nums, target)
    assert not countdown_correct("6/(1-3/4) = 25", nums, target)
    assert not countdown_correct("6*4", nums, target)  # not every number used
    assert not countdown_correct("6*4*1*1", nums, target)  # 1 used twice, 3 missing
    assert not countdown_correct("24", nums, target)
    assert not countdown_correct("6*4/(3-3)", [6, 4, 3, 3], 24)  # division by zero
    assert not countdown_correct("-1+3*6+4+3", [1, 3, 6, 4, 3], 24)  # no unary minus
    assert not countdown_correct("__import__('os')", nums, target)
    rewards = countdown_reward(["<answer>(6-4+1)*3+15</answer>", "<answer>3*6-4</answer>"], ["q", "q"],
                               nums=[[1, 3, 4, 6, 15], [3, 4, 6]], target=[24, 14])
    assert rewards == [1.0, 1.0]


def _write(tmp_path, body):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_load_reward_by_name_and_from_file(tmp_path):
    assert load_reward("format") is format_reward
    path = _write(tmp_path, "def short(completions, prompts, **columns):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    fn = load_reward(f"{path}:short")
    assert score(fn, ["ab", ""], ["p", "p"]) == [1 / 3, 1.0]
    with pytest.raises(RewardError, match="has no function 'missing' .*it has: short"):
        load_reward(f"{path}:missing")
    with pytest.raises(RewardError, match="does not exist"):
        load_reward(f"{tmp_path}/nope.py:fn")
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        load_reward("nope")


def test_extra_columns_reach_custom_rewards(tmp_path):
    path = _write(tmp_path, "def bonus(completions, prompts, weight, **columns):\n    return [w * 2 for w in weight]\n")
    assert score(load_reward(f"{path}:bonus"), ["a", "b"], ["p", "q"], {"weight": [1, 2.5]}) == [2.0, 5.0]


@pytest.mark.parametrize("body,message", [
    ("return [1.0]", "reward function wrong returned 1 rewards for 2 completions"),
    ("return None", "reward function wrong returned NoneType"),
    ("return [1.0, 'good']", "reward function wrong returned 'good' \\(str\\) at position 1"),
    ("return [1.0, None]", "reward function wrong returned None \\(NoneType\\) at position 1"),
    ("return [float('nan'), 1.0]", "reward function wrong returned nan at position 0"),
])
def test_bad_reward_output_names_the_function(tmp_path, body, message):
    path = _write(tmp_path, f"def wrong(completions, prompts, **columns):\n    {body}\n")
    with pytest.raises(RewardError, match=message):
        score(load_reward(f"{path}:wrong"), ["a", "b"], ["p", "p"])


@pytest.mark.parametrize("body,log", [
    ("raise RuntimeError('verifier crashed')", "verifier crashed"),
    ("import time; time.sleep(600)", "ran past 1s"),
    ("while True: pass", "ran past 1s"),
    ("import os; os._exit(3)", "died"),
])
def test_broken_reward_gives_zero_and_a_warning(tmp_path, caplog, body, log):
    path = _write(tmp_path, f"def broken(completions, prompts, **columns):\n    {body}\n")
    with caplog.at_level(logging.WARNING, logger="openseek.rewards"):
        assert score(load_reward(f"{path}:broken"), ["a", "b"], ["p", "p"], timeout=1) == [0.0, 0.0]
    assert log in caplog.text and "broken" in caplog.text


def test_custom_reward_may_use_answer_checking(tmp_path):
    path = _write(tmp_path, "from openseek.rewards import accuracy_reward\n"
                            "def acc(completions, prompts, **columns):\n    return accuracy_reward(completions, prompts, **columns)\n")
    assert score(load_reward(f"{path}:acc"), ["\\boxed{\\frac{1}{2}}", "\\boxed{2}"], ["p", "p"], {"answer": ["0.5", "3"]}) == [1.0, 0.0]
    assert answers_match("\\frac{3}{6}", "0.5")  # the parent's workers are untouched by the child


def test_a_checker_that_cannot_start_is_an_error_not_a_silent_zero(monkeypatch):
    from openseek import rewards

    monkeypatch.setattr(rewards.sys, "executable", "/bin/false")
    broken = rewards.AnswerChecker(workers=1)
    monkeypatch.setattr(rewards, "_checker", broken)
    monkeypatch.setattr(rewards, "_cache", {})
    with pytest.raises(rewards.CheckerUnavailable, match="did not start"):
        score(accuracy_reward, ["\\boxed{\\frac{1}{2}}"], ["q"], {"answer": ["0.5"]})
    broken.close()
