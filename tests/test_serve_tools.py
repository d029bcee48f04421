"""Tool calling, structured outputs and reasoning budgets through `openseek serve`, with the official `openai`
client. A random-weight model (helpers_serve.save_random_model_dir, a Qwen2.5-style template with tools) shows that
the constraint alone makes its answers valid; the scripted reasoning model (REASONING, then ANSWER) shows the
<think> block left free and the budget closing it.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from helpers_serve import ANSWER, REASONING, TOOLS_CHAT_TEMPLATE, LiveServer, save_model_dir, save_random_model_dir

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                      "b": {"type": "integer", "minimum": -99, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
PERSON = {  # nested objects, an array, enums and required fields; bounded, so a random model can finish it
    "type": "object", "additionalProperties": False, "required": ["name", "kind", "address", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["person", "company", "robot"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 8},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
}
ASK = [{"role": "user", "content": "Hello"}]
SAMPLES = 50


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    live = LiveServer(save_random_model_dir(tmp_path_factory.mktemp("tools") / "random"), "--max-n", str(SAMPLES),
                      "--max-sequences", "64")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def random_client(random_server):
    return openai.OpenAI(base_url=random_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory):
    live = LiveServer(save_model_dir(tmp_path_factory.mktemp("think") / "tiny"), "--max-n", "8")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reasoning_client(reasoning_server):
    return openai.OpenAI(base_url=reasoning_server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- tool calling ---------------------------------------------------------------------------------------------


def test_required_tool_call_is_valid_in_every_sample(random_client):
    # one call each: a random model offered parallel calls keeps adding them until max_tokens
    response = random_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                     n=SAMPLES, seed=1, temperature=1.0, max_tokens=200,
                                                     parallel_tool_calls=False)
    assert len(response.choices) == SAMPLES
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])
    assert {call.function.name for c in response.choices for call in c.message.tool_calls} == set(SCHEMAS)


def test_required_tool_call_streams_as_tool_call_deltas(random_client):
    stream = random_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                   n=SAMPLES, seed=2, max_tokens=200, stream=True,
                                                   parallel_tool_calls=False)
    calls, finish = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(choice.index, []).append(delta)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == set(range(SAMPLES)) and set(finish.values()) == {"tool_calls"}
    assert set(calls) == set(range(SAMPLES))
    for [delta] in calls.values():  # a streamed call arrives whole, in one delta
        assert delta.index == 0
        check_call(delta)


def test_named_tool_choice_calls_that_function_once(random_client):
    response = random_client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        n=8, seed=3, max_tokens=200)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "add"
        check_call(call)


def test_round_trip_renders_as_transformers_does(random_client, random_server, tmp_path):
    """call -> role: tool result -> final answer; the conversation renders through the template exactly as
    transformers' apply_chat_template(tools=...) renders it."""
    import transformers

    from openseek.serve.tools import template_messages
    from openseek.tokenizer import Tokenizer

    first = random_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                  seed=4, max_tokens=200, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    final = random_client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, seed=5)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")

    directory = save_random_model_dir(tmp_path / "peer")
    ours = Tokenizer.from_dir(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.chat_template == TOOLS_CHAT_TEMPLATE and ours.template_takes_tools
    # transformers documents tool-call arguments as objects
    peer_history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {**call.model_dump(), "function": {"name": call.function.name,
                                               "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    expected = theirs.apply_chat_template(peer_history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    rendered = ours.apply_chat_template(template_messages(history, TOOLS, True), tools=TOOLS)
    assert rendered == expected
    assert f'<tool_call>\n{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}' in rendered
    assert final.usage.prompt_tokens == len(ours.encode(expected))


def test_template_without_tools_gets_the_built_in_format(tmp_path):
    """R1's template reads no `tools`: the tools go into a system section, calls and results into the text."""
    from openseek.serve.tools import template_messages
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(save_model_dir(tmp_path / "r1"))
    assert not tokenizer.template_takes_tools
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    prompt = tokenizer.apply_chat_template(template_messages(history, TOOLS, False))
    assert prompt.index('"name": "get_weather"') < prompt.index("<｜User｜>Hello")
    assert '<｜Assistant｜><tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<｜User｜><tool_response>\n3\n</tool_response>" in prompt


# ---- structured outputs ---------------------------------------------------------------------------------------


def test_json_schema_is_valid_in_every_sample(random_client):
    response = random_client.chat.completions.create(
        model="tiny", messages=ASK, n=SAMPLES, seed=6, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_ends_the_answer_where_the_json_ends(tmp_path):
    """The scripted model answers `{"a": 1} Hope this helps!`; as a JSON object the answer stops after the `}`,
    and the reasoning before it is left as the model wrote it."""
    from starlette.testclient import TestClient

    from test_serve import in_process_app

    answer = '{"a": 1} Hope this helps!'
    app = in_process_app(save_model_dir(tmp_path / "json", answer=answer))
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    body = {"model": "tiny", "messages": ASK, "temperature": 0.5}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert plain["content"] == answer
    message = http.post("/v1/chat/completions", json=body | {"response_format": {"type": "json_object"}}).json()[
        "choices"][0]["message"]
    assert json.loads(message["content"]) == {"a": 1}
    assert message["reasoning_content"] == message["reasoning"] == REASONING
    app.state.server.close()


def test_reasoning_is_left_free_and_the_answer_follows_the_schema(reasoning_client):
    schema = {"type": "object", "additionalProperties": False, "required": ["answer"],
              "properties": {"answer": {"enum": [4, 5]}}}
    response = reasoning_client.chat.completions.create(
        model="tiny", messages=ASK, n=4, seed=7, response_format={"type": "json_schema",
                                                                  "json_schema": {"name": "a", "schema": schema}})
    for choice in response.choices:
        assert choice.message.reasoning_content == REASONING  # the scripted reasoning, untouched
        jsonschema.validate(json.loads(choice.message.content), schema)


# ---- constrained answers after a <think> prefill ----------------------------------------------------------------
# R1's and R1-Distill's templates end the prompt inside the reasoning block. The random model's thinking is bounded
# by the default share of max_tokens (80 of 160), so each schema below is bounded in bytes (the grammar may spell
# the answer one byte-token at a time): a call of `add` is at most 66 bytes, of `city` 62, a CARD 57.

THINKING_TEMPLATE = TOOLS_CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}",
                                                "{{- '<|im_start|>assistant\\n<think>\\n' }}")
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,4}$"}}}
SHORT_TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}},
               {"type": "function", "function": {"name": "city", "parameters": CITY}}]
SHORT_SCHEMAS = {"add": ADD, "city": CITY}
CARD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
        "properties": {"name": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
                       "age": {"type": "integer", "minimum": 0, "maximum": 150},
                       "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def thinking_client(tmp_path_factory):
    assert THINKING_TEMPLATE != TOOLS_CHAT_TEMPLATE
    live = LiveServer(save_random_model_dir(tmp_path_factory.mktemp("think-random") / "random", THINKING_TEMPLATE),
                      "--max-n", "10")
    yield openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
    live.stop()


def gathered(response, stream: bool) -> list[tuple[str, str, list, str]]:
    """(reasoning, content, tool calls, finish reason) of each choice, from a response or its stream."""
    if not stream:
        return [(c.message.reasoning_content or "", c.message.content or "", c.message.tool_calls or [],
                 c.finish_reason) for c in response.choices]
    parts = {}
    for chunk in response:
        for c in chunk.choices:
            reasoning, content, calls, finish = parts.setdefault(c.index, ["", "", [], None])
            parts[c.index] = [reasoning + (getattr(c.delta, "reasoning_content", None) or ""),
                              content + (c.delta.content or ""), calls + (c.delta.tool_calls or []),
                              c.finish_reason or finish]
    return [tuple(parts[i]) for i in sorted(parts)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_lands_in_content_after_the_thinking(thinking_client, stream):
    response = thinking_client.chat.completions.create(
        model="tiny", messages=ASK, n=10, seed=11, max_tokens=160, stream=stream,
        response_format={"type": "json_schema", "json_schema": {"name": "card", "schema": CARD}})
    choices = gathered(response, stream)
    assert len(choices) == 10
    for reasoning, content, calls, finish in choices:
        assert finish == "stop" and calls == [], (reasoning, content)
        jsonschema.validate(json.loads(content), CARD)
    assert any(reasoning for reasoning, *_ in choices)  # the model did think, and its thinking stayed there


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_tool_call_lands_in_tool_calls_after_the_thinking(thinking_client, stream):
    response = thinking_client.chat.completions.create(
        model="tiny", messages=ASK, n=10, seed=12, max_tokens=160, stream=stream, tools=SHORT_TOOLS,
        tool_choice="required", parallel_tool_calls=False)
    choices = gathered(response, stream)
    assert len(choices) == 10
    for reasoning, content, calls, finish in choices:
        assert finish == "tool_calls" and not content and len(calls) == 1, (reasoning, content)
        jsonschema.validate(json.loads(calls[0].function.arguments), SHORT_SCHEMAS[calls[0].function.name])


# ---- reasoning budgets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 2, 4])
def test_thinking_budget_closes_the_reasoning_and_the_answer_follows(reasoning_client, budget):
    response = reasoning_client.chat.completions.create(model="tiny", messages=ASK, seed=8,
                                                        extra_body={"thinking_budget_tokens": budget})
    choice = response.choices[0]
    words = REASONING.split()[:budget]
    assert (choice.message.reasoning_content or "") == " ".join(words)
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    assert response.usage.completion_tokens_details.reasoning_tokens == budget + 1  # the thinking and </think>


def test_reasoning_effort_none_skips_the_thinking(reasoning_client):
    response = reasoning_client.chat.completions.create(model="tiny", messages=ASK, reasoning_effort="none")
    assert response.choices[0].message.reasoning_content is None
    assert response.choices[0].message.content == ANSWER


def test_budget_streams_the_split_right(reasoning_client):
    stream = reasoning_client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                                      extra_body={"thinking_budget_tokens": 3})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "Summing both numbers"
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == ANSWER


@pytest.mark.parametrize("max_tokens, reasoning, content", [
    (3, "Summing both numbers", None),  # cut inside the thinking: nothing leaks into the answer
    (7, REASONING, "The"),  # 5 thinking tokens, </think>, one answer token
])
def test_length_cut_keeps_the_split(reasoning_client, max_tokens, reasoning, content):
    for stream in (False, True):
        response = reasoning_client.chat.completions.create(model="tiny", messages=ASK, max_tokens=max_tokens,
                                                            stream=stream, extra_body={"thinking_budget_tokens": 10})
        if stream:
            deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in response if c.choices]
            got_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d, _ in deltas)
            got_content = "".join(d.content or "" for d, _ in deltas) or None
            finish = deltas[-1][1]
        else:
            message = response.choices[0].message
            got_reasoning, got_content, finish = message.reasoning_content, message.content or None, \
                response.choices[0].finish_reason
        assert (got_reasoning, got_content, finish) == (reasoning, content, "length")


def test_server_reasoning_budget_is_the_default(tmp_path):
    from starlette.testclient import TestClient

    from test_serve import in_process_app

    app = in_process_app(save_model_dir(tmp_path / "budget"), reasoning_budget=1)
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    body = {"model": "tiny", "messages": ASK}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Summing", ANSWER)
    message = http.post("/v1/chat/completions", json=body | {"reasoning_effort": "high"}).json()["choices"][0][
        "message"]
    assert message["reasoning_content"] == REASONING  # the request's own budget wins
    app.state.server.close()


# ---- bad input ------------------------------------------------------------------------------------------------


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]},
     400, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, 400, "tools[2].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "required": "a"}}}},
     400, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, 422, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"thinking_budget_tokens": -1}, 422, "thinking_budget_tokens"),
    ({"reasoning_effort": "extreme"}, 422, "reasoning_effort"),
    ({"presence_penalty": 0.5}, 422, "presence_penalty"),
    ({"frequency_penalty": -1}, 422, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, 422, "logit_bias"),
    ({"best_of": 3}, 422, "best_of"),
    # vLLM's extensions that would change the answer and are not honoured (README: request fields)
    ({"use_beam_search": True}, 422, "use_beam_search"),
    ({"bad_words": ["four"]}, 422, "bad_words"),
    # ... and those honoured, given bad values
    ({"ignore_eos": "sometimes"}, 422, "ignore_eos"),
    ({"stop_token_ids": [-1]}, 422, "stop_token_ids.0"),
    ({"stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"stop_token_ids": list(range(257))}, 422, "stop_token_ids"),
    ({"skip_special_tokens": [True]}, 422, "skip_special_tokens"),
    ({"chat_template_kwargs": "enable_thinking"}, 422, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, 400, "chat_template_kwargs.add_generation_prompt"),
    ({"ignore_eos": True, "response_format": {"type": "json_object"}}, 400, "ignore_eos"),
    ({"messages": ASK + [{"role": "tool", "content": "3"}]}, 400, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{not json"}}]}]}, 422, "messages.1.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("extra, status, param", BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_input_names_the_field(reasoning_server, extra, status, param):
    response = httpx.post(reasoning_server.url + "/v1/chat/completions",
                          json={"model": "tiny", "messages": ASK, "max_tokens": 4} | extra, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(reasoning_server.url + "/health").status_code == 200


def test_budget_on_a_model_that_does_not_reason_is_refused(random_server):
    response = httpx.post(random_server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": ASK, "max_tokens": 4, "thinking_budget_tokens": 5}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "thinking_budget_tokens"


def test_neutral_values_of_unsupported_fields_are_accepted(reasoning_client):
    response = reasoning_client.chat.completions.create(
        model="tiny", messages=ASK, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="someone",
        extra_body={"ignore_eos": False, "skip_special_tokens": True, "chat_template_kwargs": {}, "metadata": {}})
    assert response.choices[0].message.content == ANSWER


# ---- vLLM's sampling extensions, honoured ----------------------------------------------------------------------
# The scripted model answers REASONING</think>ANSWER, then EOS; after EOS it writes EOS forever.


def chat(server, **fields) -> dict:
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"model": "tiny", "messages": ASK, "temperature": 0} | fields, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_ignore_eos_runs_to_max_tokens_and_skip_special_tokens_shows_the_eos(reasoning_server):
    from openseek.tokenizer import Tokenizer

    eos = Tokenizer.from_dir(reasoning_server.model_dir).eos_token
    plain = chat(reasoning_server, max_tokens=40)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 20
    answered = plain["usage"]["completion_tokens"]  # the reply with its EOS
    kept_going = chat(reasoning_server, max_tokens=answered + 3, ignore_eos=True)
    assert kept_going["choices"][0]["finish_reason"] == "length"
    assert kept_going["usage"]["completion_tokens"] == answered + 3
    assert kept_going["choices"][0]["message"]["content"] == ANSWER  # the EOS tokens are not text...
    shown = chat(reasoning_server, max_tokens=answered + 3, ignore_eos=True, skip_special_tokens=False)
    assert shown["choices"][0]["message"]["content"] == ANSWER + eos * 4  # ...unless asked: the reply's and 3 more


def test_stop_token_ids_end_the_answer_and_include_stop_keeps_the_token(reasoning_server):
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(reasoning_server.model_dir)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    stop = answer[2]
    cut = chat(reasoning_server, stop_token_ids=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == tokenizer.decode(answer[:2])
    kept = chat(reasoning_server, stop_token_ids=[stop], include_stop_str_in_output=True)["choices"][0]
    assert kept["finish_reason"] == "stop" and kept["message"]["content"] == tokenizer.decode(answer[:3])


def test_include_stop_str_in_output_keeps_the_stop_string(reasoning_server):
    for stream in (False, True):
        body = {"model": "tiny", "messages": ASK, "temperature": 0, "stop": ["zzz", "answer is"], "stream": stream}
        for include, content in ((False, "The "), (True, "The answer is")):
            response = httpx.post(reasoning_server.url + "/v1/chat/completions",
                                  json=body | {"include_stop_str_in_output": include}, timeout=30)
            if stream:
                chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: {")]
                got = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            else:
                got = response.json()["choices"][0]["message"]["content"]
            assert got == content, (stream, include)


def test_text_completions_honour_ignore_eos_and_stop_token_ids(reasoning_server):
    from helpers_serve import COIN_PROMPT
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(reasoning_server.model_dir)
    heads, tails = tokenizer.encode(" heads", add_special_tokens=False) + tokenizer.encode(" tails",
                                                                                          add_special_tokens=False)

    def complete(**fields):
        response = httpx.post(reasoning_server.url + "/v1/completions", json={
            "model": "tiny", "prompt": COIN_PROMPT, "max_tokens": 6, "seed": 0} | fields, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    assert complete()["usage"]["completion_tokens"] == 2  # a side, then EOS
    assert complete(ignore_eos=True)["usage"]["completion_tokens"] == 6
    stopped = complete(stop_token_ids=[heads, tails])
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["text"] == ""
    refused = httpx.post(reasoning_server.url + "/v1/completions", json={
        "model": "tiny", "prompt": COIN_PROMPT, "chat_template_kwargs": {"enable_thinking": True}}, timeout=30)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "chat_template_kwargs"


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """A Qwen3-style switch: `enable_thinking: false` leaves `<think>` out of the prompt, so the model writes it
    itself (two prompt tokens fewer; the same reasoning and answer)."""
    from starlette.testclient import TestClient

    from openseek.tokenizer import R1_CHAT_TEMPLATE
    from test_serve import in_process_app

    opening = "{{- '<｜Assistant｜><think>\\n' -}}"
    assert opening in R1_CHAT_TEMPLATE
    switch = R1_CHAT_TEMPLATE.replace(opening, "{{- '<｜Assistant｜>' -}}{%- if enable_thinking is not defined or "
                                               "enable_thinking -%}{{- '<think>\\n' -}}{%- endif -%}")
    app = in_process_app(save_model_dir(tmp_path / "switch", chat_template=switch))
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    body = {"model": "tiny", "messages": ASK, "temperature": 0}
    thinking = http.post("/v1/chat/completions", json=body).json()
    plain = http.post("/v1/chat/completions", json=body | {"chat_template_kwargs": {"enable_thinking": False}}).json()
    assert plain["usage"]["prompt_tokens"] == thinking["usage"]["prompt_tokens"] - 2
    for response in (thinking, plain):
        message = response["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (REASONING, ANSWER)
    app.state.server.close()
