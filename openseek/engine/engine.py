"""The Engine: the only thing in openseek that generates (RL rollouts, eval, chat and serve all call it).

Batch generation (RL, eval):

    engine = Engine(model, max_batch_size=64)
    outs = engine.generate(prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, n=1,
                           stop_token_ids=None, seed=None, logprobs=False)

`prompts` is a list of token-id lists of any lengths. The result has one item per prompt: a `Completion` when
n == 1, else a list of n `Completion`s, which share one prefill of their prompt. `Completion.token_ids` are the new
tokens only, ending with the stop token when `finish_reason == "stop"`; `.logprobs` (when asked) are
log_softmax(logits / temperature) of each chosen token over the full vocabulary, before top-k/top-p (plain
log_softmax at temperature 0); see sampling.py. `stop_token_ids=None` means the model's EOS ids
(`model.cfg.eos_token_id`); `[]` never stops early. Temperature 0 is greedy; a seed makes sampling reproducible.

Streaming with continuous batching (serve, chat):

    request = engine.submit(prompt, max_new_tokens, temperature=..., top_p=..., top_k=..., stop_token_ids=None,
                            seed=None, logprobs=False, on_token=callback)
    async for token_id in request: ...      # tokens as they come (or `on_token(token_id)`, on the engine thread)
    completion = await request              # or request.result(timeout) from a thread
    request.cancel()                        # leaves the batch at the next step; finish_reason "cancelled"

A background thread (started on the first submit; `engine.close()` stops it) keeps one running batch of up to
`max_batch_size` rows: each step it admits waiting requests into free rows (prefilling them), decodes one token
for every row, streams the tokens and retires finished or cancelled requests. Rows hold up to `max_seq_len`
tokens (prompt + new; default min(context, 4096), so a long-context model does not preallocate its whole context).
A failing step (or a raising `on_token`) fails its requests: finish_reason "error", and awaiting them raises.

Bad input (empty prompt, token id outside the vocabulary, prompt + max_new_tokens beyond the model's context,
n < 1, top_p outside (0, 1], ...) raises ValueError naming the culprit; nothing is ever truncated silently.

How it decodes: caches are preallocated (cache.py), a prompt's tokens but the last are prefilled with the
ordinary (naive MLA) forward, then every step feeds one token per row at its own position; MLA decodes with the
absorbed weights over the latent cache. The engine works on the very module the trainer updates (no copy) and
never changes its weights. `engine.kv_bytes_per_token` is the cache cost of one token. On CUDA the same code
runs with SDPA; CUDA graphs for decode are not implemented yet.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

import torch

from openseek.engine.cache import Cache, kv_bytes_per_token, make_cache
from openseek.engine.sampling import Sampler, SamplingParams

FINISH_CHECK_EVERY = 8  # decode steps between host checks for finished rows in `generate`


def stop_token_ids(model_cfg, tokenizer=None) -> list[int]:
    """The tokens every caller stops on by default: config.json's EOS ∪ generation_config.json's EOS (the loader
    merges both into `model_cfg.eos_token_id`) ∪ the tokenizer's EOS. Eval, GRPO, sample, chat and serve all use
    this, so one model stops on the same tokens everywhere."""
    ids = list(model_cfg.eos_token_id or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(eos)
    return sorted(set(ids))


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length" ("cancelled" for a cancelled streaming request)


class Engine:
    def __init__(self, model, max_batch_size: int = 64, max_seq_len: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.cfg = model, model.cfg
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(self.cfg.max_position_embeddings, max_seq_len or 4096)
        self._model_lock = threading.Lock()  # one forward at a time (generate and the serving loop share the model)
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.cfg, self.model.dtype)

    # ---- checks -----------------------------------------------------------------------------------------------

    def _check_prompt(self, prompt, max_new_tokens: int, limit: int, what: str = "prompt") -> list[int]:
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"{what} is empty (or not a list of token ids): {prompt!r}")
        vocab = self.cfg.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{what} has token id {t!r} at index {i}, outside the vocabulary [0, {vocab})")
        if len(prompt) + max_new_tokens > limit:
            where = "max_position_embeddings" if limit == self.cfg.max_position_embeddings else "max_seq_len"
            raise ValueError(
                f"{what} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(prompt) + max_new_tokens} > {limit}, the model's context ({where})"
            )
        return list(prompt)

    def _stop_ids(self, stop_token_ids) -> list[int]:
        stop = list(self.cfg.eos_token_id) if stop_token_ids is None else list(stop_token_ids)
        for t in stop:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"stop token id {t!r} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return stop

    @staticmethod
    def _check_max_new(max_new_tokens) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

    # ---- batch generation ---------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        n: int = 1,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
    ) -> list:
        self._check_max_new(max_new_tokens)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        params = SamplingParams(temperature, top_p, top_k)
        limit = self.cfg.max_position_embeddings
        prompts = [self._check_prompt(p, max_new_tokens, limit, f"prompt {i}") for i, p in enumerate(prompts)]
        stop = self._stop_ids(stop_token_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(seed)

        rows = [(p, s) for p in range(len(prompts)) for s in range(n)]
        results = [[None] * n for _ in prompts]
        with self._model_lock, torch.inference_mode():
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                unique = sorted({p for p, _ in chunk})
                src = [unique.index(p) for p, _ in chunk]
                completions = self._generate_batch(
                    [prompts[p] for p in unique], src, max_new_tokens, params, stop, generator, logprobs
                )
                for (p, s), completion in zip(chunk, completions):
                    results[p][s] = completion
        return [r[0] if n == 1 else r for r in results]

    def _generate_batch(self, prompts, src, max_new_tokens, params, stop, generator, want_logprobs):
        """Rows src[i] -> prompts[src[i]]; one prefill per prompt, then decode until every row stops."""
        device = self.model.device
        R = len(src)
        prompt_len = [len(prompts[i]) for i in src]
        cache = make_cache(self.cfg, R, max(prompt_len) + max_new_tokens, self.model.dtype, device)
        self._prefill(cache, prompts, torch.tensor(src, device=device), torch.arange(R, device=device))

        sampler = Sampler([params] * R, device)
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
        tokens = torch.tensor([prompts[i][-1] for i in src], device=device)
        slots = torch.tensor(prompt_len, device=device) - 1  # a token's slot is its position
        row_of = torch.arange(R, device=device)  # output row of each running row (rows leave once finished)
        out_tokens = torch.zeros(R, max_new_tokens, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(R, max_new_tokens, device=device) if want_logprobs else None
        finished = torch.zeros(R, dtype=torch.bool, device=device)
        longest = max(prompt_len)  # host copy of max(slots) + 1 at step 0
        for step in range(max_new_tokens):
            cache.decode(slots, length=longest + step)
            logits = self.model(tokens[:, None], positions=slots[:, None], cache=cache)[:, -1]
            tokens, logprobs = sampler(logits, generator, want_logprobs)
            out_tokens[row_of, step] = tokens
            if want_logprobs:
                out_logprobs[row_of, step] = logprobs
            if stop:
                finished |= torch.isin(tokens, stop_ids)
            slots = slots + 1
            if stop and (step + 1) % FINISH_CHECK_EVERY == 0 and step + 1 < max_new_tokens:
                done = int(finished.sum())
                if done == len(finished):
                    break
                if done * 4 >= len(finished):  # drop finished rows from the batch: later steps get cheaper
                    keep = (~finished).nonzero()[:, 0]
                    cache.select_rows(keep)
                    tokens, slots, row_of, finished = tokens[keep], slots[keep], row_of[keep], finished[keep]
                    sampler = sampler.select(keep)
                    longest = int(slots.max()) - step
        return [
            self._completion(t, None if out_logprobs is None else lp, stop, max_new_tokens)
            for t, lp in zip(out_tokens.tolist(), [None] * R if out_logprobs is None else out_logprobs.tolist())
        ]

    @staticmethod
    def _completion(token_ids: list[int], logprobs, stop: list[int], max_new_tokens: int) -> Completion:
        stop_set = set(stop)
        for i, t in enumerate(token_ids):
            if t in stop_set:
                end = i + 1
                return Completion(token_ids[:end], None if logprobs is None else logprobs[:end], "stop")
        return Completion(token_ids, logprobs, "length")

    def _prefill(self, cache: Cache, prompts: list[list[int]], src: torch.Tensor, dest: torch.Tensor) -> None:
        """Store each prompt but its last token into its cache rows (the first decode step feeds the last one).

        prompts[src[i]] goes to cache row dest[i]. Prompts are right-padded, so each starts at slot/position 0.
        """
        heads = [p[:-1] for p in prompts]
        T = max(len(h) for h in heads)
        if T == 0:
            return
        device = self.model.device
        ids = torch.zeros(len(heads), T, dtype=torch.long)
        real = torch.zeros(len(heads), T, dtype=torch.bool)
        for i, h in enumerate(heads):
            ids[i, : len(h)] = torch.tensor(h, dtype=torch.long)
            real[i, : len(h)] = True
        cache.prefill(src, dest)
        self.model(ids.to(device), padding_mask=None if bool(real.all()) else real.to(device), cache=cache)

    # ---- streaming with continuous batching ---------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        on_token=None,
    ) -> Request:
        """Queue one request into the running batch; returns its handle at once (see the module docstring)."""
        self._check_max_new(max_new_tokens)
        params = SamplingParams(temperature, top_p, top_k)
        prompt = self._check_prompt(prompt, max_new_tokens, self.max_seq_len)
        generator = None if seed is None else torch.Generator(self.model.device).manual_seed(seed)
        request = Request(prompt, max_new_tokens, params, self._stop_ids(stop_token_ids), generator, logprobs, on_token)
        with self._wake:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="openseek-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    def close(self) -> None:
        """Stop the serving thread; requests still queued or running finish as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _serve(self) -> None:
        device = self.model.device
        rows: list[Request | None] = [None] * self.max_batch_size
        cache = sampler = None
        members = None  # the batch the sampler was built for
        while True:
            with self._wake:
                while not self._closed and not self._queue and not any(rows):
                    self._wake.wait()
                if self._closed:
                    for r in [*self._queue, *filter(None, rows)]:
                        r._finish("cancelled")
                    return
                new = []
                while self._queue and len(new) < rows.count(None):
                    request = self._queue.popleft()
                    if request.cancelled:
                        request._finish("cancelled")
                    else:
                        new.append(request)
            try:
                with self._model_lock, torch.inference_mode():
                    if cache is None:
                        cache = make_cache(self.cfg, self.max_batch_size, self.max_seq_len, self.model.dtype, device)
                    if new:
                        free = [i for i, r in enumerate(rows) if r is None][: len(new)]
                        for i, request in zip(free, new):
                            rows[i] = request
                            request._row_token, request._position = request.prompt[-1], len(request.prompt) - 1
                        self._prefill(
                            cache,
                            [r.prompt for r in new],
                            torch.arange(len(new), device=device),
                            torch.tensor(free, device=device),
                        )
                    for i, request in enumerate(rows):
                        if request is not None and request.cancelled:
                            request._finish("cancelled")
                            rows[i] = None
                    active = [i for i, r in enumerate(rows) if r is not None]
                    if not active:
                        continue
                    B = active[-1] + 1
                    batch = rows[:B]
                    if members is None or len(members) != B or any(a is not b for a, b in zip(members, batch)):
                        sampler = Sampler([r.params if r else SamplingParams(0.0) for r in batch], device)
                        members = batch
                    tokens = torch.tensor([r._row_token if r else 0 for r in batch], device=device)
                    positions = [r._position if r else 0 for r in batch]
                    slots = torch.tensor(positions, device=device)
                    cache.decode(slots, length=max(positions) + 1)
                    logits = self.model(tokens[:, None], positions=slots[:, None], cache=cache)[:, -1]
                    generators = [r.generator if r else None for r in batch]
                    want_logprobs = any(r.want_logprobs for r in batch if r)
                    chosen, logprobs = sampler(logits, generators, want_logprobs)
                    chosen = chosen.tolist()
                    logprobs = logprobs.tolist() if want_logprobs else [None] * B
            except Exception as error:  # fail the running requests, keep serving the others
                for i, r in enumerate(rows):
                    if r is not None:
                        r._finish("error", error)
                        rows[i] = None
                for r in new:
                    if not r.done:
                        r._finish("error", error)
                cache = None
                continue
            for i in active:
                request = rows[i]
                try:
                    request._emit(chosen[i], logprobs[i])
                except Exception as error:  # the request's own on_token callback failed
                    request._finish("error", error)
                    rows[i] = None
                    continue
                request._row_token, request._position = chosen[i], request._position + 1
                if chosen[i] in request.stop:
                    request._finish("stop")
                elif len(request.token_ids) == request.max_new_tokens:
                    request._finish("length")
                else:
                    continue
                rows[i] = None


class Request:
    """Handle of one streaming request: iterate (async) over its tokens, await its Completion, or cancel it."""

    def __init__(self, prompt, max_new_tokens, params, stop, generator, want_logprobs, on_token):
        self.prompt, self.max_new_tokens, self.params = prompt, max_new_tokens, params
        self.stop, self.generator, self.want_logprobs, self.on_token = set(stop), generator, want_logprobs, on_token
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if want_logprobs else None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._row_token, self._position = 0, 0

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
        return Completion(list(self.token_ids), None if self.logprobs is None else list(self.logprobs),
                          self.finish_reason)

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
    def _emit(self, token: int, logprob: float | None) -> None:
        with self._lock:
            self.token_ids.append(token)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
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
