"""OpenAI's Responses API: `POST /v1/responses`, what the OpenAI Agents SDK speaks.

A request becomes the chat route's own ChatCompletionRequest (`to_chat`) and runs through Server.chat_job like any
chat: the same template and tool rendering, tool_choice and text.format grammars, thinking budgets, limits and
refusals (their field names spelt back in this API's terms, `RENAMES`). The translation:

- `instructions` is the first, system message; `input` (a string: one user message; or items) gives the rest:
  messages (input_text / output_text parts) as they are, `function_call` items as the assistant's tool calls (those
  in a row, or right after an assistant message, join it), `function_call_output` items as tool messages;
  `reasoning` items sent back are dropped, as the chat route drops earlier reasoning.
- `tools` (type function) are function tools; `tool_choice` none / auto / required / {type: function, name};
  `parallel_tool_calls`; `text.format` text / json_object / json_schema is `response_format`; `reasoning.effort` is
  `reasoning_effort` (its budgets); `max_output_tokens`, `temperature`, `top_p` as they are.
- Nothing is stored: `store` is accepted (it cannot change the answer) but no response can be fetched or continued,
  so `previous_response_id` and `conversation` are refused with a 400 naming them; so are `background`, `include`,
  `top_logprobs`, `max_tool_calls`, `prompt`, `truncation: auto`, `reasoning.summary` (no summaries are made: the
  reasoning item carries the whole thinking as reasoning_text) and tools of other types (web search, file search...).

What comes back (the Job's Pieces) is written by ResponseWriter, as one Response or as the Responses event stream;
one writer builds both, so a streamed answer and a whole one hold the same output items.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from openseek.serve.gate import APIError
from openseek.serve.job import Job, Piece
from openseek.serve.protocol import (
    Body,
    ChatCompletionRequest,
    RequestPart,
    chat_request,
    json_object_text,
    neutral_only,
    new_id,
    now,
)

RENAMES = [
    (r"tools\[(\d+)\]\.function\.(\w+)", r"tools[\1].\2"),
    (r"response_format\.json_schema\.schema", "text.format.schema"),
    (r"response_format", "text.format"),
    (r"reasoning_effort", "reasoning.effort"),
    (r"max_tokens", "max_output_tokens"),
    (r"messages(\[\d+\].*)?", "input"),
]
UNHONOURED = {"previous_response_id": (None,), "conversation": (None,), "background": (None, False),
              "include": (None, []), "top_logprobs": (None, 0), "max_tool_calls": (None,), "prompt": (None,),
              "truncation": (None, "disabled")}
HINTS = {"previous_response_id": "nothing is stored: send the whole conversation in `input`",
         "conversation": "nothing is stored: send the whole conversation in `input`"}


class ContentPart(RequestPart):
    type: Literal["input_text", "output_text"]
    text: str


def _as_parts(value):
    """A string where content parts may come, as one input_text part."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class Item(RequestPart):
    """One input item. One model for every type, checked per type, so that an error's place reads
    input.<i>.<field> whatever the item; an item with a role and no type is a message."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None  # a JSON object, as text
    output: list[ContentPart] | None = None

    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
        "function_call_output": ("call_id", "output"), "reasoning": ()}

    _text_content = field_validator("content", "output", mode="before")(_as_parts)
    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, arguments: str | None) -> str | None:
        return None if arguments is None else json_object_text(arguments)

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        missing = [name for name in self.NEEDS[self.type] if getattr(self, name) is None]
        if missing:
            raise PydanticCustomError("missing", "a {kind} item needs `{field}`", {"kind": self.type,
                                                                                 "field": missing[0]})
        return self

    def text(self, parts: list[ContentPart] | None) -> str:
        return "".join(part.text for part in parts or [])


class FunctionTool(RequestPart):
    type: str
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _functions_only(cls, kind):
        if kind != "function":
            raise ValueError(f"{kind!r} tools are not run by this server; send tools of type function")
        return kind


class NamedFunction(RequestPart):
    type: Literal["function"]
    name: str


class TextFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("output", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise PydanticCustomError("missing", "a json_schema format needs `schema`")
        return self


class TextConfig(RequestPart):
    format: TextFormat | None = None


class ReasoningConfig(RequestPart):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Any = None

    @field_validator("summary")
    @classmethod
    def _no_summary(cls, summary):
        if summary is not None:
            raise ValueError("no summaries are made: the reasoning item holds the whole thinking; leave it out")
        return summary


class ResponsesRequest(Body):
    model: str
    input: list[Item] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True  # accepted; nothing is stored
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    include: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    truncation: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_user_message(cls, value):
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator(*UNHONOURED)
    @classmethod
    def _neutral_only(cls, value, info):
        return neutral_only(info.field_name, value, UNHONOURED[info.field_name], HINTS)


def to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    """The same request in the chat route's terms (see the module docstring)."""
    messages = [{"role": "system", "content": request.instructions}] if request.instructions is not None else []
    for item in request.input:
        if item.type == "message":
            messages.append({"role": item.role, "content": item.text(item.content)})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                         "arguments": item.arguments}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text(item.output)})
    fields: dict[str, Any] = {"model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
                              "temperature": request.temperature, "top_p": request.top_p,
                              "parallel_tool_calls": request.parallel_tool_calls}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                           for tool in request.tools]
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                        "function": {"name": choice.name}}
    fmt = request.text.format if request.text is not None else None
    if fmt is not None:
        fields["response_format"] = {"type": fmt.type} | ({"json_schema": {"name": fmt.name, "schema": fmt.schema_}}
                                                          if fmt.type == "json_schema" else {})
    if request.reasoning is not None and request.reasoning.effort is not None:
        fields["reasoning_effort"] = request.reasoning.effort
    return chat_request(fields, "input")


def job(server, request: ResponsesRequest) -> Job:
    """The request as a Job of the chat route, its refusals naming this API's fields."""
    try:
        return server.chat_job(to_chat(request))
    except APIError as e:
        raise e.renamed(RENAMES) from None


class ResponseWriter:
    """A job's Pieces as Responses output items: reasoning, message and function_call, in the order the model wrote
    them. `start`, `feed` and `finish` return the stream's events; `whole()` is the whole Response they built."""

    def __init__(self, job: Job, model: str, request: ResponsesRequest):
        self.job, self.model, self.request = job, model, request
        self.id = new_id("resp", "_")
        self.created = now()
        self.output: list[dict] = []
        self.open = False  # the last item is a reasoning or message item still being written
        self.finish_reason: str | None = None
        self.sequence = 0

    def whole(self, status: str | None = None) -> dict:
        usage = self.job.usage()
        status = status or ("incomplete" if self.finish_reason == "length" else "completed")
        request = self.request
        fmt = request.text.format if request.text is not None and request.text.format is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model, "status": status,
            "error": None, "output": self.output,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "parallel_tool_calls": request.parallel_tool_calls, "previous_response_id": None, "store": False,
            "temperature": request.temperature, "top_p": request.top_p, "truncation": "disabled", "metadata": {},
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None, "summary": None},
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": (request.tool_choice if isinstance(request.tool_choice, str) or request.tool_choice is None
                            else request.tool_choice.model_dump()) or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "usage": {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": usage.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": usage.completion_tokens_details.reasoning_tokens},
                      "total_tokens": usage.total_tokens},
        }

    def start(self) -> list[str]:
        opening = self.whole("in_progress") | {"output": [], "usage": None}
        return [self._event("response.created", response=opening), self._event("response.in_progress",
                                                                                response=opening)]

    def feed(self, piece: Piece) -> list[str]:
        events = []
        if piece.reasoning:
            events += self._write("reasoning", piece.reasoning)
        if piece.content:
            events += self._write("message", piece.content)
        for call in piece.tool_calls:
            events += self._close()
            item = {"type": "function_call", "id": new_id("fc", "_"), "call_id": call.id, "name": call.name,
                    "arguments": call.arguments, "status": "completed"}
            self.output.append(item)
            at = {"item_id": item["id"], "output_index": len(self.output) - 1}
            events += [self._event("response.output_item.added", output_index=at["output_index"],
                                   item=item | {"arguments": "", "status": "in_progress"}),
                       self._event("response.function_call_arguments.delta", **at, delta=call.arguments),
                       self._event("response.function_call_arguments.done", **at, name=call.name,
                                   arguments=call.arguments),
                       self._event("response.output_item.done", output_index=at["output_index"], item=item)]
        self.finish_reason = piece.finish_reason or self.finish_reason
        return events

    def finish(self) -> list[str]:
        events = self._close()
        response = self.whole()
        return events + [self._event(f"response.{response['status']}", response=response)]

    def failed(self, message: str) -> list[str]:
        """The stream's last events when generation fails after the headers went out."""
        error = {"code": "server_error", "message": message}
        return [self._event("error", code="server_error", message=message, param=None),
                self._event("response.failed", response=self.whole("failed") | {"error": error})]

    def _event(self, kind: str, **data) -> str:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def _write(self, kind: str, text: str) -> list[str]:
        """Text into the open item of `kind` (reasoning or message), opening one first when needed."""
        events = []
        part_type = "reasoning_text" if kind == "reasoning" else "output_text"
        if not (self.open and self.output[-1]["type"] == kind):
            events += self._close()
            item = ({"type": "reasoning", "id": new_id("rs", "_"), "summary": [], "content": []} if kind == "reasoning"
                    else {"type": "message", "id": new_id("msg", "_"), "role": "assistant", "content": []})
            item["status"] = "in_progress"
            self.output.append(item)
            self.open = True
            part = {"type": part_type, "text": ""} | ({"annotations": [], "logprobs": []} if kind == "message"
                                                      else {})
            events += [self._event("response.output_item.added", output_index=len(self.output) - 1,
                                   item=json.loads(json.dumps(item))),
                       self._event("response.content_part.added", **self._at(), part=dict(part))]
            item["content"].append(part)
        self.output[-1]["content"][0]["text"] += text
        delta = {"delta": text} | ({"logprobs": []} if kind == "message" else {})
        return events + [self._event(f"response.{part_type}.delta", **self._at(), **delta)]

    def _at(self) -> dict:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1, "content_index": 0}

    def _close(self) -> list[str]:
        if not self.open:
            return []
        self.open = False
        item = self.output[-1]
        item["status"] = "completed"
        part = item["content"][0]
        part_type = part["type"]
        return [self._event(f"response.{part_type}.done", **self._at(), text=part["text"],
                            **({"logprobs": []} if part_type == "output_text" else {})),
                self._event("response.content_part.done", **self._at(), part=part),
                self._event("response.output_item.done", output_index=len(self.output) - 1, item=item)]
