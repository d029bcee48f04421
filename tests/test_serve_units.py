"""The pieces of `openseek serve` that need no server: reasoning split, incremental decoding, stop strings, bind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openseek.serve.detokenize import IncrementalDecoder, StopMatcher
from openseek.serve.gate import check_bind, is_loopback
from openseek.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning, strip_reasoning


def split_all(pieces, in_reasoning=False):
    splitter = ReasoningSplitter(in_reasoning)
    reasoning, content = "", ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


def chunkings(text):
    """The same text cut every possible way that matters: whole, per character, in threes."""
    return [[text], list(text), [text[i:i + 3] for i in range(0, len(text), 3)]]


@pytest.mark.parametrize("text, prefilled, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, "Let me see.\n", "It is 4."),
    ("Let me see.</think>It is 4.", True, "Let me see.", "It is 4."),  # template already opened <think>
    ("Still thinking", True, "Still thinking", ""),  # cut off before </think>: all of it is reasoning
    ("Plain answer < 5 and <thin", False, "", "Plain answer < 5 and <thin"),  # half a tag at the end stays text
    ("No reasoning at all.", False, "", "No reasoning at all."),
    (" 7 b", False, "", " 7 b"),  # no tag before the answer: kept as written, leading space included
    ("<think></think>Just this.", False, "", "Just this."),
])
def test_reasoning_split_is_the_same_however_the_text_is_streamed(text, prefilled, reasoning, content):
    for pieces in chunkings(text):
        assert split_all(pieces, prefilled) == (reasoning, content), pieces


def test_a_streamed_delta_never_shows_part_of_a_tag():
    splitter = ReasoningSplitter(in_reasoning=True)
    assert splitter.feed("abc</th") == ("abc", "")
    assert splitter.feed("ink>xyz") == ("", "xyz")


def test_prompt_opens_reasoning_and_earlier_reasoning_is_dropped():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜Assistant｜>")
    assert not prompt_opens_reasoning("<think>a</think>b<｜Assistant｜>")
    assert strip_reasoning("<think>secret</think>\n\nThe answer.") == "The answer."
    assert strip_reasoning("The answer.") == "The answer."


@pytest.mark.parametrize("stops, pieces, emitted", [
    (["STOP"], ["abc", "ST", "OP", "def"], "abc"),
    (["STOP"], ["abcSTOPdef"], "abc"),
    (["xy", "b"], ["a", "bxy"], "a"),  # the earliest stop wins
    (["STOP"], ["ST", "ab"], "STab"),  # a false start is released
])
def test_stop_strings_cut_at_the_first_match_even_across_pieces(stops, pieces, emitted):
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    assert out == emitted


def test_stop_matcher_holds_back_only_what_could_still_become_a_stop():
    matcher = StopMatcher(["world"])
    assert matcher.feed("hello wor") == "hello "
    assert matcher.feed("k") == "work"


def test_incremental_decoding_equals_decoding_everything_at_once():
    from openseek.tokenizer import train_bpe

    text = "Grüße, 世界! naïve café — 🙂 done"
    tokenizer = train_bpe([text * 3], vocab_size=270)
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # some characters span tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("host, key, refused", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("0.0.0.0", "k", False),
])
def test_only_loopback_is_served_without_a_key(host, key, refused):
    assert (check_bind(host, key) is not None) == refused
    assert is_loopback(host) == (host in ("127.0.0.1", "localhost", "::1"))


def test_the_terminal_chat_loads_no_web_framework():
    """`openseek chat` shares the server's engine side (server.py), which must not pull in FastAPI or Starlette."""
    probe = "import openseek.chat, sys; print('fastapi' in sys.modules, 'starlette' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_a_character_cut_short_at_the_end_is_flushed_as_decoding_everything_does():
    from openseek.tokenizer import train_bpe

    tokenizer = train_bpe(["plain text only"], vocab_size=270)
    ids = tokenizer.encode("ab🙂")[:-1]  # the emoji's last byte is missing
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.add(i) for i in ids)
    assert text == "ab"  # held back while it might still complete
    assert text + decoder.flush() == tokenizer.decode(ids) and tokenizer.decode(ids).endswith("\ufffd")
    assert decoder.flush() == ""
