"""DeepSeek-V3/R1's own tool-call format through `openseek serve`: a tokenizer with DeepSeek's tool tokens and the
real DeepSeek-V3 chat template, on a random-weight model (only the grammar makes its calls valid). transformers'
apply_chat_template is the reference renderer; the `openai` client is the client.
"""

from __future__ import annotations

import json

import openai
import pytest

from helpers_serve import LiveServer, build_tokenizer, save_random_model_dir
from test_serve_tools import ASK, SAMPLES, SCHEMAS, TOOLS, check_call

# DeepSeek-V3's chat template as its tokenizer_config.json ships it (the later revision, which V3-0324 and R1-0528
# share: content before calls, one <｜tool▁calls▁end｜> after them). It renders calls and tool outputs in DeepSeek's
# tokens but never reads `tools`. Fixture data, byte for byte.
DEEPSEEK_V3_CHAT_TEMPLATE = r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"""

# DeepSeek's tool tokens: added tokens of its vocabulary that decoding keeps (not "special").
TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>"]


def save_deepseek_model_dir(directory):
    """A tiny random llama whose tokenizer has DeepSeek's tool tokens and its chat template is DeepSeek-V3's."""
    return save_random_model_dir(directory, DEEPSEEK_V3_CHAT_TEMPLATE, added_tokens=TOOL_TOKENS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_deepseek_model_dir(tmp_path_factory.mktemp("deepseek") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    live = LiveServer(model_dir, "--max-n", str(SAMPLES), "--max-sequences", "64")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_the_format_is_read_from_the_template(model_dir):
    from openseek.serve.tools import tool_format
    from openseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    fmt = tool_format(tokenizer)
    assert fmt.name == "deepseek" and not tokenizer.template_takes_tools
    # each marker is forced as its own token, not spelt out in bytes
    assert fmt.terms["<｜tool▁calls▁begin｜>"] == f"<[{tokenizer.token_to_id('<｜tool▁calls▁begin｜>')}]>"
    assert tool_format(build_tokenizer()).name == "hermes"


def test_required_gives_a_valid_call_in_every_sample(client):
    response = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                              n=SAMPLES, seed=1, max_tokens=200, parallel_tool_calls=False)
    assert len(response.choices) == SAMPLES
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])
    assert {c.message.tool_calls[0].function.name for c in response.choices} == set(SCHEMAS)


def test_streamed_and_whole_answers_parse_to_the_same_calls(client):
    """Same seeds, same tokens: the calls parsed from the streamed deltas are those of the whole answers. (Parallel
    calls are the parser test's: a random model offered them adds calls until max_tokens cuts the block.)"""
    ask = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=8, seed=7, max_tokens=200,
               parallel_tool_calls=False)
    whole = client.chat.completions.create(**ask)
    streamed: dict[int, list] = {}
    finish = {}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed.setdefault(choice.index, []).extend(choice.delta.tool_calls or [])
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert len(whole.choices) == 8
    for choice in whole.choices:
        [call] = choice.message.tool_calls
        [delta] = streamed[choice.index]
        assert (delta.index, delta.function.name, delta.function.arguments) == (0, call.function.name,
                                                                                 call.function.arguments)
        assert choice.finish_reason == finish[choice.index] == "tool_calls"


def test_named_choice_calls_that_function(client):
    response = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        n=8, seed=3, max_tokens=200)
    for choice in response.choices:
        [call] = choice.message.tool_calls
        assert call.function.name == "add" and choice.finish_reason == "tool_calls"
        check_call(call)


def test_round_trip_renders_token_identical_to_transformers(client, model_dir):
    """call -> role: tool result -> next turn: the prompt the server builds is, token for token, what transformers'
    apply_chat_template(tools=...) renders from the same conversation (the tool definitions in the system section
    the server adds, since DeepSeek's template does not render `tools`)."""
    import transformers

    from openseek.serve.tools import DEEPSEEK_INSTRUCTIONS, template_messages, tool_format
    from openseek.tokenizer import Tokenizer

    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           seed=4, max_tokens=200, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    final = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, seed=5)

    # The server hands the template a call's missing content as "" (transformers drops a None-valued key, which
    # DeepSeek's template then cannot read); both branches of the template write the same text for it.
    served = [dict(ASK[0]), {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    section = DEEPSEEK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS))
    expected = theirs.apply_chat_template([{"role": "system", "content": section}, *served], tools=TOOLS,
                                          tokenize=False, add_generation_prompt=True)
    ours = Tokenizer.from_dir(model_dir)
    rendered = ours.apply_chat_template(template_messages(served, TOOLS, False, tool_format(ours)))
    assert rendered == expected
    assert ours.encode(rendered) == theirs.encode(expected, add_special_tokens=False)
    assert final.usage.prompt_tokens == len(ours.encode(expected))
    assert (f"<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{call.function.name}\n"
            f"```json\n{call.function.arguments}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>21 degrees<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
            ) in rendered
    assert rendered.endswith("<｜tool▁outputs▁end｜>")  # the model answers the tool output straight away


def test_parser_takes_deepseek_blocks_and_leaves_anything_else_as_text():
    from openseek.serve.tools import CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END, ToolCallParser, \
        ToolFormat

    fmt = ToolFormat("deepseek", CALLS_BEGIN, CALLS_END, {})
    one = f'{CALL_BEGIN}function{CALL_SEP}add\n```json\n{{"a": 1, "b": 2}}\n```{CALL_END}'
    two = f'{CALL_BEGIN}function{CALL_SEP}get_weather\n```json\n{{"city": "Oslo"}}\n```{CALL_END}'
    text = f"Let me check.{CALLS_BEGIN}{one}\n{two}{CALLS_END}"
    for cut in range(len(text) + 1):  # any split into two pieces gives the same content and calls
        parser = ToolCallParser({"add", "get_weather"}, fmt)
        (a, calls_a), (b, calls_b), (c, calls_c) = parser.feed(text[:cut]), parser.feed(text[cut:]), parser.flush()
        assert a + b + c == "Let me check."
        assert [(x.index, x.name, x.arguments) for x in calls_a + calls_b + calls_c] == [
            (0, "add", '{"a": 1, "b": 2}'), (1, "get_weather", '{"city": "Oslo"}')]
    unknown = f"{CALLS_BEGIN}{one.replace('add', 'sub')}{CALLS_END}"
    chatter = f"{CALLS_BEGIN}{one} and more{CALLS_END}"
    broken = f"{CALLS_BEGIN}{one.replace('1, ', '1,, ')}{CALLS_END}"
    for bad in (unknown, chatter, broken):
        parser = ToolCallParser({"add"}, fmt)
        content, calls = parser.feed(bad)
        rest, more = parser.flush()
        assert content + rest == bad and calls + more == []
    parser = ToolCallParser({"add"}, fmt)  # the answer ends before the block closes: what it holds still counts
    assert parser.feed(f"{CALLS_BEGIN}{one}") == ("", [])
    content, [call] = parser.flush()
    assert content == "" and call.name == "add"
