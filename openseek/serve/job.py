"""What a request becomes on its way through the server: a `Job` of `Choice`s, each streaming `Piece`s of
reasoning and answer text, with `Scored` tokens when log-probs are asked for."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from openseek.serve.protocol import CompletionTokensDetails, Usage
from openseek.serve.reasoning import ReasoningSplitter
from openseek.serve.tools import ToolCall, ToolCallParser


@dataclass
class Scored:
    """One token's log-prob: its text, its log-prob (None for a prompt's first token), the most likely tokens at its
    position as (text, log-prob), best first (None with the first prompt token), and where its text starts in the
    choice's text."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None
    offset: int


@dataclass
class Piece:
    """What one choice adds in one step: reasoning text, answer text, or its end; and, when the request asked for
    log-probs, those of the tokens behind it (split as the text is; None when not asked)."""

    index: int
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    reasoning_logprobs: list[Scored] | None = None
    content_logprobs: list[Scored] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Choice:
    """One of a job's answers (`n` per prompt): its engine request and all it has produced so far."""

    index: int
    prompt: int  # index into Job.prompts
    max_tokens: int
    seed: int | None
    splitter: ReasoningSplitter | None  # None: a text completion, no reasoning split
    logprobs: bool = False  # the request asked for log-probs
    tools: ToolCallParser | None = None  # the request has tools that may be called
    handle: object = None  # the engine's request, once started
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the request's stop string that ended the answer (Anthropic reports it)
    reasoning_logprobs: list[Scored] = field(default_factory=list)
    content_logprobs: list[Scored] = field(default_factory=list)
    sent_logprobs: tuple[int, int] = (0, 0)  # (reasoning, content) entries already in a Piece
    offset: int = 0  # characters of text behind the log-prob entries so far

    def whole(self) -> Piece:
        """Everything this choice produced, as one Piece."""
        return Piece(self.index, "".join(self.reasoning), "".join(self.content), self.finish_reason,
                     self.reasoning_logprobs if self.logprobs else None,
                     self.content_logprobs if self.logprobs else None,
                     [] if self.tools is None else list(self.tools.calls))


@dataclass
class Job:
    """One request, validated and tokenized: its prompts (one for chat) and the choices for them."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    temperature: float
    top_p: float
    top_k: int
    stops: list[str]
    stop_token_ids: list[int]  # tokens that end a choice: the model's EOS (unless ignore_eos) and the request's
    choices: list[Choice]
    logprobs: int | None = None  # most likely tokens per position besides the chosen one; None: no log-probs
    echo: bool = False
    constraint: object = None  # the spec every choice's row follows (engine/constraint.py); None: free
    include_stop: bool = False  # the stop string or token that ended a choice stays at the end of its text
    skip_special_tokens: bool = True  # special tokens are left out of the text
    adapter: int = 0  # the LoRA adapter the request's `model` names (multi_lora.py; 0 = the base model)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False  # every choice ran to its end (a client hanging up after that cancels nothing)
    released: bool = False

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        reasoning = sum(c.reasoning_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))
