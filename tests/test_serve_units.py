"""The pieces of `openseek serve` that need no server: reasoning split, tool-call parsing, incremental decoding,
stop strings, bind."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openseek.serve.detokenize import IncrementalDecoder, StopMatcher
from openseek.serve.gate import check_bind, is_loopback
from openseek.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning, strip_reasoning
from openseek.serve.tools import CALL_CLOSE, CALL_OPEN, ToolCallParser


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


# ---- tool calls in the answer: model output is untrusted input ------------------------------------------------

TOOL_NAMES = {"add", "get_weather"}


def parse_all(pieces):
    """(content, calls) of an answer streamed as `pieces`, as the server collects them."""
    parser = ToolCallParser(TOOL_NAMES)
    content, calls = "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content, calls = content + text, calls + new
    text, new = parser.flush()
    assert parser.calls == calls + new
    return content + text, calls + new


@pytest.mark.parametrize("block", [
    '{"name": ["add"], "arguments": {}}',  # a name that is a list (it was a TypeError, unhashable)
    '{"name": {"add": 1}, "arguments": {}}',
    '{"name": 7, "arguments": {}}',
    '{"name": null}',
    '{"name": "add", "arguments": ["a"]}',
    '{"name": "add", "arguments": {"a": NaN}}',  # Python's extension, not JSON
    '{"name": "add", "arguments": {"a": 1e999}}',  # a float Python reads as infinity
    '{"name": "add", "arguments": {"a": "\\udcff"}}',  # an escaped lone surrogate: no UTF-8 response holds it
    '{"name": "add", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",  # deeper than json.loads goes
    '{"name": "add", "arguments": {"a": 1' + "0" * 5000 + "}}",  # more digits than int() takes
    '["add", {}]',
    '{"name": "add", "arguments": {"a": 1}',  # cut short
])
def test_a_block_that_is_no_call_stays_text_as_the_model_wrote_it(block):
    answer = f"Let me see. {CALL_OPEN}\n{block}\n{CALL_CLOSE}\nDone."
    for pieces in chunkings(answer):
        assert parse_all(pieces) == (answer, [])


def test_a_call_leaves_the_text_around_it_and_takes_the_newline_after_it():
    answer = f'Sure.\n{CALL_OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": "é"}}}}\n{CALL_CLOSE}\nThen this.'
    for pieces in chunkings(answer):
        content, [call] = parse_all(pieces)
        assert content == "Sure.\nThen this."
        assert (call.index, call.name, call.arguments) == (0, "add", '{"a": 1, "b": "é"}')


PLAIN_CHARS = st.characters() | st.sampled_from("<>/{}[]\"\\:,\n ")
MODEL_TEXT = st.text(PLAIN_CHARS, max_size=8) | st.text(PLAIN_CHARS | st.integers(0xD800, 0xDFFF).map(chr), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | MODEL_TEXT,  # floats include NaN and infinities
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(MODEL_TEXT, inner, max_size=3), max_leaves=6)
CALLS = st.fixed_dictionaries({"name": st.sampled_from(sorted(TOOL_NAMES)),
                               "arguments": st.dictionaries(st.text(PLAIN_CHARS, max_size=6), JSON_VALUES,
                                                            max_size=3)})
CALL_LIKE_OBJECTS = st.fixed_dictionaries({}, optional={  # names that are strings, lists, numbers, null, dicts
    "name": st.sampled_from(sorted(TOOL_NAMES)) | st.just("unknown") | JSON_VALUES,
    "arguments": st.dictionaries(MODEL_TEXT, JSON_VALUES, max_size=3) | JSON_VALUES,
    "id": JSON_VALUES,
})


@st.composite
def call_blocks(draw) -> str:
    """A call block as a model might write it: a call or not, closed, half-closed or left open."""
    value = draw(st.one_of(CALLS, CALLS, CALL_LIKE_OBJECTS, JSON_VALUES))  # calls twice as often as the others
    body = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    if draw(st.integers(0, 3)) == 0:
        body = body[:draw(st.integers(0, len(body)))]  # cut short: no longer JSON (mostly)
    space = st.sampled_from(["", "\n", " \n", "\n\n"])
    return CALL_OPEN + draw(space) + body + draw(space) + draw(st.sampled_from([CALL_CLOSE] * 4 + ["", "</tool_"]))


MODEL_OUTPUTS = st.lists(
    MODEL_TEXT | call_blocks() | st.sampled_from([CALL_OPEN, CALL_CLOSE, "<tool_", "</tool_call", "\n", "\n\n"]),
    max_size=6).map("".join)

# The parser's rule stated on the whole output at once. A block runs from an opening tag to the first closing tag
# after it, or to the end of the output; rejoined, the text between blocks and the blocks are the output.
BLOCK = re.compile(f"({re.escape(CALL_OPEN)}.*?(?:{re.escape(CALL_CLOSE)}|\\Z))", re.S)


def call_in(block: str) -> tuple[str, dict] | None:
    """(name, arguments) when the block is a call: a JSON object, `name` one of the tools, `arguments` an object
    (or left out) that writes back as strict JSON (no NaN or infinity) and as UTF-8 (no lone surrogate)."""
    def not_json(constant):
        raise ValueError(constant)

    body = block.removeprefix(CALL_OPEN).removesuffix(CALL_CLOSE).strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in TOOL_NAMES:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    try:
        json.loads(json.dumps(arguments), parse_constant=not_json)  # a non-finite float is written as NaN/Infinity
    except ValueError:
        return None
    if any("\ud800" <= c <= "\udfff" for c in json.dumps(arguments, ensure_ascii=False)):
        return None
    return value["name"], arguments


def expected_parse(output: str) -> tuple[str, list[tuple[str, dict]]]:
    """content: the output without its call blocks (and the newlines right after each, the format's); every other
    block stays, exactly as written. calls: each call block's name and arguments, in order."""
    segments = BLOCK.split(output)
    assert "".join(segments) == output
    content, calls, after_call = [], [], False
    for i, segment in enumerate(segments):
        if i % 2 == 0:  # text between blocks
            content.append(segment.lstrip("\n") if after_call else segment)
            continue
        call = call_in(segment)
        after_call = call is not None
        if after_call:
            calls.append(call)
        else:
            content.append(segment)
    return "".join(content), calls


@settings(max_examples=2000, deadline=None)
@given(output=MODEL_OUTPUTS, data=st.data())
def test_parsing_any_output_streamed_any_way_never_raises_and_loses_no_text(output, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(output)), max_size=8), label="cuts")))
    pieces = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])]
    assert "".join(pieces) == output
    content, calls = parse_all(pieces)
    expected_content, expected_calls = expected_parse(output)
    assert content == expected_content
    assert [(call.name, json.loads(call.arguments)) for call in calls] == expected_calls
    assert [call.index for call in calls] == list(range(len(calls)))
    assert len({call.id for call in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


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
