"""Split a reasoning model's output into `reasoning_content` and `content`, as DeepSeek's API does.

Text inside `<think>…</think>` is reasoning, the rest is the answer. R1-style chat templates end the prompt with
`<think>`, so the output then starts inside the reasoning and carries only the closing tag: pass
`in_reasoning=prompt_opens_reasoning(prompt)`. Works on streamed pieces: a tag split across pieces is held back
until it is complete, so a delta never shows half a tag.
"""

from __future__ import annotations

from openseek.tokenizer import END_THINK as THINK_CLOSE
from openseek.tokenizer import THINK as THINK_OPEN
from openseek.tokenizer import prompt_opens_reasoning

__all__ = ["THINK_CLOSE", "THINK_OPEN", "ReasoningSplitter", "prompt_opens_reasoning", "strip_reasoning"]


def strip_reasoning(text: str) -> str:
    """An earlier assistant turn without its reasoning: DeepSeek drops the chain of thought from the next prompt."""
    return text.rsplit(THINK_CLOSE, 1)[-1].lstrip() if THINK_CLOSE in text else text


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag` (kept back in case the tag completes)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Feed output text piece by piece; get back (reasoning, content) deltas.

    Whitespace right after a tag is dropped from the start of each field (R1 writes "<think>\\n" and
    "</think>\\n\\n"), so streamed deltas and the non-streamed message agree exactly; an answer with no tag
    before it is left as the model wrote it.
    """

    def __init__(self, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self._pending = ""
        self._started = {True: False, False: False}  # per field (keyed by in_reasoning): any text emitted yet
        self._after_tag = in_reasoning  # the prompt's own <think> counts

    def feed(self, text: str) -> tuple[str, str]:
        out = {True: [], False: []}
        text = self._pending + text
        self._pending = ""
        while text:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            at = text.find(tag)
            if at >= 0:
                self._emit(out, text[:at])
                text = text[at + len(tag):]
                self.in_reasoning, self._after_tag = not self.in_reasoning, True
                continue
            keep = partial_tag(text, tag)
            self._emit(out, text[: len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        return "".join(out[True]), "".join(out[False])

    def flush(self) -> tuple[str, str]:
        """The held-back end of the output once generation is over (it never became a tag)."""
        out = {True: [], False: []}
        self._emit(out, self._pending)
        self._pending = ""
        return "".join(out[True]), "".join(out[False])

    def _emit(self, out: dict, text: str) -> None:
        if not self._started[self.in_reasoning]:
            text = text.lstrip() if self._after_tag else text
            self._started[self.in_reasoning] = bool(text)
        if text:
            out[self.in_reasoning].append(text)
