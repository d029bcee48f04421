"""OpenAI's Responses API (`/v1/responses`) through `openseek serve`, with the `openai` client's `responses.create`
and `responses.stream`. The scripted reasoning model (REASONING, then ANSWER) shows the output items, the events and
the reasoning effort exactly; a random-weight model with a tools template shows that `tool_choice: required` and
`text.format` json_schema make every answer valid.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from helpers_serve import ANSWER, REASONING
from test_serve_tools import PERSON, SCHEMAS, TOOLS
from test_serve_tools import random_client, random_server, reasoning_client, reasoning_server  # noqa: F401

FUNCTIONS = [{"type": "function", **t["function"]} for t in TOOLS]
SAMPLES = 50


def test_text_comes_as_a_reasoning_item_and_a_message(reasoning_client):
    response = reasoning_client.responses.create(model="tiny", input="Hello", instructions="Be brief.")
    assert response.status == "completed" and response.id.startswith("resp_")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and [c.text for c in reasoning.content] == [REASONING]
    assert message.type == "message" and message.role == "assistant" and response.output_text == ANSWER
    same = reasoning_client.responses.create(model="tiny", instructions="Be brief.", input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    assert same.usage.input_tokens == response.usage.input_tokens and same.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == 6  # REASONING's 5 tokens and </think>
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_stream_gives_the_responses_events_and_the_same_response(reasoning_client):
    whole = reasoning_client.responses.create(model="tiny", input="Hello", temperature=0)
    events = list(reasoning_client.responses.create(model="tiny", input="Hello", temperature=0, stream=True))
    kinds = [e.type for e in events]
    runs = [kind for i, kind in enumerate(kinds) if i == 0 or kinds[i - 1] != kind]
    assert runs == ["response.created", "response.in_progress",
                    "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                    "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                    "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                    "response.output_text.done", "response.content_part.done", "response.output_item.done",
                    "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    with reasoning_client.responses.stream(model="tiny", input="Hello", temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == ANSWER and final.usage.output_tokens == whole.usage.output_tokens
    assert [item.type for item in final.output] == [item.type for item in whole.output]


def test_max_output_tokens_leaves_the_response_incomplete(reasoning_client):
    response = reasoning_client.responses.create(model="tiny", input="Hello", max_output_tokens=7)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "The"  # 5 thinking tokens, </think>, one answer token


@pytest.mark.parametrize("effort, reasoning", [("none", None), ("minimal", REASONING)])
def test_reasoning_effort_sets_the_thinking_budget(reasoning_client, effort, reasoning):
    response = reasoning_client.responses.create(model="tiny", input="Hello", reasoning={"effort": effort})
    items = [item for item in response.output if item.type == "reasoning"]
    assert [c.text for item in items for c in item.content] == ([reasoning] if reasoning else [])
    assert response.output_text == ANSWER and response.reasoning.effort == effort


# ---- tools and structured output ------------------------------------------------------------------------------


def test_required_function_call_is_valid_every_time(random_client):
    def ask(_):
        return random_client.responses.create(model="tiny", input="Hello", tools=FUNCTIONS, tool_choice="required",
                                              parallel_tool_calls=False, max_output_tokens=200, temperature=1.0)

    with ThreadPoolExecutor(SAMPLES) as pool:  # concurrent, so the server batches them
        responses = list(pool.map(ask, range(SAMPLES)))
    for response in responses:
        [call] = response.output
        assert call.type == "function_call" and call.call_id.startswith("call_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert {r.output[0].name for r in responses} == set(SCHEMAS)


def test_streamed_function_call_and_its_round_trip(random_client, random_server):
    """A streamed call; its output sent back as items renders the prompt transformers renders for the same chat."""
    import transformers

    with random_client.responses.stream(model="tiny", input="Hello", tools=FUNCTIONS, parallel_tool_calls=False,
                                        tool_choice={"type": "function", "name": "add"}, max_output_tokens=200) as s:
        events = list(s)
        first = s.get_final_response()
    [call] = first.output
    assert call.name == "add"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["add"])
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments
    history = [{"role": "user", "content": "Hello"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees"}]
    final = random_client.responses.create(model="tiny", input=history, tools=FUNCTIONS, max_output_tokens=8)
    peer = transformers.AutoTokenizer.from_pretrained(random_server.model_dir)
    chat = [{"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": json.loads(call.arguments)}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "21 degrees"}]
    expected = peer.apply_chat_template(chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert final.usage.input_tokens == len(peer(expected, add_special_tokens=False)["input_ids"])


def test_json_schema_format_is_valid_every_time(random_client):
    def ask(_):
        return random_client.responses.create(
            model="tiny", input="Hello", max_output_tokens=300, temperature=1.0,
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})

    with ThreadPoolExecutor(SAMPLES) as pool:
        responses = list(pool.map(ask, range(SAMPLES)))
    for response in responses:
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), PERSON)


# ---- bad input ------------------------------------------------------------------------------------------------


BAD = [
    ({"previous_response_id": "resp_1"}, 422, "previous_response_id"),
    ({"conversation": "conv_1"}, 422, "conversation"),
    ({"background": True}, 422, "background"),
    ({"include": ["reasoning.encrypted_content"]}, 422, "include"),
    ({"truncation": "auto"}, 422, "truncation"),
    ({"reasoning": {"effort": "high", "summary": "auto"}}, 422, "reasoning.summary"),
    ({"reasoning": {"effort": "extreme"}}, 422, "reasoning.effort"),
    ({"max_output_tokens": 0}, 422, "max_output_tokens"),
    ({"temperature": 3}, 422, "temperature"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 422,
     "input.0.content.0.type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "add", "arguments": "{not json"}]}, 422,
     "input.0.arguments"),
    ({"tools": [{"type": "web_search"}]}, 422, "tools.0.type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "strnig"}}]}, 400, "tools[0].parameters"),
    ({"tools": FUNCTIONS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 422, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "required": "a"}}}},
     400, "text.format.schema"),
    ({"max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"model": "gpt-x"}, 404, "model"),
]


@pytest.mark.parametrize("extra, status, param", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_field(reasoning_server, extra, status, param):
    response = httpx.post(reasoning_server.url + "/v1/responses",
                          json={"model": "tiny", "input": "Hello", "max_output_tokens": 16} | extra, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert httpx.get(reasoning_server.url + "/health").json() == {"status": "ok"}


def test_the_client_raises_on_a_refused_field(reasoning_client):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        reasoning_client.responses.create(model="tiny", input="Hello", previous_response_id="resp_1")
    assert "nothing is stored" in refused.value.message
    assert reasoning_client.responses.create(model="tiny", input="Hello", store=False).output_text == ANSWER
