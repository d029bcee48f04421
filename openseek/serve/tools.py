"""Tool calling: OpenAI's `tools` into the prompt, the model's calls out of its answer, the grammar that forces one.

The call format is Hermes/Qwen2's, which Qwen2, Qwen2.5, Qwen3 and QwQ are trained on and their templates teach:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that renders tools itself (it reads `tools`) gets the request's tools, assistant `tool_calls` (with their
arguments as objects, as transformers documents) and `role: "tool"` messages as they are, exactly as transformers'
`apply_chat_template(tools=...)` renders them. A template that does not (R1's, and any plain chat template) gets the
built-in format instead: a system section listing the tools and the call format, earlier calls written into the
assistant's text in that format, and tool results as user turns in `<tool_response>` tags (Hermes's convention).

Parsing is forgiving and never loses text: a block that is not a JSON object with a known tool's `name` and an
object of `arguments` (strict JSON in UTF-8: no NaN, no lone surrogate) stays in `content` as the model wrote it.
Under `tool_choice: "required"` or a named function the answer is generated under `call_rule`'s grammar, so every
reply is a valid call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from openseek.engine.constraint import GrammarCompiler
from openseek.serve.reasoning import partial_tag

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

BUILT_IN_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


@dataclass
class ToolCall:
    """One parsed call: OpenAI's `tool_calls[]` entry (arguments as a JSON string) and its place in the answer."""

    index: int
    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool) -> list[dict]:
    """The conversation as the chat template gets it. messages: OpenAI message dicts (`tool_calls` arguments as JSON
    strings). For a template that renders tools, arguments become objects; otherwise everything tool-related is
    written out in the built-in format."""
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
    if tools:
        section = BUILT_IN_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{section}".lstrip("\n")}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _with_argument_objects(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _call_text(name: str, arguments: dict) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def call_rule(tools: list[dict], parallel: bool) -> str:
    """Lark (llguidance's dialect) for one call to one of `tools` (OpenAI function definitions), or — `parallel` —
    one or more calls, one per line; the arguments follow each function's parameter schema."""
    choices = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in tools]
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    call = f'"{CALL_OPEN}\\n" {GrammarCompiler.lark_json(schema)} "\\n{CALL_CLOSE}"'
    return f"({call})" + (f' ("\\n" {call})*' if parallel else "")


class ToolCallParser:
    """Feed answer text piece by piece; get back (content, calls): the text outside call blocks as it streams, and
    each call once its block closes. A tag cut across pieces is held back until it is whole."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self._pending = ""  # a possible start of CALL_OPEN, or a call block not closed yet
        self._in_call = False
        self._after_call = False  # the newline after a call block is the format's, not the answer's
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        text = self._pending + text
        self._pending = ""
        while text:
            if self._in_call:
                end = text.find(CALL_CLOSE)
                if end < 0:
                    self._pending = text
                    break
                block, text = text[: end + len(CALL_CLOSE)], text[end + len(CALL_CLOSE):]
                self._in_call = False
                call = self._parse(block)
                if call is None:
                    content.append(block)
                else:
                    self.calls.append(call)
                    calls.append(call)
                    self._after_call = True
                continue
            if self._after_call:
                text = text.lstrip("\n")
                self._after_call = not text
                if not text:
                    break
            at = text.find(CALL_OPEN)
            if at >= 0:
                content.append(text[:at])
                text, self._in_call = text[at:], True
                continue
            keep = partial_tag(text, CALL_OPEN)
            content.append(text[: len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The end of the answer: an unclosed block is a call when what it holds parses, else text."""
        text, self._pending = self._pending, ""
        call = self._parse(text) if self._in_call else None
        self._in_call = False
        if call is None:
            return text, []
        self.calls.append(call)
        return "", [call]

    def _parse(self, block: str) -> ToolCall | None:
        """The call a block holds, or None: the block is the model's text, so anything may come here (not JSON,
        nesting deeper than json.loads goes, a `name` that is a list) and anything but a call stays text."""
        body = block.removeprefix(CALL_OPEN).removesuffix(CALL_CLOSE).strip()
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        name, arguments = value.get("name"), value.get("arguments", {})
        if not (isinstance(name, str) and name in self.tool_names and isinstance(arguments, dict)):
            return None
        try:  # they go out as JSON in a UTF-8 response, which NaN, 1e999 or an escaped lone surrogate would break
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
            text.encode()
        except ValueError:  # UnicodeEncodeError is one
            return None
        return ToolCall(len(self.calls), new_call_id(), name, text)
