"""Tokenizer: byte-level BPE round trips, directory save/load, and chat templates equal to transformers'."""

from __future__ import annotations

import json

import pytest

from openseek.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    END_THINK,
    R1_CHAT_TEMPLATE,
    THINK,
    USER,
    Tokenizer,
    TokenizerError,
    train_bpe,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 35 = 47, and 7 × 6 = 42.",
    "Héllo wörld — unicode: 日本語のテキスト, emoji 🙂, tabs\tand\nnewlines.",
    "def f(x):\n    return x ** 2  # squares\n",
] * 30

# A ChatML template in the style of Qwen2.5's: default system prompt, <|im_start|>role ... <|im_end|> blocks,
# written with {% %} tags on their own lines so trim_blocks/lstrip_blocks matter.
QWEN_STYLE_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Again, with thought"},
        {"role": "assistant", "content": "<think>\nsimple\n</think>\n\nhi again 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT, "<|im_start|>", "<|im_end|>"])


def test_round_trip_and_special_tokens(tokenizer):
    for text in [*CORPUS[:3], "", " leading space", "unseen: ÆØÅ ∑∫ 😀 \x00"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.bos_token_id
    ids = tokenizer.encode(f"{USER}x{ASSISTANT}{THINK}\ny{END_THINK}")
    for token in (USER, ASSISTANT, THINK, END_THINK):
        assert tokenizer.token_to_id(token) in ids  # each is one id, never split
    text = f"{THINK}\nplan{END_THINK}\n\nok"
    assert tokenizer.decode(tokenizer.encode(text + EOS), skip_special_tokens=True) == text


def test_split_digits_keeps_each_digit_apart_with_its_leading_space():
    """Digits never merge with each other (a column-by-column method needs them one by one); a space before a digit
    merges with it when the corpus makes that frequent, as in the demo's documents; unicode digits split too."""
    text = "What is 478 + 395? 7+9=16 , 4+3=7 ١٢"
    split = train_bpe([text] * 200, vocab_size=300, split_digits=True)
    pieces = [split.decode([i]) for i in split.encode(text)]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [
        " 4", "7", "8", " 3", "9", "5", " 7", "9", "1", "6", " 4", "3", "7", " ١", "٢"]
    merged = train_bpe([text] * 200, vocab_size=300)  # without the option, frequent numbers become single tokens
    assert " 478" in [merged.decode([i]) for i in merged.encode(text)]


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == R1_CHAT_TEMPLATE and config["eos_token"] == EOS
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab_size == tokenizer.vocab_size
    assert again.encode(CORPUS[1]) == tokenizer.encode(CORPUS[1])
    assert again.apply_chat_template(CHATS[2]) == tokenizer.apply_chat_template(CHATS[2])


def test_r1_template_format(tokenizer):
    text = tokenizer.apply_chat_template(CHATS[2])
    assert text == (
        f"{BOS}{USER}What is 2 + 2?{ASSISTANT}\n\nThe answer is 4.{EOS}{USER}And 3 + 3?{ASSISTANT}{THINK}\n"
    )
    last = tokenizer.apply_chat_template(CHATS[3], add_generation_prompt=False)
    assert last.endswith(f"{ASSISTANT}<think>\nsimple\n</think>\n\nhi again 🙂{EOS}")  # last turn keeps reasoning
    assert tokenizer.apply_chat_template(CHATS[1]).startswith(f"{BOS}Answer briefly.{USER}")


@pytest.mark.parametrize("template", ["r1", "qwen"])
def test_chat_template_equals_transformers(tokenizer, tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    chat_template = R1_CHAT_TEMPLATE if template == "r1" else QWEN_STYLE_TEMPLATE
    tok = Tokenizer(tokenizer.tokenizer, tokenizer.config, chat_template)
    tok.save(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    theirs = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for chat in CHATS:
        for generation_prompt in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            assert text == expected
            ids = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            assert ids == theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt,
                                                     return_dict=False)
    if template == "qwen":
        assert ours.apply_chat_template(CHATS[0]) == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
        )


def test_template_from_jinja_file_and_sandbox(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hey"}]) == "HEY"
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|__class__"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_cli_trains_and_saves(tmp_path):
    from openseek.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--output-dir",
                 str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 300 + 2 and tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]
