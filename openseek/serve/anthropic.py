"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, what coding agents such as
Claude Code speak.

A request becomes the chat route's own ChatCompletionRequest (`to_chat`) and runs through Server.chat_job like any
chat: the same template and tool rendering, tool_choice grammar, thinking budget, limits and refusals (their field
names spelt back in this API's terms, `RENAMES`). The translation:

- `system` (a string or text blocks) is the first message; a user turn's `tool_result` blocks become tool messages
  (an `is_error` result reads "Error: ..."), its text blocks a user message, in the order they come; an assistant
  turn's text is its content and its `tool_use` blocks its tool calls; `thinking` blocks sent back are dropped, as
  the chat route drops earlier reasoning.
- `tools` (`input_schema`) are function tools; `tool_choice` auto / any / tool / none is auto / required / the named
  function / none, and `disable_parallel_tool_use` is `parallel_tool_calls: false`.
- `thinking` enabled is `thinking_budget_tokens: budget_tokens`; disabled is a budget of 0 on a model that reasons;
  adaptive leaves the server's default. `output_config.format` (json_schema) is `response_format`,
  `output_config.effort` low / medium / high is `reasoning_effort`.
- `max_tokens` (required), `stop_sequences` (up to 4), `temperature` (0 to 1), `top_p`, `top_k` as they are.

Refused with a 400 naming the field: a conversation ending on an assistant turn (a prefill: the chat template
starts a new turn and cannot continue one), image and document blocks, server tools (web search, bash, ...),
thinking `display`, `mcp_servers`, `container`. Fields that cannot change the answer (metadata, cache_control,
service_tier) are ignored. Errors come in Anthropic's envelope (gate.py).

What comes back (the Job's Pieces) is written by MessageWriter, as one Message or as Anthropic's event stream; one
writer builds both, so a streamed answer and a whole one hold the same blocks.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from openseek.serve.gate import APIError, anthropic_envelope
from openseek.serve.job import Job, Piece
from openseek.serve.protocol import (
    MAX_STOP_SEQUENCES,
    Body,
    ChatCompletionRequest,
    RequestPart,
    Stop,
    chat_request,
    neutral_only,
    new_id,
)
from openseek.serve.reasoning import THINK_CLOSE

# (the chat field a refusal names, as a regex; the field of this API it came from, written as Anthropic writes
# places: messages.0.content.1)
RENAMES = [
    (r"tools\[(\d+)\]\.function\.parameters", r"tools.\1.input_schema"),
    (r"tools\[(\d+)\]\.function\.name", r"tools.\1.name"),
    (r"thinking_budget_tokens", "thinking.budget_tokens"),
    (r"reasoning_effort", "output_config.effort"),
    (r"response_format(\..*)?", "output_config.format"),
    (r"stop", "stop_sequences"),
]
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
UNHONOURED = {"mcp_servers": (None, []), "container": (None,)}


def _as_text_blocks(value):
    """A string where text blocks may come, as one text block."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class TextBlock(RequestPart):
    type: Literal["text"]
    text: str


class Block(RequestPart):
    """One content block of a message. One model for every type, checked per type, so that an error's place reads
    messages.<i>.content.<j>.<field> whatever the block."""

    type: Literal["text", "tool_use", "tool_result", "thinking", "redacted_thinking"]
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: list[TextBlock] | None = None
    is_error: bool = False
    thinking: str | None = None

    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",),
        "thinking": ("thinking",), "redacted_thinking": ()}

    _text_content = field_validator("content", mode="before")(_as_text_blocks)

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        missing = [name for name in self.NEEDS[self.type] if getattr(self, name) is None]
        if missing:
            raise PydanticCustomError("missing", "a {kind} block needs `{field}`",
                                      {"kind": self.type, "field": missing[0]})
        return self

    def result_text(self) -> str:
        text = "".join(part.text for part in self.content or [])
        return f"Error: {text}" if self.is_error else text


class Message(RequestPart):
    role: Literal["user", "assistant"]
    content: list[Block] = Field(min_length=1)

    _text_content = field_validator("content", mode="before")(_as_text_blocks)


class ToolDefinition(RequestPart):
    type: str | None = None  # first: a server tool is refused as that, not for the input_schema it lacks
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _custom_only(cls, kind):
        if kind not in (None, "custom"):
            raise ValueError(f"{kind!r} is a server tool, which this server does not run; send custom tools "
                             f"(a name and an input_schema) and run them yourself")
        return kind


class ToolChoice(RequestPart):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _tool_has_a_name(self):
        if self.type == "tool" and self.name is None:
            raise PydanticCustomError("missing", "tool_choice of type tool needs the tool's `name`")
        return self


class Thinking(RequestPart):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Any = None

    @field_validator("display")
    @classmethod
    def _as_written(cls, display):
        if display is not None:
            raise ValueError("thinking comes back as the model wrote it (neither summarized nor omitted); leave "
                             "display out")
        return display

    @model_validator(mode="after")
    def _enabled_has_a_budget(self):
        if self.type == "enabled" and self.budget_tokens is None:
            raise PydanticCustomError("missing", "thinking of type enabled needs `budget_tokens`")
        return self


class OutputFormat(RequestPart):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(RequestPart):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high"] | None = None


class CountTokensRequest(Body):
    """What decides the prompt: the fields count_tokens reads, and the base of a Messages request."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    mcp_servers: Any = None
    container: Any = None

    _text_system = field_validator("system", mode="before")(_as_text_blocks)

    @field_validator(*UNHONOURED)
    @classmethod
    def _neutral_only(cls, value, info):
        return neutral_only(info.field_name, value, UNHONOURED[info.field_name], {})


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Stop] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False


def to_chat(request: CountTokensRequest, chat_template: str) -> ChatCompletionRequest:
    """The same request in the chat route's terms (see the module docstring)."""
    messages = [{"role": "system", "content": [block.model_dump() for block in request.system]}] if request.system \
        else []
    for i, message in enumerate(request.messages):
        messages += _turn(message, i)
    if request.messages[-1].role == "assistant":
        raise APIError(400, "the last message is the assistant's: continuing a turn (a prefill) is not supported; "
                            "end with a user message", param=f"messages.{len(request.messages) - 1}")
    fields: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                             "parameters": t.input_schema}} for t in request.tools]
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
            "type": "function", "function": {"name": choice.name}}
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    thinking = request.thinking
    if thinking is not None and thinking.type == "enabled":
        fields["thinking_budget_tokens"] = thinking.budget_tokens
    elif thinking is not None and thinking.type == "disabled" and THINK_CLOSE in chat_template:
        fields["thinking_budget_tokens"] = 0
    config = request.output_config
    if config is not None and config.format is not None:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": config.format.schema_}}
    if config is not None and config.effort is not None:
        fields["reasoning_effort"] = config.effort
    if isinstance(request, MessagesRequest):
        fields.update(max_tokens=request.max_tokens, stop=request.stop_sequences, temperature=request.temperature,
                      top_p=request.top_p, top_k=request.top_k)
    return chat_request(fields, "messages")


def _turn(message: Message, index: int) -> list[dict]:
    """One Anthropic turn as chat messages."""
    where = f"messages.{index}.content"
    if message.role == "assistant":
        text, calls = [], []
        for j, block in enumerate(message.content):
            if block.type == "tool_result":
                raise APIError(400, "a tool_result block belongs in a user message", param=f"{where}.{j}")
            if block.type == "text":
                text.append(block.text)
            elif block.type == "tool_use":
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input,
                                                                                      ensure_ascii=False)}})
        return [{"role": "assistant", "content": "".join(text), "tool_calls": calls or None}]
    out, text = [], []
    for j, block in enumerate(message.content):
        if block.type in ("tool_use", "thinking", "redacted_thinking"):
            raise APIError(400, f"a {block.type} block belongs in an assistant message", param=f"{where}.{j}")
        if block.type == "tool_result":
            if text:
                out.append({"role": "user", "content": text})
                text = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.result_text()})
        else:
            text.append({"type": "text", "text": block.text})
    return out + ([{"role": "user", "content": text}] if text else [])


def job(server, request: CountTokensRequest) -> Job:
    """The request as a Job of the chat route, its refusals naming this API's fields."""
    try:
        return server.chat_job(to_chat(request, server.tokenizer.chat_template))
    except APIError as e:
        raise e.renamed(RENAMES) from None


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


class MessageWriter:
    """A job's Pieces as Anthropic content blocks: thinking, text and tool_use, in the order the model wrote them.
    `start`, `feed` and `finish` return the stream's events; `whole()` is the whole Message they built."""

    def __init__(self, job: Job, model: str):
        self.job, self.model = job, model
        self.id = new_id("msg", "_")
        self.content: list[dict] = []
        self.open = False  # the last block is a thinking or text block still being written
        self.finish_reason: str | None = None

    def whole(self) -> dict:
        choice = self.job.choices[0]
        usage = self.job.usage()
        stop = self.finish_reason and STOP_REASONS[self.finish_reason]
        if stop == "end_turn" and choice.stop_sequence is not None:
            stop = "stop_sequence"
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.content,
                "stop_reason": stop, "stop_sequence": choice.stop_sequence if stop == "stop_sequence" else None,
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                          "output_tokens_details": {"thinking_tokens":
                                                    usage.completion_tokens_details.reasoning_tokens}}}

    def start(self) -> list[str]:
        message = self.whole() | {"content": [], "stop_reason": None, "stop_sequence": None}
        return [_event("message_start", {"message": message})]

    def feed(self, piece: Piece) -> list[str]:
        events = []
        if piece.reasoning:
            events += self._write("thinking", piece.reasoning)
        if piece.content:
            events += self._write("text", piece.content)
        for call in piece.tool_calls:
            events += self._close()
            self.content.append({"type": "tool_use", "id": call.id, "name": call.name,
                                 "input": json.loads(call.arguments)})
            index = len(self.content) - 1
            events += [_event("content_block_start", {"index": index, "content_block": {
                           "type": "tool_use", "id": call.id, "name": call.name, "input": {}}}),
                       _event("content_block_delta", {"index": index, "delta": {
                           "type": "input_json_delta", "partial_json": call.arguments}}),
                       _event("content_block_stop", {"index": index})]
        self.finish_reason = piece.finish_reason or self.finish_reason
        return events

    def finish(self) -> list[str]:
        message = self.whole()
        return self._close() + [
            _event("message_delta", {"delta": {"stop_reason": message["stop_reason"],
                                               "stop_sequence": message["stop_sequence"]},
                                     "usage": message["usage"]}),
            _event("message_stop", {})]

    @staticmethod
    def failed(message: str) -> list[str]:
        """The stream's last event when generation fails after the headers went out."""
        return [_event("error", {"error": anthropic_envelope(500, message)["error"]})]

    def _write(self, kind: str, text: str) -> list[str]:
        events = []
        if not (self.open and self.content[-1]["type"] == kind):
            events += self._close()
            block = {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {})
            self.content.append(block)
            self.open = True
            events.append(_event("content_block_start", {"index": len(self.content) - 1, "content_block": dict(block)}))
        self.content[-1][kind] += text
        events.append(_event("content_block_delta", {"index": len(self.content) - 1,
                                                     "delta": {"type": f"{kind}_delta", kind: text}}))
        return events

    def _close(self) -> list[str]:
        if not self.open:
            return []
        self.open = False
        return [_event("content_block_stop", {"index": len(self.content) - 1})]


def count_tokens(server, request: CountTokensRequest) -> dict:
    """The prompt's length as the model would get it: the same rendering as a Messages request's."""
    return {"input_tokens": len(job(server, request).prompts[0])}
