"""Constrained decoding: per-row objects that say which tokens may come next (grammars, thinking budgets).

A caller hands the Engine a *constraint spec* — compiled once, shared by any number of rows — and every row that
uses it gets its own state from `spec.start()`:

    compiler = GrammarCompiler(tokenizer)                    # once per tokenizer (builds llguidance's token table)
    grammar = compiler.json_schema({"type": "object", ...})  # or .json_object(), .lark(text), .regex(pattern)
    engine.generate(prompts, 64, constraint=grammar)         # every row's answer matches the schema
    engine.submit(prompt, 64, constraint=Thinking(end_ids, budget=256, then=grammar))

A row's state answers two questions, which is all the Sampler asks of it (`RowConstraint`):
`allowed()` — a bool mask over the vocabulary of the tokens that may come next, or None when any may — before each
token, and `advance(token)` with the token chosen. The Sampler sets every other token's logit to -inf before
sampling (greedy rows take the best allowed token); log-probs stay those of the model's distribution, as for
top-k/top-p (sampling.py).

`Grammar` wraps llguidance (Microsoft's Rust Earley parser with a token trie: schemas compile and masks advance in
well under a decode step; benchmarks/grammar_masks.py measures it against xgrammar and outlines-core, results in
benchmarks/RESULTS.md, "Grammar libraries for constrained decoding"). Its token table is built from the tokenizer's
own tokenizer.json (the `tokenizers` library), never through transformers. JSON is written compactly (", " and ": "
between items, no free whitespace), the form `json.dumps` and the chat templates' `tojson` give, so a model sees the
JSON it was trained on and cannot stall in whitespace. After a row's advance its next mask is computed on a worker
thread (llguidance releases the GIL), so it overlaps the next forward pass instead of stalling the batch; rows
without a constraint never wait for it.

`Thinking` is the reasoning block: free until the model closes it (`</think>`), then `then` (a spec, or nothing)
applies; with a `budget`, the close is forced once the block holds that many tokens, and the answer goes on. A
prompt that does not open the block itself lets the row's first token open it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class RowConstraint(Protocol):
    """One row's constraint state, as the Sampler uses it."""

    def allowed(self) -> torch.Tensor | None:
        """Bool [n] (n: the tokenizer's vocabulary; ids beyond it are refused): the tokens that may come next;
        None when any token may."""

    def advance(self, token: int) -> None:
        """The row chose `token`."""


class ConstraintError(ValueError):
    """A grammar or schema that cannot be compiled; the message says what is wrong with it."""


@lru_cache(maxsize=1)
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="openseek-mask")


def _unpack(words: torch.Tensor, size: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words, bit j of word i = token 32 i + j) as a bool [size] (numpy's unpackbits:
    much faster at a large vocabulary than torch's shifts)."""
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:size]
    return torch.from_numpy(bits.view(np.bool_))


class GrammarCompiler:
    """Turns grammars into `Grammar` specs for one tokenizer (an openseek Tokenizer, whose tokenizer.json it reads).

    stop_token_ids: the tokens that end a row (default: the tokenizer's EOS); a grammar allows them once its text
    is complete, and nothing else then.
    """

    def __init__(self, tokenizer, stop_token_ids: list[int] | None = None):
        import llguidance

        self._llguidance = llguidance
        stops = list(stop_token_ids) if stop_token_ids else [tokenizer.eos_token_id]
        if None in stops:
            raise ConstraintError("the tokenizer has no EOS token; pass stop_token_ids")
        self.vocab_size = tokenizer.vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                                eos_token=stops)

    def json_schema(self, schema: dict) -> Grammar:
        """JSON matching `schema` (a JSON Schema as a dict)."""
        if not isinstance(schema, dict):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return self.grammar(self._llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's `response_format: json_object`)."""
        return self.json_schema({"type": "object"})

    @staticmethod
    def lark_json(schema: dict) -> str:
        """`schema` as a Lark term (`%json {...}`) written in the compact JSON form above."""
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)

    def lark(self, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {schema}` embeds a JSON schema)."""
        return self.grammar(self._llguidance.LLMatcher.grammar_from_lark(text))

    def regex(self, pattern: str) -> Grammar:
        return self.grammar(self._llguidance.LLMatcher.grammar_from_regex(pattern))

    def grammar(self, compiled: str) -> Grammar:
        """A spec from llguidance's grammar text; ConstraintError with llguidance's message when it is invalid."""
        matcher = self._llguidance.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """A compiled grammar; `start()` gives a row its own matcher (a copy of the compiled start state)."""

    def __init__(self, matcher, vocab_size: int):
        self._start, self.vocab_size = matcher, vocab_size

    def start(self) -> GrammarState:
        return GrammarState(self._start.deep_copy(), self.vocab_size)


class GrammarState:
    """One row's place in a grammar. Its next mask is being computed (on a worker thread) from the moment it
    starts or advances; `allowed()` waits for it. Once the text is complete only the stop tokens are allowed, and
    a row that the batch still decodes after its stop token keeps getting them."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._mask: Future | None = _workers().submit(self._compute)

    def _compute(self) -> torch.Tensor:
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        return _unpack(self._words, self.vocab_size)

    def allowed(self) -> torch.Tensor:
        return self._mask.result()

    def advance(self, token: int) -> None:
        self._mask.result()  # the worker may still hold the matcher
        if self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self._mask = _workers().submit(self._compute)

    @property
    def accepting(self) -> bool:
        """The text so far is complete under the grammar."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()


class Thinking:
    """The reasoning block as a constraint spec (see the module docstring).

    end_ids: the token(s) that close the block (`</think>`); budget: most tokens inside the block before the close
    is forced (None = unbounded); then: the spec that applies after the block (None = free); opened: the prompt
    opened the block (R1's template ends with `<think>`), else `open_id` as the first token opens it (a first token
    that is anything else skips thinking, and `then` applies from it). stop_ids: the tokens that end a row; when
    `then` is a grammar they are refused inside the block, since a row that stopped while thinking would never
    write the answer the grammar promises (a model about to stop has to close the block first).
    """

    def __init__(self, end_ids: list[int], budget: int | None = None, then=None, opened: bool = True,
                 open_id: int | None = None, stop_ids: list[int] = ()):
        if not end_ids:
            raise ValueError("Thinking needs the token id(s) that close the reasoning block (end_ids)")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"the thinking budget must be an integer >= 0 (tokens), got {budget!r}")
        if not opened and open_id is None:
            raise ValueError("a prompt that does not open the reasoning block needs open_id (the `<think>` token)")
        self.end_ids, self.budget, self.then, self.opened, self.open_id = list(end_ids), budget, then, opened, open_id
        self.thinking_mask = None  # None: any token may come while thinking
        if stop_ids and isinstance(then, Grammar):
            self.thinking_mask = torch.ones(then.vocab_size, dtype=torch.bool)
            self.thinking_mask[[t for t in stop_ids if t < then.vocab_size]] = False

    def start(self) -> ThinkingState:
        return ThinkingState(self)


class ThinkingState:
    """One row's reasoning block: where it is ("opening", "thinking", "answer"), how many tokens it has thought
    and how much of the closing sequence it has written."""

    def __init__(self, spec: Thinking):
        self.spec = spec
        self.phase = "thinking" if spec.opened else "opening"
        self.thought = 0
        self.closed_by = 0  # tokens of end_ids written so far, in order
        self.after = None if spec.then is None else spec.then.start()

    def allowed(self) -> torch.Tensor | None:
        if self.phase == "answer":
            return None if self.after is None else self.after.allowed()
        if self.phase == "opening":
            answer = None if self.after is None else self.after.allowed()
            if answer is None:
                return None
            answer = answer.clone()
            if self.spec.open_id < len(answer):
                answer[self.spec.open_id] = True
            return answer
        budget = self.spec.budget
        if budget is None or self.thought < budget:
            return self.spec.thinking_mask
        only = torch.zeros(max(self.spec.end_ids) + 1, dtype=torch.bool)
        only[self.spec.end_ids[self.closed_by]] = True
        return only

    def advance(self, token: int) -> None:
        if self.phase == "answer":
            if self.after is not None:
                self.after.advance(token)
        elif self.phase == "opening":
            if token == self.spec.open_id:
                self.phase = "thinking"
            else:
                self.phase = "answer"
                self.advance(token)
        else:
            end = self.spec.end_ids
            if token == end[self.closed_by]:
                self.closed_by += 1
            else:
                self.closed_by = int(token == end[0])
            if self.closed_by == len(end):
                self.phase = "answer"
            else:
                self.thought += 1

