"""What a caller of the Engine gets back: a `Completion`, and for a streaming request its `RequestHandle` (iterate
over its tokens, await its Completion, or cancel it)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch

from openseek.engine.sampling import chosen_logprobs


TopLogprobs = list[tuple[int, float]]  # (token id, log-prob) of the most likely tokens at one position, best first


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"; "cancelled" for a cancelled request, "error" for one a fault ended
    top_logprobs: list[TopLogprobs] | None = None  # per new token (streaming requests with logprobs)
    prompt_logprobs: list[float | None] | None = None  # per prompt token, None first (with prompt_logprobs)
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


# Prompt positions scored at once: their float32 logits, [256, V], are 156 MB at a 152k vocabulary.
PROMPT_SCORE_CHUNK = 256


def top_pairs(top, rows: int) -> list[TopLogprobs]:
    """(log-probs [N, k], ids [N, k]) from `chosen_logprobs` as one list of (id, log-prob) pairs per row."""
    if top is None:
        return [[] for _ in range(rows)]
    values, ids = top
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class RequestHandle:
    """Handle of one streaming request: iterate (async) over its tokens, await its Completion, or cancel it."""

    def __init__(self, prompt, max_new_tokens, params, stop, generator, want_logprobs, top_logprobs,
                 prompt_logprobs, on_token, adapter: int = 0):
        self.prompt, self.max_new_tokens, self.params = prompt, max_new_tokens, params
        self.adapter = adapter  # the LoRA adapter its rows use (multi_lora.py; 0 = the base model)
        self.stop, self.generator, self.want_logprobs, self.on_token = set(stop), generator, want_logprobs, on_token
        self.top_logprobs_k = top_logprobs
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if want_logprobs else None
        self.top_logprobs: list[TopLogprobs] | None = [] if want_logprobs else None
        # filled in at admission (before any token), when asked for
        self.prompt_logprobs: list[float | None] | None = [] if prompt_logprobs else None
        self.prompt_top_logprobs: list[TopLogprobs | None] | None = [] if prompt_logprobs else None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        """Block until finished (from a thread); raises the step's error if one failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self.error is not None:
            raise self.error
        copy = lambda values: None if values is None else list(values)  # noqa: E731
        return Completion(list(self.token_ids), copy(self.logprobs), self.finish_reason, copy(self.top_logprobs),
                          copy(self.prompt_logprobs), copy(self.prompt_top_logprobs))

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> Completion:
        async for _ in self:
            pass
        return self.result()

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._listeners.append((loop, event))
        seen = 0
        try:
            while True:
                event.clear()
                with self._lock:
                    new, finished = self.token_ids[seen:], self.done
                for token in new:
                    yield token
                seen += len(new)
                if finished and not new:
                    if self.error is not None:
                        raise self.error
                    return
                if not new:
                    await event.wait()
        finally:
            with self._lock:
                self._listeners.remove((loop, event))

    # engine thread side
    def _score_prompt(self, hidden: torch.Tensor, head) -> None:
        """Prompt log-probs from the prefill's final hidden states [len(prompt) - 1, H], as the sampler defines
        them. The head runs PROMPT_SCORE_CHUNK positions at a time and only each chunk's targets and top-k are
        kept, so scoring holds at most [PROMPT_SCORE_CHUNK, V] float32 logits whatever the prompt's length."""
        temperature = self.params.temperature or 1.0  # 0 (greedy): plain log_softmax
        targets = torch.tensor(self.prompt[1:], dtype=torch.long, device=hidden.device)
        chosen, top = [], []
        for start in range(0, len(targets), PROMPT_SCORE_CHUNK):
            end = start + PROMPT_SCORE_CHUNK
            logits = head(hidden[start:end]).float() / temperature
            chunk_chosen, chunk_top = chosen_logprobs(logits, targets[start:end], self.top_logprobs_k)
            chosen += chunk_chosen.tolist()
            top += top_pairs(chunk_top, len(chunk_chosen))
        self.prompt_logprobs[:] = [None, *chosen]
        self.prompt_top_logprobs[:] = [None, *top]

    def _emit(self, token: int, logprob: float | None, top: TopLogprobs) -> None:
        with self._lock:
            self.token_ids.append(token)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
                self.top_logprobs.append(top)
        if self.on_token is not None:
            self.on_token(token)
        self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            self.finish_reason, self.error = reason, error
            self._done.set()
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed
                pass
