"""`openseek sample`: k completions per prompt, exactly the accepted ones written as SFT `messages` JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import openseek
from openseek.cli import main as cli
from openseek.engine import Engine, stop_token_ids
from openseek.tasks import get_task
from openseek.tokenizer import Tokenizer
from openseek.train.rollout import encode_prompt
from openseek.train.sample import to_messages

from helpers_grpo import tiny_model_dir

HELPERS = Path(__file__).parent / "helpers_grpo.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("sample") / "model", seed=3)


def test_messages_put_the_reasoning_inside_think():
    r1_zero = "... User: What is 2 + 2?. Assistant:"
    assert to_messages("What is 2 + 2?", r1_zero, " <think> 2+2=4 </think> <answer> 4 </answer>") == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\n<answer> 4 </answer>"},
    ]
    # R1's chat template opened the think block: the completion starts inside it
    chat = "<｜User｜>What is 2 + 2?<｜Assistant｜><think>\n"
    assert to_messages("Q", chat, "2+2=4\n</think>\n\nThe answer is 4.")[1]["content"] == (
        "<think>\n2+2=4\n</think>\n\nThe answer is 4.")
    assert to_messages("Q", r1_zero, "just 4")[1]["content"] == "<think>\n\n</think>\n\njust 4"


def test_sample_writes_exactly_the_accepted_completions(model_dir, tmp_path):
    out = tmp_path / "sft.jsonl"
    k, n, max_new = 6, 5, 10
    assert cli(["sample", "--model", str(model_dir), "--task", "arithmetic", "--task-size", str(n), "--k", str(k),
                "--reward", f"{HELPERS}:digit_share", "--min-reward", "0.3", "--template", "r1-zero",
                "--max-new-tokens", str(max_new), "--temperature", "1.0", "--top-p", "1.0", "--output", str(out),
                "--batch-prompts", "8", "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert not out.with_name("sft.jsonl.partial").exists()

    # Regenerate the same completions (same seed) and apply the acceptance rule by hand.
    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(n, seed=0)
    encoded = [encode_prompt(tokenizer, r["prompt"], "r1-zero") for r in rows]
    groups = Engine(model).generate([ids for _, ids in encoded], max_new, temperature=1.0, n=k,
                                    stop_token_ids=stop_token_ids(model.cfg, tokenizer), seed=0)
    expected = []
    for row, (text, _), group in zip(rows, encoded, groups):
        seen = set()
        for c in group:
            completion = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            share = sum(ch.isdigit() for ch in completion) / max(1, len(completion))
            if share >= 0.3 and completion not in seen:
                seen.add(completion)
                expected.append((row["id"], to_messages(row["prompt"], text, completion), share))
    assert 0 < len(expected) < n * k  # the rule keeps some and rejects some: the test can tell them apart
    assert [(x["id"], x["messages"]) for x in lines] == [(i, m) for i, m, _ in expected]
    assert [x["rewards"]["digit_share"] for x in lines] == pytest.approx([s for _, _, s in expected])
    for x in lines:
        assert x["messages"][0]["role"] == "user" and x["messages"][1]["content"].startswith("<think>\n")


def test_sample_is_sft_ready(model_dir, tmp_path):
    """The written file is read by the SFT data path: chat-rendered, loss on the assistant turn only."""
    from openseek.data import encode_conversation

    out = tmp_path / "sft.jsonl"
    assert cli(["sample", "--model", str(model_dir), "--task", "arithmetic", "--task-size", "3", "--k", "1",
                "--reward", f"{HELPERS}:digit_share", "--min-reward", "0", "--max-new-tokens", "6",
                "--output", str(out), "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3  # min-reward 0 accepts everything; k = 1 gives one each
    tokenizer = Tokenizer.from_dir(model_dir)
    ids, labels = encode_conversation(tokenizer, lines[0]["messages"])
    trained = [t for t, label in zip(ids, labels) if label != -100]
    # R1's chat template prefills "<think>\n" in the generation prompt; SFT trains the rest of the turn and EOS
    content = lines[0]["messages"][1]["content"]
    assert tokenizer.decode(trained) == content.removeprefix("<think>\n") + tokenizer.eos_token


def test_sample_without_a_reward_or_answers_is_refused(model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say something"}) + "\n")
    with pytest.raises(ValueError, match="no --reward given and the dataset has no `answer` column"):
        cli(["sample", "--model", str(model_dir), "--dataset", str(data), "--output", str(tmp_path / "o.jsonl")])
