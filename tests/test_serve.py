"""`openseek serve` end to end: the official `openai` client, bad inputs, limits, auth, fuzzing and load, all
against a live server on loopback running a tiny real model whose replies are known in advance (see
helpers_serve.py): every chat is answered with reasoning REASONING and answer ANSWER.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_serve import ANSWER, CONTEXT, COIN_PROMPT, LOOP_PROMPT, REASONING, LiveServer, metrics, save_model_dir

KEY = "test-key-5f1c"
AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from openseek.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    live = LiveServer(model_dir, "--api-key", KEY, "--max-sequences", "48", "--max-body-bytes", "65536",
                      audit_network=True)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))


def reply_tokens(tokenizer) -> tuple[int, int]:
    """(completion tokens, reasoning tokens) of the scripted reply: reasoning + </think>, answer, EOS."""
    reasoning = len(tokenizer.encode(REASONING)) + 1
    return reasoning + len(tokenizer.encode(ANSWER)) + 1, reasoning


# ---- the official client ------------------------------------------------------------------------------------


def test_chat_splits_reasoning_and_counts_usage(client, tokenizer):
    response = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0.7)
    choice = response.choices[0]
    assert choice.message.content == ANSWER
    assert choice.message.reasoning_content == REASONING
    assert choice.finish_reason == "stop"
    completion, reasoning = reply_tokens(tokenizer)
    usage = response.usage
    assert usage.prompt_tokens == prompt_tokens(tokenizer, HELLO)
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (completion, reasoning)
    assert usage.total_tokens == usage.prompt_tokens + completion


def test_chat_streams_reasoning_then_answer_with_usage(client, tokenizer):
    stream = client.chat.completions.create(model="tiny", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    content = [d.content for d in deltas if d.content]
    assert "".join(reasoning) == REASONING and "".join(content) == ANSWER
    assert len(reasoning) > 1 and len(content) > 1  # streamed piece by piece, not in one block
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if d.content or
             getattr(d, "reasoning_content", None)]
    assert kinds == sorted(kinds, reverse=True)  # all reasoning first, then all answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []  # include_usage: a last chunk with usage and no choices
    completion, reasoning_tokens = reply_tokens(tokenizer)
    assert chunks[-1].usage.completion_tokens == completion
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(tokenizer, HELLO)
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(client.chat.completions.create(model="tiny", messages=HELLO, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked


def test_reasoning_sent_back_is_dropped_from_the_prompt(client, tokenizer):
    bare = HELLO + [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Hi"}]
    with_reasoning = HELLO + [
        {"role": "assistant", "content": f"<think>\nsecret musings\n</think>\n\n{ANSWER}",
         "reasoning_content": "more secret musings"},
        {"role": "user", "content": "Hi"},
    ]
    a = client.chat.completions.create(model="tiny", messages=bare)
    b = client.chat.completions.create(model="tiny", messages=with_reasoning)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == prompt_tokens(tokenizer, bare)
    assert b.choices[0].message.content == ANSWER


def test_n_choices_each_complete(client, tokenizer):
    response = client.chat.completions.create(model="tiny", messages=HELLO, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER and c.message.reasoning_content == REASONING for c in response.choices)
    completion, reasoning = reply_tokens(tokenizer)
    assert response.usage.completion_tokens == 3 * completion
    assert response.usage.completion_tokens_details.reasoning_tokens == 3 * reasoning

    answers = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="tiny", messages=HELLO, n=2, stream=True):
        for choice in chunk.choices:
            answers[choice.index] += choice.delta.content or ""
    assert answers == {0: ANSWER, 1: ANSWER}


def test_n_samples_differ_and_a_seed_repeats_them(client):
    def toss(seed):
        response = client.completions.create(model="tiny", prompt=COIN_PROMPT, n=8, seed=seed, max_tokens=4)
        return [c.text for c in response.choices]

    first = toss(seed=1234)
    assert set(first) == {" heads", " tails"}  # a fair coin, 8 tosses, this seed: both sides come up
    assert toss(seed=1234) == first


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(client, stream):
    def ask(stop):
        response = client.chat.completions.create(model="tiny", messages=HELLO, stop=stop, stream=stream)
        if not stream:
            message = response.choices[0].message
            return message.reasoning_content, message.content, response.choices[0].finish_reason
        reasoning, content, finish = "", "", None
        for chunk in response:
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return reasoning or None, content, finish

    assert ask(" is") == (REASONING, "The answer", "stop")
    assert ask(["nothing", "swer i"]) == (REASONING, "The an", "stop")  # spans two tokens
    assert ask("numbers") == ("Summing both ", "", "stop")  # stop strings apply to the reasoning too


def test_text_completion_stops_at_max_tokens(client):
    response = client.completions.create(model="tiny", prompt=LOOP_PROMPT, max_tokens=5)
    assert response.choices[0].text == " forever" * 5
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model="tiny", prompt=LOOP_PROMPT, max_tokens=3, stream=True))
    assert streamed == " forever" * 3


def test_models_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    values = metrics(server.url, AUTH)
    assert values["openseek_generation_tokens_total"] > 0
    assert values["openseek_reasoning_tokens_total"] > 0
    assert values['openseek_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["openseek_sequences_in_flight"] == 0


# ---- bad inputs ---------------------------------------------------------------------------------------------

GOOD = {"model": "tiny", "messages": HELLO, "max_tokens": 32}
BAD_INPUTS = [
    # name, path, body (dict = JSON, bytes = raw), extra headers, expected status
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', {}, 400),
    ("body is not an object", "/v1/chat/completions", b"[1, 2, 3]", {}, 400),
    ("not JSON content type", "/v1/chat/completions", json.dumps(GOOD).encode(),
     {"content-type": "text/plain"}, 400),
    ("messages wrong type", "/v1/chat/completions", {**GOOD, "messages": "hello"}, {}, 422),
    ("temperature wrong type", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, {}, 422),
    ("content wrong type", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, {}, 422),
    ("unknown role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, {}, 422),
    ("image content", "/v1/chat/completions", {**GOOD, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, {}, 422),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, {}, 422),
    ("missing model", "/v1/chat/completions", {"messages": HELLO}, {}, 422),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-4"}, {}, 404),
    ("max_tokens beyond context", "/v1/chat/completions", {**GOOD, "max_tokens": CONTEXT}, {}, 400),
    ("prompt beyond context", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "Hello " * CONTEXT}]}, {}, 400),
    ("negative max_tokens", "/v1/chat/completions", {**GOOD, "max_tokens": -1}, {}, 422),
    ("zero max_completion_tokens", "/v1/chat/completions", {**GOOD, "max_completion_tokens": 0}, {}, 422),
    ("negative n", "/v1/chat/completions", {**GOOD, "n": -2}, {}, 422),
    ("negative temperature", "/v1/chat/completions", {**GOOD, "temperature": -0.5}, {}, 422),
    ("negative top_p", "/v1/chat/completions", {**GOOD, "top_p": -1}, {}, 422),
    ("negative seed", "/v1/chat/completions", {**GOOD, "seed": -7}, {}, 422),
    ("n above the cap", "/v1/chat/completions", {**GOOD, "n": 1000}, {}, 400),
    ("too many messages", "/v1/chat/completions", {**GOOD, "messages": HELLO * 300}, {}, 400),
    ("too many stop strings", "/v1/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, {}, 422),
    ("empty stop string", "/v1/chat/completions", {**GOOD, "stop": ""}, {}, 422),
    ("oversized body", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "x" * 100_000}]}, {}, 413),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, {}, 422),
    ("completion max_tokens beyond context", "/v1/completions",
     {"model": "tiny", "prompt": "Hi", "max_tokens": 10**9}, {}, 400),
    ("missing API key", "/v1/chat/completions", GOOD, {"authorization": ""}, 401),
    ("wrong API key", "/v1/chat/completions", GOOD, {"authorization": "Bearer wrong-key"}, 401),
    ("key of the wrong length", "/v1/models", None, {"authorization": f"Bearer {KEY}x"}, 401),
    ("top_logprobs above 20", "/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, {}, 422),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**GOOD, "top_logprobs": 2}, {}, 400),
    ("logprobs above 20", "/v1/completions", {"model": "tiny", "prompt": "Hi", "logprobs": 21}, {}, 422),
    ("token id outside the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [[1, 2], [3, 10**6]]}, {}, 400),
    ("negative token id", "/v1/completions", {"model": "tiny", "prompt": [1, -1]}, {}, 422),
    ("empty prompt list", "/v1/completions", {"model": "tiny", "prompt": []}, {}, 422),
    ("empty token-id list", "/v1/completions", {"model": "tiny", "prompt": [[1], []]}, {}, 422),
    ("max_tokens 0 without echo", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 0}, {}, 400),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [1, 10**6]}, {}, 400),
    ("tokenize without a prompt", "/tokenize", {"add_special_tokens": False}, {}, 422),
    ("unknown route", "/v1/embeddings", GOOD, {}, 404),
    ("wrong method", "/v1/models", GOOD, {}, 405),
]


@pytest.mark.parametrize("name, path, body, headers, status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_an_error_envelope_and_the_server_stays_healthy(server, name, path, body, headers, status):
    request_headers = {**AUTH, "content-type": "application/json", **headers}
    if body is None:
        response = httpx.get(server.url + path, headers=request_headers)
    else:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(server.url + path, content=raw, headers=request_headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert httpx.get(server.url + "/health").status_code == 200
    good = httpx.post(server.url + "/v1/chat/completions", json=GOOD, headers=AUTH, timeout=30)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == ANSWER


def test_error_messages_name_the_problem(server):
    def error(body):
        return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30).json()["error"]

    too_long = error({**GOOD, "max_tokens": 5000})
    assert too_long["param"] == "max_tokens" and too_long["code"] == "context_length_exceeded"
    assert "5000" in too_long["message"] and str(CONTEXT) in too_long["message"]
    unknown = error({**GOOD, "model": "gpt-4"})
    assert unknown["code"] == "model_not_found" and "gpt-4" in unknown["message"]
    assert error({**GOOD, "temperature": 9})["param"] == "temperature"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**GOOD, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], [3, 10**6]]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
])
def test_bad_logprob_and_prompt_fields_are_named(server, path, body, param):
    response = httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["param"] == param, response.text


@pytest.fixture(scope="module")
def local(model_dir):
    """The app in this process, through Starlette's test client: fast enough for many requests."""
    from starlette.testclient import TestClient

    app = in_process_app(model_dir)
    yield TestClient(app.state.asgi, base_url="http://127.0.0.1")
    app.state.server.close()


def post_json(http, path: str, body) -> httpx.Response:
    """Sent as Python's json.dumps writes it: a lone surrogate goes out as its \\u escape (still valid JSON)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


SURROGATES = [
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "\udcff\udcff\udcff"}]},
     "messages[0].content: not valid Unicode (a lone surrogate at position 0)"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                  "text": "ok\ud800"}]}]},
     "messages[0].content[0].text: not valid Unicode (a lone surrogate at position 2)"),
    ("/v1/chat/completions", {**GOOD, "stop": ["fine", "x\udfff"]}, "stop[1]: not valid Unicode (a lone surrogate at "
                                                                     "position 1)"),
    ("/v1/chat/completions", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"\udcff": {"type": "string"}}}}}]},
     "tools[0].function.parameters.properties: a key is not valid Unicode (a lone surrogate at position 0)"),
    ("/v1/chat/completions", {**GOOD, "user": "\udcff"}, "user: not valid Unicode (a lone surrogate at position 0)"),
    ("/v1/completions", {"model": "tiny", "prompt": "\udcff\udcff\udcff"},
     "prompt: not valid Unicode (a lone surrogate at position 0)"),
    ("/v1/completions", {"model": "tiny", "prompt": ["Hi", "Hi \udcff"]},
     "prompt[1]: not valid Unicode (a lone surrogate at position 3)"),
    ("/v1/completions", {"model": "tiny\udcff", "prompt": "Hi"}, "model: not valid Unicode (a lone surrogate at "
                                                                  "position 4)"),
    ("/tokenize", {"prompt": "\udcff"}, "prompt: not valid Unicode (a lone surrogate at position 0)"),
]


@pytest.mark.parametrize("path, body, message", SURROGATES, ids=[m.split(":")[0] for _, _, m in SURROGATES])
def test_a_lone_surrogate_is_refused_naming_the_field(local, path, body, message):
    response = post_json(local, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error",
                                        "param": message.split(":")[0], "code": "invalid_unicode"}


def test_a_lone_surrogate_spelled_inside_tool_arguments_is_refused_naming_them(local):
    arguments = json.dumps({"city": "Paris\udcff"})  # the arguments text is ASCII; the JSON it holds is not Unicode
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": arguments}}
    response = post_json(local, "/v1/chat/completions", {**GOOD, "messages": HELLO + [
        {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "3"}]})
    assert response.status_code == 422, response.text
    param = "messages.1.tool_calls.0.function.arguments"
    assert response.json()["error"] == {
        "message": f"{param}: Value error, arguments.city: not valid Unicode (a lone surrogate at position 5)",
        "type": "invalid_request_error", "param": param, "code": "invalid_value"}


def test_nul_characters_are_text_like_any_other(local, tokenizer):
    body = {**GOOD, "messages": [{"role": "user", "content": "a\x00b"}], "stop": ["\x00"]}
    assert post_json(local, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"] == ANSWER
    echoed = post_json(local, "/v1/completions", {"model": "tiny", "prompt": "\x00Hi", "max_tokens": 1, "echo": True})
    assert echoed.json()["choices"][0]["text"].startswith("\x00Hi")
    tokens = post_json(local, "/tokenize", {"prompt": "x\x00y", "add_special_tokens": False}).json()["tokens"]
    assert tokens == tokenizer.encode("x\x00y")
    assert post_json(local, "/detokenize", {"tokens": tokens}).json()["prompt"] == "x\x00y"


# What a client may put in a string: any character, lone surrogates (JSON can escape them) and NUL included.
CLIENT_STRINGS = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr) | st.just("\x00"), max_size=12)
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def string_fields(text: str) -> list[tuple[str, str, dict, str, int]]:
    """Every place a string goes in a POST body: (path, param, body, the string as sent there, status when the
    string is Unicode)."""
    arguments = json.dumps({"a": text}, ensure_ascii=False)  # written raw: a lone surrogate stays one in the body
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": arguments}}
    chat = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
    return [
        ("/v1/chat/completions", "messages[0].content", {**chat, "messages": [{"role": "user", "content": text}]},
         text, 200),
        ("/v1/chat/completions", "messages[0].content[0].text",
         {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}, text, 200),
        ("/v1/chat/completions", "stop", {**chat, "stop": text}, text, 200 if text else 422),
        ("/v1/chat/completions", "stop[1]", {**chat, "stop": ["zz", text]}, text, 200 if text else 422),
        ("/v1/chat/completions", "messages[1].tool_calls[0].function.arguments", {**chat, "messages": HELLO + [
            {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "3"}]},
         arguments, 200),
        ("/v1/chat/completions", "tool_choice.function.name",  # not among the tools, and quoted in the refusal
         {**chat, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": text}}}, text, 400),
        ("/v1/completions", "prompt", {"model": "tiny", "prompt": text, "max_tokens": 2}, text, 200 if text else 422),
        ("/v1/completions", "prompt[1]", {"model": "tiny", "prompt": ["Hi", text], "max_tokens": 2}, text,
         200 if text else 422),
        ("/v1/completions", "stop", {"model": "tiny", "prompt": "Hi", "stop": text, "max_tokens": 2}, text,
         200 if text else 422),
        ("/tokenize", "prompt", {"prompt": text}, text, 200),
        ("/detokenize", "model", {"model": text, "tokens": [1]}, text, 200 if text == "tiny" else 404),
    ]


@settings(max_examples=200, deadline=None)
@given(text=CLIENT_STRINGS, field=st.integers(0, len(string_fields("")) - 1))
def test_any_client_string_anywhere_is_accepted_or_refused_never_a_server_error(local, text, field):
    path, param, body, sent, status = string_fields(text)[field]
    received = json.loads(json.dumps(sent))  # escaped surrogate pairs arrive as the one character they spell
    lone = next((i for i, c in enumerate(received) if "\ud800" <= c <= "\udfff"), None)
    response = post_json(local, path, body)
    if lone is None:
        assert response.status_code == status, (param, response.text)
    else:
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert (error["message"], error["param"]) == (
            f"{param}: not valid Unicode (a lone surrogate at position {lone})", param)


def test_echo_with_n_and_several_prompts(client):
    response = client.completions.create(model="tiny", prompt=[LOOP_PROMPT, "Toss a coin"], n=2, max_tokens=2,
                                         echo=True, temperature=0)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts[:2] == [LOOP_PROMPT + " forever" * 2] * 2
    assert all(t.startswith("Toss a coin") for t in texts[2:])


def test_a_body_without_content_length_is_still_capped(server):
    def chunks():
        for _ in range(100):
            yield b"x" * 1000

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_key_guards_every_route_but_health(server):
    for path in ("/", "/v1/models", "/metrics", "/openapi.json", "/v1/models/tiny", "/nowhere", "//v1/models",
                 "/tokenizer_info"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(server.url + path, json={"prompt": "Hi", "tokens": [1]}).status_code == 401
        assert httpx.post(server.url + path, json={"prompt": "Hi", "tokens": [1]}, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/", auth=("anyone", KEY)).status_code == 200  # a browser's Basic login
    assert httpx.get(server.url + "/", auth=("anyone", "nope")).headers["www-authenticate"].startswith("Basic")


def test_no_cors_unless_allowed(server):
    response = httpx.options(server.url + "/v1/chat/completions", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in response.headers
    response = httpx.get(server.url + "/v1/models", headers={**AUTH, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


# ---- fuzzing and load ---------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(server):
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from schemathesis import GenerationMode

    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    schema = schemathesis.openapi.from_dict(spec)
    settings = hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                                   suppress_health_check=list(hypothesis.HealthCheck),
                                   phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    statuses = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings
            @hypothesis.given(case=operation.as_strategy(mode))
            def no_server_error(case):
                response = case.call(base_url=server.url, headers=AUTH, timeout=60)
                statuses.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)
                if response.status_code >= 400 and case.path.startswith("/v1/messages"):  # Anthropic's envelope
                    assert set(response.json()) == {"type", "error"}
                    assert set(response.json()["error"]) == {"type", "message"}
                elif response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            try:
                no_server_error()
            except hypothesis.errors.Unsatisfiable:  # no parameters to get wrong (GET /health, ...)
                assert mode == GenerationMode.NEGATIVE
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert httpx.get(server.url + "/health").status_code == 200


def test_32_concurrent_streaming_clients(server):
    rounds, clients = 3, 32
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one_client():
        answers = []
        for _ in range(rounds):
            stream = await aclient.chat.completions.create(model="tiny", messages=HELLO, stream=True)
            text = ""
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
            answers.append(text)
        return answers

    async def everyone():
        return await asyncio.gather(*(one_client() for _ in range(clients)))

    async def measured():
        await everyone()  # warm-up: allocator pools, caches and imports settle
        before = server.rss_bytes()
        results = await everyone()
        return results, before, server.rss_bytes()

    results, before, after = asyncio.run(measured())
    assert results == [[ANSWER] * rounds] * clients
    assert after - before < 64 * 2**20, f"server RSS grew {(after - before) / 2**20:.1f} MiB over {rounds * clients} streams"
    assert metrics(server.url, AUTH)["openseek_sequences_in_flight"] == 0


# ---- limits and binding ---------------------------------------------------------------------------------------


def test_queue_full_gets_429_and_a_dropped_stream_frees_its_slot(tmp_path):
    long_context = 4096  # a stream of ~4000 tokens holds the only slot for seconds, not milliseconds
    live = LiveServer(save_model_dir(tmp_path / "tiny", context=long_context), "--max-sequences", "1",
                      "--max-batch-size", "1")
    try:
        body = {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": long_context - 8, "stream": True}
        with httpx.Client(base_url=live.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as long_stream:
                assert long_stream.status_code == 200
                lines = long_stream.iter_lines()  # keep a reference: a dropped iterator closes the stream
                assert next(lines).startswith("data: ")  # it is generating
                busy = http.post("/v1/chat/completions", json=GOOD)
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
                assert busy.headers["retry-after"] == "1"
            # the client hung up mid-stream: the server cancels the sequence and frees its slot
            for _ in range(100):
                values = metrics(live.url)
                if values["openseek_sequences_in_flight"] == 0:
                    break
                time.sleep(0.1)
            assert values["openseek_sequences_in_flight"] == 0
            assert values["openseek_generation_tokens_total"] < long_context // 2  # cancelled, not run to the end
            ok = http.post("/v1/chat/completions", json=GOOD)
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == ANSWER
            # no key: loopback only, and a page on another name (DNS rebinding) is refused
            assert http.get("/v1/models", headers={"host": "attacker.example:8000"}).status_code == 400
    finally:
        live.stop()


def test_refuses_to_listen_beyond_loopback_without_a_key(model_dir):
    result = subprocess.run([sys.executable, "-m", "openseek.cli", "serve", "--model", str(model_dir),
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, env=_no_key_env())
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def _no_key_env():
    return {k: v for k, v in os.environ.items() if k != "OPENSEEK_API_KEY"}


def test_terminal_chat(model_dir):
    result = subprocess.run([sys.executable, "-m", "openseek.cli", "chat", "--model", str(model_dir)],
                            input="Hello\n/reset\nHello again\n/exit\n", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(REASONING) == 2 and result.stdout.count(ANSWER) == 2
    assert result.stdout.index(REASONING) < result.stdout.index(ANSWER)


# ---- in-process: shutdown and CORS ----------------------------------------------------------------------------


def in_process_app(model_dir, **config):
    import openseek
    from openseek.serve.app import create_app
    from openseek.serve.server import ServeConfig, load_engine

    engine, tokenizer = load_engine(str(model_dir), max_batch_size=2)
    app = create_app(engine, tokenizer, ServeConfig(model_name="tiny", max_model_len=engine.max_seq_len, **config))
    assert isinstance(engine, openseek.Engine)
    return app


def test_after_shutdown_requests_get_503(model_dir):
    from starlette.testclient import TestClient

    app = in_process_app(model_dir)
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    assert http.post("/v1/chat/completions", json=GOOD).json()["choices"][0]["message"]["content"] == ANSWER
    app.state.server.close()  # what the server does when it is asked to stop
    for response in (http.post("/v1/chat/completions", json=GOOD), http.get("/health")):
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_reasoning_split_when_the_model_opens_think_itself(tmp_path, tokenizer):
    """A template that does not prefill <think>: the model writes "<think>\n" and the split is the same."""
    from starlette.testclient import TestClient

    from openseek.tokenizer import R1_CHAT_TEMPLATE

    plain = R1_CHAT_TEMPLATE.replace("'<｜Assistant｜><think>\\n'", "'<｜Assistant｜>'")
    assert plain != R1_CHAT_TEMPLATE
    app = in_process_app(save_model_dir(tmp_path / "tiny", chat_template=plain))
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    response = http.post("/v1/chat/completions", json=GOOD).json()
    assert response["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "tool_calls": None,
                                                 "reasoning_content": REASONING, "reasoning": REASONING}
    completion, reasoning = reply_tokens(tokenizer)
    usage = response["usage"]  # two more tokens than with the prefilled template: "<think>" and "\n"
    assert (usage["completion_tokens"], usage["completion_tokens_details"]["reasoning_tokens"]) == \
        (completion + 2, reasoning + 2)
    app.state.server.close()


def test_cors_only_for_the_allowed_origins(model_dir):
    from starlette.testclient import TestClient

    app = in_process_app(model_dir, allowed_origins=["http://localhost:3000"])
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    allowed = http.options("/v1/chat/completions", headers={"origin": "http://localhost:3000", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = http.options("/v1/chat/completions", headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    response = http.get("/v1/models", headers={"origin": "http://localhost:3000"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    app.state.server.close()


def test_the_server_never_opened_a_connection_to_anywhere(server, client):
    """Runs last in this file: the audit log covers start-up and every test above against this server."""
    assert client.chat.completions.create(model="tiny", messages=HELLO).choices[0].message.content == ANSWER
    assert server.network_log.read_text().splitlines() == ["audit on"]  # not one connect, send or DNS lookup
    # control: the same audit in another process does see a connection
    probe = f"import socket; socket.create_connection(('127.0.0.1', {server.port})).close()"
    subprocess.run([sys.executable, "-c", probe], check=True,
                   env={**os.environ, "PYTHONPATH": str(server.network_log.parent)})
    assert f"socket.connect ('127.0.0.1', {server.port})" in server.network_log.read_text()
