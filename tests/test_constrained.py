"""Constrained decoding in the Engine (engine/constraint.py) and the tool-call parser, without a server."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from helpers_serve import ANSWER, REASONING, build_model, build_tokenizer, save_random_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "pick"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "pick": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def random_setup(tmp_path_factory):
    import openseek
    from openseek.tokenizer import Tokenizer

    directory = save_random_model_dir(tmp_path_factory.mktemp("random") / "m")
    return openseek.Engine(openseek.load(directory)), Tokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def scripted():
    import openseek

    tokenizer = build_tokenizer()
    return openseek.Engine(build_model(tokenizer)), tokenizer


def prompt_of(tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}]))


def test_generate_follows_the_schema_in_every_row(random_setup):
    from openseek.engine.constraint import GrammarCompiler

    engine, tokenizer = random_setup
    grammar = GrammarCompiler(tokenizer).json_schema(SCHEMA)
    prompts = [prompt_of(tokenizer), tokenizer.encode("Hello hi")]
    outs = engine.generate(prompts, 80, temperature=1.0, n=10, seed=0, constraint=grammar)
    for completion in (c for per_prompt in outs for c in per_prompt):
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(completion.token_ids, skip_special_tokens=True)), SCHEMA)


def test_a_constrained_row_leaves_the_others_alone(random_setup):
    """Greedy rows without a constraint decode the same tokens whether a constrained row shares their batch."""
    from openseek.engine.constraint import GrammarCompiler

    engine, tokenizer = random_setup
    grammar = GrammarCompiler(tokenizer).json_schema(SCHEMA)
    prompts = [prompt_of(tokenizer), tokenizer.encode("Hello hi")]
    alone = engine.generate(prompts[1:], 20, temperature=0, stop_token_ids=[])
    mixed = engine.generate(prompts, 20, temperature=0, stop_token_ids=[], constraint=[grammar, None])
    assert mixed[1][0].token_ids == alone[0][0].token_ids
    streamed = [engine.submit(p, n, temperature=0, stop_token_ids=[], constraint=c)
                for p, n, c in zip(prompts, [60, 20], [grammar, None])]
    assert streamed[1].result(60).token_ids == alone[0][0].token_ids
    assert json.loads(tokenizer.decode(streamed[0].result(60).token_ids, skip_special_tokens=True))


def test_log_probs_are_the_models_not_the_masks(random_setup):
    """As with top-k/top-p, a token's log-prob is under the model's full distribution."""
    from openseek.engine.constraint import GrammarCompiler

    engine, tokenizer = random_setup
    grammar = GrammarCompiler(tokenizer).json_schema(SCHEMA)
    prompt = prompt_of(tokenizer)
    [[completion]] = engine.generate([prompt], 6, temperature=0, logprobs=True, constraint=grammar,
                                     stop_token_ids=[])
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = engine.model(ids, all_logits=True)[0, len(prompt) - 1: -1].float().log_softmax(-1)
    expected = logits.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)
    assert completion.logprobs[0] < logits[0].max()  # the model preferred another token; the mask chose `{`


@pytest.mark.parametrize("budget", [0, 1, 3, None])
def test_thinking_budget_forces_the_close_and_the_answer_goes_on(scripted, budget):
    from openseek.engine.constraint import Thinking

    engine, tokenizer = scripted
    close = tokenizer.token_to_id("</think>")
    [[completion]] = engine.generate([prompt_of(tokenizer)], 40, temperature=0,
                                     constraint=Thinking([close], budget=budget))
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    thinking = REASONING if budget is None else " ".join(REASONING.split()[:budget])
    assert text == f"{thinking}</think>{ANSWER}"
    assert completion.token_ids.index(close) == (5 if budget is None else budget)


def test_a_row_cannot_stop_inside_the_thinking_when_an_answer_must_follow(random_setup):
    """With a grammar after the block, the stop tokens are refused while thinking: the answer always gets written."""
    from openseek.engine.constraint import GrammarCompiler, Thinking

    engine, tokenizer = random_setup
    eos = tokenizer.eos_token_id
    grammar = GrammarCompiler(tokenizer).json_schema(SCHEMA)
    state = Thinking([tokenizer.token_to_id("</think>")], then=grammar, stop_ids=[eos]).start()
    mask = state.allowed()
    assert not mask[eos] and int(mask.sum()) == tokenizer.vocab_size - 1
    assert Thinking([tokenizer.token_to_id("</think>")], stop_ids=[eos]).start().allowed() is None  # free after


def test_a_prompt_without_think_lets_the_first_token_open_it(scripted):
    from openseek.engine.constraint import GrammarCompiler, Thinking

    engine, tokenizer = scripted
    grammar = GrammarCompiler(tokenizer).json_object()
    prompt = tokenizer.encode("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜>")  # the model writes <think>
    spec = Thinking([tokenizer.token_to_id("</think>")], budget=2, then=grammar, opened=False,
                    open_id=tokenizer.token_to_id("<think>"))
    [[completion]] = engine.generate([prompt], 60, temperature=0, constraint=spec, stop_token_ids=[])
    text = tokenizer.decode(completion.token_ids)
    assert text.startswith("<think>\nSumming</think>{")  # "\n" and "Summing": the budget of 2


def test_bad_constraints_are_named():
    import openseek
    from openseek.engine.constraint import ConstraintError, GrammarCompiler, Thinking

    tokenizer = build_tokenizer()
    compiler = GrammarCompiler(tokenizer)
    with pytest.raises(ConstraintError, match="strnig"):
        compiler.json_schema({"type": "strnig"})
    with pytest.raises(ValueError, match="thinking budget"):
        Thinking([1], budget=-1)
    engine = openseek.Engine(build_model(tokenizer))
    with pytest.raises(ValueError, match="start"):
        engine.generate([[1, 2]], 2, constraint="json")
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate([[1, 2]], 2, constraint=[None, None])


def test_tool_call_parser_streams_text_and_whole_calls():
    from openseek.serve.tools import ToolCallParser

    parser = ToolCallParser({"add"})
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n' \
           '{"name": "nope", "arguments": {}}\n</tool_call><tool_call>\n{"name": "add", "arguments": {"a": 2}}'
    content, calls = [], []
    for i in range(0, len(text), 3):  # tags cut across pieces
        c, k = parser.feed(text[i: i + 3])
        content.append(c)
        calls += k
    c, k = parser.flush()  # the last block never closed, but what it holds parses
    content.append(c)
    calls += k
    assert "".join(content) == 'Let me add.\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "add", {"a": 1}), (1, "add", {"a": 2})]
    assert len({c.id for c in calls}) == 2
