"""The OpenAI wire shapes the server reads and writes, as pydantic models (they also make /openapi.json).

Requests keep to the fields we honour; unknown fields that do not change the answer (user, metadata, store, ...)
are ignored, as OpenAI-compatible servers do. A known field that would change the answer and that the server cannot
honour (`UNHONOURED`: penalties, logit_bias, best_of, vLLM's guided_* ...) is refused with a 422 naming it, unless it
holds its neutral value (presence_penalty: 0 is fine). Limits that depend on the loaded model or on the server's
flags (context length, `n` cap, message count) and the schemas inside tools and response_format are checked by the
server, not here.

Every string of a request body, in any field (known or not) and in dict keys, must be Unicode: JSON's `\\u` escapes
can spell a lone surrogate, which no tokenizer, template or UTF-8 response can take, so a body holding one is refused
with a 400 naming the field (`invalid_unicode`) before any model reads it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from openseek.serve.gate import APIError

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # most alternatives per position (OpenAI's and vLLM's limit)

# Fields other servers take that would change the answer, each with the values that leave it unchanged.
UNHONOURED = {
    "best_of": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    # vLLM's sampling extensions the server does not honour (it does honour ignore_eos, stop_token_ids,
    # include_stop_str_in_output, skip_special_tokens and, for chat, chat_template_kwargs)
    "spaces_between_special_tokens": (None, True),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
}
UNHONOURED_HINTS = {"functions": "use `tools`", "function_call": "use `tool_choice`"}


def neutral_only(name: str, value, neutral: tuple, hints: dict[str, str]):
    """`value` of a field this server cannot honour, if it leaves the answer unchanged (it equals one of `neutral`);
    else the ValueError that refuses it (with `hints[name]`, or the neutral value to send)."""
    if any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral):  # True is not 1
        return value
    hint = hints.get(name, f"send {neutral[-1]!r} or leave it out")
    raise ValueError(f"{name}={value!r} is not supported by this server ({hint})")


class RequestPart(BaseModel):
    """A part of a client's request body: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


def lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, why) of the first string in a parsed JSON `value` that is not Unicode (it holds a lone surrogate), or
    None. Keys are checked before what they hold, so a path never shows a bad key; the walk keeps its own stack, as
    a body nested as deep as the JSON parser allows must not exhaust Python's."""
    pending = [(path, False, value)]
    while pending:
        where, is_key, item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as e:
                why = f"not valid Unicode (a lone surrogate at position {e.start})"
                return where, f"a key is {why}" if is_key else why
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                inside = f"{where}.{key}" if where else str(key)
                pending += [(inside, False, inner), (where, True, key)]
        elif isinstance(item, list):
            pending += [(f"{where}[{i}]", False, inner) for i, inner in reversed(list(enumerate(item)))]
    return None


class Body(RequestPart):
    """A whole request body: its strings are checked before any field is (see the module docstring)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, body):
        found = lone_surrogate(body)
        if found is None:
            return body
        where, why = found
        raise PydanticCustomError("invalid_unicode", "{message}",
                                  {"message": f"{where or 'body'}: {why}", "param": where or None})


class TextPart(RequestPart):
    type: Literal["text"]
    text: str


def json_object_text(arguments: str) -> str:
    """`arguments` if it is a JSON object as text (a tool call's arguments), else the ValueError saying why not."""
    try:
        value = json.loads(arguments)
    except RecursionError:
        raise ValueError("nested deeper than this server reads JSON") from None
    except ValueError as e:  # not JSON, or an integer too long to convert
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    found = lone_surrogate(value, "arguments")  # an escape in the JSON text can spell one
    if found is not None:
        raise ValueError(": ".join(found))
    return arguments


class FunctionCall(RequestPart):
    name: str
    arguments: str  # a JSON object, as text

    _json_object = field_validator("arguments")(json_object_text)


class ToolCallIn(RequestPart):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestPart):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    # Reasoning sent back from an earlier turn is accepted and dropped from the prompt (DeepSeek's rule).
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestPart):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SamplingFields(Body):
    """Fields shared by chat and text completions."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 or -1: off
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions: EOS does not end the answer; more tokens that do; the stop string or token kept at the
    # end of the text; special tokens (EOS, role markers) written into the text
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    min_p: Any = None
    min_tokens: Any = None
    suffix: Any = None
    functions: Any = None
    function_call: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    spaces_between_special_tokens: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    logits_processors: Any = None

    @field_validator(*UNHONOURED)
    @classmethod
    def _neutral_only(cls, value, info):
        return neutral_only(info.field_name, value, UNHONOURED[info.field_name], UNHONOURED_HINTS)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class FunctionDefinition(RequestPart):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; checked by compiling it
    strict: bool | None = None


class Tool(RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(RequestPart):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs `json_schema` ({name, schema})")
        return self


# Thinking tokens allowed for each `reasoning_effort` (the block is closed when they run out).
REASONING_EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_budget_tokens: int | None = Field(None, ge=0)  # most tokens of reasoning; then </think> is forced
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the chat template (enable_thinking, ...)


def chat_request(fields: dict, source: str) -> ChatCompletionRequest:
    """A chat request translated from another API's (anthropic.py, responses.py): what that API's models let through
    but a chat cannot hold (say, a conversation of nothing but reasoning items) is a 400 naming `source`, the
    other API's field the conversation came from."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{source}: as a chat, {where}: {first['msg']}", param=source) from None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # a string, strings, token ids or lists of token ids: one prompt or several (each gets its `n` choices)
    prompt: (Annotated[StrictStr, Field(min_length=1)] | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                                                   Field(min_length=1)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1)])
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for the legacy endpoint; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per position, besides the chosen token
    echo: bool = False
    chat_template_kwargs: Any = None  # a chat field: refused here unless empty

    @field_validator("chat_template_kwargs")
    @classmethod
    def _chat_only(cls, value):
        if value in (None, {}):
            return value
        raise ValueError("chat_template_kwargs applies to /v1/chat/completions; a text completion has no template")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_of_the_prompt_shapes(cls, prompt):
        """One message naming the problem, instead of one per shape the prompt failed to be."""
        shapes = "a non-empty string, a list of them, a list of token ids or a list of token-id lists"
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"must be {shapes}; got {'an empty list' if prompt == [] else type(prompt).__name__}")
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise ValueError(f"prompt {prompt.index('')} is empty")
            return prompt
        for i, ids in enumerate(prompt if isinstance(prompt[0], list) else [prompt]):
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"prompt {i} is not a non-empty list of token ids; the prompt must be {shapes}")
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or t < 0), None)
            if bad is not None:
                raise ValueError(f"prompt {i} has {bad!r}, not a token id (an integer >= 0)")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


# ---- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str, separator: str = "-") -> str:
    """An id of `prefix` (OpenAI's chat ids read chatcmpl-…; Anthropic's and the Responses API's msg_…, resp_…)."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's `choices[].logprobs`: the answer's tokens in `content`, the reasoning's in `reasoning_content`
    (split the way the text is)."""

    content: list[TokenLogprob] | None = None
    reasoning_content: list[TokenLogprob] | None = None


class TextLogprobs(BaseModel):
    """The legacy completions shape: per token its text, log-prob (None for a prompt's first token), the most
    likely tokens with the chosen one ({token: log-prob}) and its character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """The reasoning goes out under both names: `reasoning_content` (DeepSeek's) and `reasoning` (vLLM's newer)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCallOut):
    index: int  # of the call within the choice: a streamed call arrives whole, in one delta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openseek"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's: the base model it runs on


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str
    model_max_length: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
