"""Data: streamed readers, packing with EOS separators, exact data positions, SFT masks, rank slicing, bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers_train import successor_documents, tiny_tokenizer, write_corpus
from openseek import data
from openseek.tokenizer import EOS, Tokenizer

DOCS = successor_documents(60, seed=3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(DOCS)


def _stream(tok, docs):
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_token_id]
    return out


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_packing_concatenates_documents_with_eos(tok, tmp_path, kind):
    if kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": DOCS}), path, row_group_size=7)
    else:
        path = write_corpus(tmp_path / f"c.{kind}", DOCS, kind)
    rows = data.PackedRows(data.Records([path]), tok, seq_len=31, epochs=1)
    got = [r.tolist() for r in rows]
    stream = _stream(tok, DOCS)
    assert all(len(r) == 32 for r in got)
    assert sum(got, []) == stream[: len(got) * 32]  # every token in order; only the last partial row is dropped
    assert len(got) == len(stream) // 32


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_position_resumes_at_the_same_token(tok, tmp_path, kind):
    if kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": DOCS}), path, row_group_size=5)
    else:
        path = write_corpus(tmp_path / "c.jsonl", DOCS)
    files = [path, write_corpus(tmp_path / "d.txt", DOCS[:9], "txt")]  # two files, several epochs
    straight = data.PackedRows(data.Records(files), tok, seq_len=20)
    for _ in range(37):
        next(straight)
    state = json.loads(json.dumps(straight.state_dict()))  # it goes through JSON in checkpoints
    resumed = data.PackedRows(data.Records(files), tok, seq_len=20)
    resumed.load_state_dict(state)
    for _ in range(80):  # across file and epoch boundaries
        assert torch.equal(next(resumed), next(straight))


def test_malformed_jsonl_line_is_named_or_skipped(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:5]]
    lines[2] = '{"text": "unterminated'
    lines[3] = '{"body": "wrong field"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=rf"{path}:3: .*--skip-bad-lines"):
        list(data.PackedRows(data.Records([path]), tok, 8, epochs=1))
    records = data.Records([path], skip_bad_lines=True)
    packed = sum((r.tolist() for r in data.PackedRows(records, tok, 8, epochs=1)), [])
    kept = _stream(tok, [DOCS[0], DOCS[1], DOCS[4]])
    assert packed == kept[: len(kept) // 9 * 9]
    assert records.skipped == 2
    with pytest.raises(data.DataError, match=rf"{path}:4: no 'text' field"):
        list(data.Records([path]).read(0, 3))


def test_reading_streams(tok, tmp_path):
    """Records are read lazily: a file whose tail is broken still yields its head (nothing is loaded whole)."""
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": "w1 w2"}) + "\n" + "garbage\n" * 1000)
    first = next(data.Records([path]).read(0))
    assert first[1] == "w1 w2" and first[2] == f"{path}:1"


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.Records([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="unsupported data file type '.csv'"):
        data.Records([tmp_path / "x.csv"])


CHAT = [
    {"role": "user", "content": "w1 w2?"},
    {"role": "assistant", "content": "<think>\nw3 w4\n</think>\n\nw5"},
]


def _trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != data.IGNORE])


def test_sft_masks_only_assistant_tokens(tok):
    ids, labels = data.encode_conversation(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    # The generation prompt ends with "<think>\n", so training starts right after it: reasoning, answer, EOS.
    assert _trained_text(tok, ids, labels) == "w3 w4\n</think>\n\nw5" + EOS
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=True)
    assert all(lab == data.IGNORE for lab in labels[: len(prompt)])


def test_sft_multi_turn_masks(tok):
    chat = [
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2"},  # no reasoning: kept verbatim later, so trained
        {"role": "user", "content": "w3"},
        {"role": "assistant", "content": "<think>\nw9\n</think>\n\nw4"},  # reasoning dropped later: not trained
        {"role": "user", "content": "w5"},
        {"role": "assistant", "content": "<think>\nw6\n</think>\n\nw7"},
    ]
    ids, labels = data.encode_conversation(tok, chat)
    trained = _trained_text(tok, ids, labels)
    assert trained == f"w2{EOS}" + "w6\n</think>\n\nw7" + EOS


def test_sft_masks_with_a_chatml_template(tok, tmp_path):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    other = Tokenizer(tok.tokenizer, tok.config, chatml)
    ids, labels = data.encode_conversation(other, CHAT)
    assert _trained_text(other, ids, labels) == CHAT[1]["content"] + "<|im_end|>\n"


def test_conversation_rows_and_collate(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT[:1] + [{"role": "assistant", "content": d}]}) + "\n"
                            for d in DOCS[:6]))
    rows = data.ConversationRows(data.Records([path], field="messages"), tok, max_len=20, epochs=1)
    batch = data.collate_conversations([next(rows) for _ in range(3)], pad_id=tok.pad_token_id)
    full = [data.encode_conversation(tok, CHAT[:1] + [{"role": "assistant", "content": d}]) for d in DOCS[:3]]
    assert rows.truncated == sum(len(ids) > 20 for ids, _ in full)
    for r, (ids, labels) in enumerate(full):
        n = min(len(ids), 20) - 1
        assert batch["input_ids"][r, :n].tolist() == ids[:n]
        assert batch["labels"][r, :n].tolist() == labels[1: n + 1]  # labels are shifted targets
        assert (batch["labels"][r, n:] == data.IGNORE).all()


def test_conversation_errors_are_named(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:1]}) + "\n")
    rows = data.ConversationRows(data.Records([path], field="messages"), tok, 64, epochs=1)
    next(rows)
    with pytest.raises(data.DataError, match=rf"{path}:2: conversation has no assistant message"):
        next(rows)
    with pytest.raises(data.DataError, match=r"messages\[0\] needs a string 'role'"):
        data.encode_conversation(tok, [{"content": "x"}])


def test_ranks_split_every_global_batch(tok, tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", DOCS)

    def batches(rank, world, size):
        rows = data.PackedRows(data.Records([path]), tok, 16)
        return data.Batches(rows, size, data.collate_packed, rank, world)

    one = batches(0, 1, 4)
    two = [batches(0, 2, 2), batches(1, 2, 2)]
    for _ in range(5):
        whole = next(one)
        parts = [next(b) for b in two]
        assert torch.equal(whole["input_ids"], torch.cat([p["input_ids"] for p in parts]))
        assert torch.equal(whole["labels"], torch.cat([p["labels"] for p in parts]))
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()
