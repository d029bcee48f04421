"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) through `openseek serve`, with the official
`anthropic` client. The scripted reasoning model (REASONING, then ANSWER) shows the blocks, the stream and the
thinking budget exactly; a random-weight model with a tools template shows that `tool_choice: any` makes every
answer a schema-valid tool_use block.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import pytest

from helpers_serve import ANSWER, REASONING, save_model_dir
from test_serve_tools import SCHEMAS, TOOLS, random_server, reasoning_server  # noqa: F401 (fixtures)

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
ASK = [{"role": "user", "content": "Hello"}]
SAMPLES = 50


@pytest.fixture(scope="module")
def client(reasoning_server):
    return anthropic.Anthropic(base_url=reasoning_server.url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def random_client(random_server):
    return anthropic.Anthropic(base_url=random_server.url, api_key="none", max_retries=0, timeout=120)


def test_text_comes_as_thinking_and_text_blocks(client, reasoning_server):
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(reasoning_server.model_dir)
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, system="Be brief.")
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == REASONING and message.content[1].text == ANSWER
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == "tiny"
    count = client.messages.count_tokens(model="tiny", messages=ASK, system="Be brief.").input_tokens
    assert message.usage.input_tokens == count
    reply = tokenizer.encode(f"{REASONING}</think>{ANSWER}", add_special_tokens=False)
    assert message.usage.output_tokens == len(reply) + 1  # and the EOS
    thinking = tokenizer.encode(f"{REASONING}</think>", add_special_tokens=False)
    assert message.usage.output_tokens_details.thinking_tokens == len(thinking)


def test_stream_follows_anthropics_event_sequence_and_matches_the_whole_answer(client):
    whole = client.messages.create(model="tiny", max_tokens=64, messages=ASK, extra_body={"temperature": 0})
    events = list(client.messages.create(model="tiny", max_tokens=64, messages=ASK, stream=True,
                                         extra_body={"temperature": 0}))
    runs = [kind for i, kind in enumerate(e.type for e in events) if i == 0 or events[i - 1].type != kind]
    assert runs == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                    "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                    "message_stop"]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [(e.index, e.content_block.type) for e in starts] == [(0, "thinking"), (1, "text")]
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert "".join(e.delta.thinking for e in deltas if e.index == 0) == REASONING
    assert "".join(e.delta.text for e in deltas if e.index == 1) == ANSWER
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == whole.usage.output_tokens
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    with client.messages.stream(model="tiny", max_tokens=64, messages=ASK, extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_stop_sequence_is_reported(client):
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, stop_sequences=["zzz", "answer is"])
    assert message.content[-1].text == "The "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "answer is")
    cut = client.messages.create(model="tiny", max_tokens=3, messages=ASK)
    assert cut.stop_reason == "max_tokens" and [b.type for b in cut.content] == ["thinking"]


@pytest.mark.parametrize("budget", [1, 3])
def test_thinking_budget_cuts_the_thinking_block(client, budget):
    words = " ".join(REASONING.split()[:budget])
    thinking = {"type": "enabled", "budget_tokens": budget}
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, thinking=thinking)
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in message.content] == [("thinking", words),
                                                                                           ("text", ANSWER)]
    assert message.usage.output_tokens_details.thinking_tokens == budget + 1  # the thinking and </think>
    with client.messages.stream(model="tiny", max_tokens=64, messages=ASK, thinking=thinking) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]


def test_thinking_disabled_leaves_only_the_answer(client):
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in message.content] == [("text", ANSWER)]


def test_count_tokens_is_the_rendered_prompts_length(client, reasoning_server):
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(reasoning_server.model_dir)
    system = [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "Toss a coin"}]}]
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "You are terse."},
                                            *[{"role": m["role"], "content": "Toss a coin" if i == 2 else m["content"]}
                                              for i, m in enumerate(messages)]])
    counted = client.messages.count_tokens(model="tiny", system=system, messages=messages).input_tokens
    assert counted == len(tokenizer.encode(prompt, add_special_tokens=False)) > 10


# ---- tools ----------------------------------------------------------------------------------------------------


def check_tool_use(block) -> None:
    assert block.type == "tool_use" and block.name in SCHEMAS and block.id
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_tool_choice_any_gives_a_valid_tool_use_every_time(random_client):
    def ask(_):
        return random_client.messages.create(
            model="tiny", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            extra_body={"temperature": 1.0, "top_p": 1.0, "top_k": 0})  # this client has no sampling arguments

    with ThreadPoolExecutor(SAMPLES) as pool:  # concurrent, so the server batches them
        messages = list(pool.map(ask, range(SAMPLES)))
    for message in messages:
        assert message.stop_reason == "tool_use"
        [block] = message.content
        check_tool_use(block)
    assert {m.content[0].name for m in messages} == set(SCHEMAS)


def test_streamed_tool_use_arrives_as_input_json(random_client):
    events = list(random_client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS,
                                                tool_choice={"type": "tool", "name": "add"}, stream=True))
    [start] = [e for e in events if e.type == "content_block_start"]
    assert start.content_block.type == "tool_use" and start.content_block.name == "add"
    assert start.content_block.input == {}
    arguments = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    check_tool_use(start.content_block.model_copy(update={"input": json.loads(arguments)}))
    assert events[-2].delta.stop_reason == "tool_use"
    with random_client.messages.stream(model="tiny", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS,
                                       tool_choice={"type": "tool", "name": "add"}) as stream:
        [block] = stream.get_final_message().content  # the client's own accumulation parses the input
    check_tool_use(block)


def test_tool_use_then_tool_result_round_trip_renders_as_the_chat_route_would(random_client, random_server):
    """call -> tool_result -> answer; the conversation is the prompt transformers renders for the same chat."""
    import transformers

    first = random_client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=ANTHROPIC_TOOLS,
                                          tool_choice={"type": "any", "disable_parallel_tool_use": True})
    [call] = first.content
    history = ASK + [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "21 degrees"}]}]
    final = random_client.messages.create(model="tiny", max_tokens=8, messages=history, tools=ANTHROPIC_TOOLS)
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert all(block.type in ("text", "tool_use") for block in final.content)

    peer = transformers.AutoTokenizer.from_pretrained(random_server.model_dir)
    chat = ASK + [{"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.input}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    expected = peer.apply_chat_template(chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert f'"name": "{call.name}", "arguments": {json.dumps(call.input)}' in expected
    tokens = len(peer(expected, add_special_tokens=False)["input_ids"])
    assert final.usage.input_tokens == tokens
    assert random_client.messages.count_tokens(model="tiny", messages=history, tools=ANTHROPIC_TOOLS).input_tokens \
        == tokens


# ---- keys and bad input ---------------------------------------------------------------------------------------


def test_x_api_key_and_bearer_both_open_the_gate(tmp_path):
    from starlette.testclient import TestClient

    from test_serve import in_process_app

    app = in_process_app(save_model_dir(tmp_path / "key"), api_key="sesame")
    http = TestClient(app.state.asgi, base_url="http://127.0.0.1")
    body = {"model": "tiny", "max_tokens": 64, "messages": ASK}
    for headers in ({"x-api-key": "sesame"}, {"authorization": "Bearer sesame"}):
        response = http.post("/v1/messages", json=body, headers=headers)
        assert response.status_code == 200 and response.json()["content"][-1]["text"] == ANSWER
    refused = http.post("/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401
    assert refused.json() == {"type": "error", "error": {"type": "authentication_error", "message": (
        "missing or wrong API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")}}
    assert http.post("/v1/chat/completions", json=body, headers={"x-api-key": "wrong"}).json()["error"]["code"] \
        == "invalid_api_key"  # the chat route keeps OpenAI's envelope
    app.state.server.close()


BAD = [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "add", "input": {}}]}]},
     "messages.0.content.0"),
    ({"messages": ASK + [{"role": "assistant", "content": "The answer"}]}, "messages.1"),
    ({"tools": [{"name": "f", "input_schema": {"type": "strnig"}}]}, "tools.0.input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"thinking": {"type": "enabled"}}, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2, "display": "summarized"}}, "thinking.display"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"mcp_servers": [{"type": "url", "url": "http://example.com"}]}, "mcp_servers"),
]


@pytest.mark.parametrize("extra, field", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_anthropics_envelope_naming_the_field(reasoning_server, extra, field):
    body = {"model": "tiny", "max_tokens": 16, "messages": ASK} | extra
    response = httpx.post(reasoning_server.url + "/v1/messages", json={k: v for k, v in body.items() if v is not None},
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    message = error["error"]["message"]
    assert message.startswith(field) and message[len(field)] in ": ", error  # the field at fault starts the message
    assert httpx.get(reasoning_server.url + "/health").json() == {"status": "ok"}


def test_the_client_raises_its_own_errors(client):
    with pytest.raises(anthropic.NotFoundError) as found:
        client.messages.create(model="claude-x", max_tokens=16, messages=ASK)
    assert found.value.body["error"]["type"] == "not_found_error"
    assert found.value.body["error"]["message"].startswith("model: The model `claude-x` does not exist")
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.count_tokens(model="tiny", messages=[])
    assert bad.value.body["error"]["message"].startswith("messages: ")
