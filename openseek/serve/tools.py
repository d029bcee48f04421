"""Tool calling: OpenAI's `tools` into the prompt, the model's calls out of its answer, the grammar that forces one.

Two call formats, chosen by the chat template (`tool_format`), never by the model's name. Hermes/Qwen2's, which
Qwen2, Qwen2.5, Qwen3 and QwQ are trained on and their templates teach (and the built-in one for any other
template):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and DeepSeek-V3/R1's, in their own special tokens, for a template that writes `<｜tool▁calls▁begin｜>`:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(several calls one per line inside the one `tool▁calls` block). A template that renders tools itself (it reads
`tools`) gets the request's tools, assistant `tool_calls` and `role: "tool"` messages as they are, exactly as
transformers' `apply_chat_template(tools=...)` renders them: Hermes templates with the arguments as objects (as
transformers documents), DeepSeek's with the arguments as the JSON text they concatenate. DeepSeek's own templates
render calls and tool outputs but not the tool definitions, which then go into a system section in DeepSeek's call
format. A template that does neither (R1's, and any plain chat template) gets the built-in Hermes format: a system
section listing the tools and the call format, earlier calls written into the assistant's text in that format, and
tool results as user turns in `<tool_response>` tags (Hermes's convention).

Parsing is forgiving and never loses text: a block that does not hold only JSON objects with a known tool's `name`
and an object of `arguments` (strict JSON in UTF-8: no NaN, no lone surrogate) stays in `content` as the model
wrote it. Under `tool_choice: "required"` or a named function the answer is generated under `call_rule`'s grammar,
so every reply is a valid call; a marker that is one token of the vocabulary is forced as that token.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from openseek.engine.constraint import GrammarCompiler
from openseek.serve.reasoning import partial_tag

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
_DEEPSEEK_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"function" + re.escape(CALL_SEP) + r"([^\n]*)\n```json\n(.*?)\n```" + re.escape(CALL_END),
    re.DOTALL)

BUILT_IN_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)
DEEPSEEK_INSTRUCTIONS = (
    "## Tools\n\nYou can call these functions (JSON definitions, one per line):\n{tools}\n\n"
    "To call functions, answer with one block holding one call per line, the arguments a JSON object:\n"
    f"{CALLS_BEGIN}{CALL_BEGIN}function{CALL_SEP}<function-name>\n```json\n<args-json-object>\n```{CALL_END}"
    f"{CALLS_END}"
)


@dataclass(frozen=True)
class ToolFormat:
    """A call format: `name` ("hermes" or "deepseek"), the tags around a block of calls, and the Lark term that
    writes each of its markers (the marker's token when it is one token of the vocabulary, else its text)."""

    name: str
    open: str
    close: str
    terms: dict[str, str]


# Hermes's format with its tags as text: what a parser needs (its grammar wants `tool_format`'s token terms).
HERMES = ToolFormat("hermes", CALL_OPEN, CALL_CLOSE, {tag: json.dumps(tag) for tag in (CALL_OPEN, CALL_CLOSE)})


def tool_format(tokenizer) -> ToolFormat:
    """DeepSeek's format when the chat template writes DeepSeek's tool-call tokens, else Hermes's."""
    deepseek = CALLS_BEGIN in tokenizer.chat_template
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_SEP, CALL_END) if deepseek else (CALL_OPEN, CALL_CLOSE)
    terms = {}
    for marker in markers:
        token = tokenizer.token_to_id(marker)
        terms[marker] = f"<[{token}]>" if token is not None else json.dumps(marker, ensure_ascii=False)
    if deepseek:
        return ToolFormat("deepseek", CALLS_BEGIN, CALLS_END, terms)
    return ToolFormat("hermes", CALL_OPEN, CALL_CLOSE, terms)


@dataclass
class ToolCall:
    """One parsed call: OpenAI's `tool_calls[]` entry (arguments as a JSON string) and its place in the answer."""

    index: int
    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool,
                      fmt: ToolFormat = HERMES) -> list[dict]:
    """The conversation as the chat template gets it. messages: OpenAI message dicts (`tool_calls` arguments as JSON
    strings). A Hermes template that renders tools gets the arguments as objects; DeepSeek's templates get the
    messages as they are (and the tools in a system section when they do not read `tools`); any other template
    gets everything tool-related written out in the built-in format."""
    if fmt.name == "deepseek":
        if not tools or template_takes_tools:
            return messages
        section = DEEPSEEK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        return _with_system_section(messages, section)
    if template_takes_tools:
        return [_with_argument_objects(m) for m in messages]
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("tool_calls"):
            calls = "\n".join(_call_text(c["function"]["name"], json.loads(c["function"]["arguments"]))
                              for c in m.pop("tool_calls"))
            m["content"] = f"{m.get('content') or ''}\n{calls}".lstrip("\n")
        elif m["role"] == "tool":
            m.pop("tool_call_id", None)
            m.update(role="user", content=f"<tool_response>\n{m.get('content') or ''}\n</tool_response>")
    if not tools:
        return out
    section = BUILT_IN_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    return _with_system_section(out, section)


def _with_system_section(messages: list[dict], section: str) -> list[dict]:
    """`section` after the system message's text, or as a system message of its own."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{section}".lstrip("\n")}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _with_argument_objects(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _call_text(name: str, arguments: dict) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def call_rule(tools: list[dict], parallel: bool, fmt: ToolFormat) -> str:
    """Lark (llguidance's dialect) for one call to one of `tools` (OpenAI function definitions), or — `parallel` —
    one or more calls, one per line, in format `fmt`; the arguments follow each function's parameter schema."""
    terms = fmt.terms
    if fmt.name == "deepseek":
        calls = []
        for t in tools:
            name = json.dumps(t["function"]["name"] + "\n```json\n", ensure_ascii=False)
            arguments = GrammarCompiler.lark_json(t["function"].get("parameters") or {"type": "object"})
            calls.append(f'{terms[CALL_BEGIN]} "function" {terms[CALL_SEP]} {name} {arguments} "\\n```" '
                         f'{terms[CALL_END]}')
        call = "(" + " | ".join(calls) + ")"
        return f'{terms[CALLS_BEGIN]} {call}' + (f' ("\\n" {call})*' if parallel else "") + f" {terms[CALLS_END]}"
    choices = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in tools]
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    call = f'{terms[CALL_OPEN]} "\\n" {GrammarCompiler.lark_json(schema)} "\\n" {terms[CALL_CLOSE]}'
    return f"({call})" + (f' ("\\n" {call})*' if parallel else "")


class ToolCallParser:
    """Feed answer text piece by piece; get back (content, calls): the text outside call blocks as it streams, and
    each block's calls once it closes. A tag cut across pieces is held back until it is whole."""

    def __init__(self, tool_names: set[str], fmt: ToolFormat = HERMES):
        self.tool_names, self.format = tool_names, fmt
        self._pending = ""  # a possible start of the opening tag, or a call block not closed yet
        self._in_call = False
        self._after_call = False  # the newline after a call block is the format's, not the answer's
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        text = self._pending + text
        self._pending = ""
        opening, closing = self.format.open, self.format.close
        while text:
            if self._in_call:
                end = text.find(closing)
                if end < 0:
                    self._pending = text
                    break
                block, text = text[: end + len(closing)], text[end + len(closing):]
                self._in_call = False
                found = self._parse(block)
                if found is None:
                    content.append(block)
                else:
                    calls += found
                    self._after_call = True
                continue
            if self._after_call:
                text = text.lstrip("\n")
                self._after_call = not text
                if not text:
                    break
            at = text.find(opening)
            if at >= 0:
                content.append(text[:at])
                text, self._in_call = text[at:], True
                continue
            keep = partial_tag(text, opening)
            content.append(text[: len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The end of the answer: an unclosed block holds calls when what it holds parses, else text."""
        text, self._pending = self._pending, ""
        found = self._parse(text) if self._in_call else None
        self._in_call = False
        if found is None:
            return text, []
        return "", found

    def _parse(self, block: str) -> list[ToolCall] | None:
        """The calls a block holds, or None: the block is the model's text, so anything may come here (not JSON,
        nesting deeper than json.loads goes, a `name` that is a list) and anything but calls stays text."""
        body = block.removeprefix(self.format.open).removesuffix(self.format.close)
        if self.format.name == "deepseek":
            found = list(_DEEPSEEK_CALL.finditer(body))
            if not found or _DEEPSEEK_CALL.sub("", body).strip():  # text between the calls: not a block of calls
                return None
            pairs = [(m.group(1), _json_or_none(m.group(2))) for m in found]
        else:
            value = _json_or_none(body.strip())
            if not isinstance(value, dict):
                return None
            pairs = [(value.get("name"), value.get("arguments", {}))]
        texts = [self._arguments_text(name, arguments) for name, arguments in pairs]
        if None in texts:
            return None
        calls = [ToolCall(len(self.calls) + i, new_call_id(), name, text)
                 for i, ((name, _), text) in enumerate(zip(pairs, texts))]
        self.calls += calls
        return calls

    def _arguments_text(self, name, arguments) -> str | None:
        """The arguments as OpenAI sends them (JSON text), or None when this is not a call to a known tool."""
        if not (isinstance(name, str) and name in self.tool_names and isinstance(arguments, dict)):
            return None
        try:  # they go out as JSON in a UTF-8 response, which NaN, 1e999 or an escaped lone surrogate would break
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
            text.encode()
        except ValueError:  # UnicodeEncodeError is one
            return None
        return text


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
