"""Turn a stream of token ids into a stream of text, honouring stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece vocabularies (a character can span
tokens; spaces depend on neighbours), so each new piece is the difference between decoding a short window with
and without the newest tokens, and nothing is emitted while the text ends inside a multi-byte character. Special
tokens (BOS, EOS, role markers) are not text and are left out, as vLLM and transformers' decoding for eval do.
"""

from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are already text and give no context we need
        self._read = 0  # tokens up to here have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # mid-character: wait for the next token
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text held back at the end (a character cut short shows as U+FFFD, as decoding everything would)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


class StopMatcher:
    """Cuts the text at the first stop string (after it with `include_stop`); holds back an end that could still
    become one."""

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [(at, -len(s)) for at, s in ((text.find(s), s) for s in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            at, minus_length = min(hits)  # the first stop to start; of those starting there, the longest
            self.matched = text[at: at - minus_length]
            return text[: at - minus_length if self.include_stop else at]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text


def _overlap(text: str, stop: str) -> int:
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
