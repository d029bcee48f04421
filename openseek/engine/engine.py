"""The Engine: the only thing in openseek that generates (RL rollouts, eval, chat and serve all call it).

    engine = Engine(model, max_batch_size=64)
    outs = engine.generate(prompts, max_new_tokens=256, n=4, seed=0, logprobs=True)   # [prompt][n] Completions
    request = engine.submit(prompt, max_new_tokens, on_token=callback)                  # streaming (a RequestHandle)
    async for token_id in request: ...

`generate` and the serving thread (continuous batching, started on the first `submit`) run the same rows of one
preallocated cache (batch.py: prefill, the one decode step, row compaction). The Engine works on the very module
the trainer updates and never changes its weights. Bad input raises ValueError naming the culprit. What each
argument means, how faults stay with their requests, prefix caching, `compile=True`, `cuda_graphs=True` and MTP
speculation: docs/engine.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from collections import deque
from contextlib import contextmanager

import torch

from openseek.engine.batch import Batch, SpeculationStats
from openseek.engine.cache import kv_bytes_per_token, make_cache
from openseek.engine.compile import GraphedDecode, check_cuda_graphs, compiled_forwards, mtp_with_logits
from openseek.engine.prefix import PrefixCache
from openseek.engine.request import Completion, RequestHandle, TopLogprobs, top_pairs
from openseek.engine.sampling import SamplingParams
from openseek.multi_lora import adapter_set
from openseek.threads import AdaptiveThreads

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


@contextmanager
def _callers_threads():
    """The decode steps run at the thread count `Engine.threads` chooses (set per step, which costs nothing when it
    does not change); the caller's own count is back when `generate` returns."""
    caller = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(caller)


class Engine:
    def __init__(self, model, max_batch_size: int = 64, max_seq_len: int | None = None,
                 prefix_cache_tokens: int | None = None, threads: int | None = None, speculative: str | None = None,
                 num_speculative_tokens: int = 1, compile: bool = False, cuda_graphs: bool = False):
        """prefix_cache_tokens: tokens the serving thread's prefix cache holds at most (default 4 × max_seq_len;
        0 = no prefix caching). threads: CPU intra-op threads for decoding; None measures the decode steps at each
        count and keeps the fastest as the machine's load changes (openseek/threads.py). speculative="mtp": draft
        `num_speculative_tokens` tokens per step with the model's MTP module (see docs/engine.md).
        compile: run the decode step's forwards through torch.compile; cuda_graphs: replay the plain decode step
        as CUDA graphs (a CUDA model; with compile, of the compiled step) (both: docs/engine.md)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: the one kind is 'mtp' (or None: no speculation)")
        if speculative == "mtp" and not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with MTP modules (num_nextn_predict_layers >= 1); this "
                             "one has none (its checkpoint ships no MTP weights, or it was trained without them)")
        k = num_speculative_tokens
        if speculative and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"num_speculative_tokens must be an integer >= 1 (tokens drafted per step), got {k!r}")
        if cuda_graphs:
            check_cuda_graphs(model, speculative)
        self.draft_tokens = k if speculative else 0  # k drafted per step; 0 = no speculation
        self.adapters = adapter_set(model)  # several LoRA adapters chosen per request (multi_lora.py), or None
        if self.adapters is not None and (compile or speculative or cuda_graphs):
            refused = "compile" if compile else "speculative" if speculative else "cuda_graphs"
            raise ValueError(f"{refused}: a model with several LoRA adapters "
                             "(multi_lora.py) runs without it (its rows' adapters are chosen on the host at each "
                             "forward)")
        self.stats = SpeculationStats()
        self.model, self.cfg = model, model.cfg
        self.compiles, self.cuda_graphs = compile, cuda_graphs
        self._generate_graphs: GraphedDecode | None = None  # `generate`'s graphs and their cache, kept between calls
        self.decode_forward, self.mtp_forward = (
            compiled_forwards(model) if compile else (model.forward, functools.partial(mtp_with_logits, model)))
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(self.cfg.max_position_embeddings, max_seq_len or 4096)
        capacity = 4 * self.max_seq_len if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefix_cache = PrefixCache(capacity) if capacity > 0 else None
        self._weights_version = None  # of the weights the prefix cache was filled with
        self.threads = AdaptiveThreads(fixed=threads, window=8, hold=16)
        self._model_lock = threading.Lock()  # one forward at a time (generate and the serving loop share the model)
        self._queue: deque[RequestHandle] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running = 0  # requests holding a row of the serving batch, after the last step
        self.failure: BaseException | None = None  # what stopped the serving thread, if an error did

    def _new_batch(self, capacity: int, max_len: int, graphs: GraphedDecode | None = None) -> Batch:
        """A batch of `capacity` rows of `max_len` slots; with cuda_graphs, over `graphs` (default: new ones)."""
        if self.cuda_graphs and graphs is None:
            graphs = GraphedDecode(self.decode_forward, make_cache(self.cfg, capacity, max_len, self.model.dtype,
                                                                    self.model.device))
        return Batch(self.model, (self.decode_forward, self.mtp_forward), self.draft_tokens, capacity, max_len,
                     compiled=self.compiles, graphs=graphs)

    def _graphs_for_generate(self, rows: int, max_len: int) -> GraphedDecode | None:
        """With cuda_graphs, `generate`'s graphs: kept between calls with their cache (so a later call replays the
        graphs an earlier one captured), replaced by a larger cache's when a call needs more rows or slots."""
        if not self.cuda_graphs:
            return None
        kept = self._generate_graphs
        if kept is None or kept.cache.rows < rows or kept.cache.max_len < max_len:
            if kept is not None:
                rows, max_len = max(rows, kept.cache.rows), max(max_len, kept.cache.max_len)
            self._generate_graphs = None  # its cache's memory goes before the larger one is allocated
            self._generate_graphs = GraphedDecode(self.decode_forward, make_cache(
                self.cfg, rows, max_len, self.model.dtype, self.model.device))
        return self._generate_graphs

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.cfg, self.model.dtype, mtp_layers=1 if self.draft_tokens else 0)

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
        seed: int | list[int] | None = None,
        logprobs: bool = False,
        constraint=None,
    ) -> list[list[Completion]]:
        """Per prompt, a list of `n` Completions (also when n == 1) sharing one prefill; see docs/engine.md.
        Blocks until every row (prompt × sample) has finished; rows are decoded up to `max_batch_size` at a time."""
        self._check_max_new(max_new_tokens)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        params = SamplingParams(temperature, top_p, top_k)
        limit = self.cfg.max_position_embeddings
        prompts = [self._check_prompt(p, max_new_tokens, limit, f"prompt {i}") for i, p in enumerate(prompts)]
        stop = self._stop_ids(stop_token_ids)
        rows = [(p, s) for p in range(len(prompts)) for s in range(n)]
        specs = self._constraint_specs(constraint, len(prompts))
        generators = self._generators(seed, len(prompts), rows)
        results = [[None] * n for _ in prompts]
        with self._model_lock, torch.inference_mode(), _callers_threads():
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                unique = sorted({p for p, _ in chunk})
                src = [unique.index(p) for p, _ in chunk]
                generator = generators if not isinstance(generators, list) else generators[start : start + len(chunk)]
                row_params = [_constrained(params, specs[p]) for p, _ in chunk]
                completions = self._run_to_end(
                    [prompts[p] for p in unique], src, max_new_tokens, row_params, stop, generator, logprobs
                )
                for (p, s), completion in zip(chunk, completions):
                    results[p][s] = completion
        return results

    def _generators(self, seed, prompts: int, rows: list[tuple[int, int]]):
        """None (the global RNG), one generator for the whole call (an int seed), or — a list of seeds, one per
        prompt — one generator per row, seeded by its prompt's seed and its sample index: each prompt's samples
        then do not depend on which other prompts share the call (GRPO on several processes relies on it)."""
        if seed is None:
            return None
        if not isinstance(seed, (list, tuple)):
            return torch.Generator(self.model.device).manual_seed(seed)
        if len(seed) != prompts:
            raise ValueError(f"seed has {len(seed)} values for {prompts} prompts (one per prompt, or one int)")
        return [torch.Generator(self.model.device).manual_seed((seed[p] * 1_000_003 + s) % 2**63) for p, s in rows]

    def _constraint_specs(self, constraint, prompts: int) -> list:
        """One constraint spec (or None) per prompt, from `constraint`: None, one spec for all, or a list."""
        specs = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * prompts
        if len(specs) != prompts:
            raise ValueError(f"constraint has {len(specs)} specs for {prompts} prompts (one per prompt, or one)")
        if self.draft_tokens and any(s is not None for s in specs):
            raise ValueError("constraint: constrained decoding does not run with speculative decoding (speculative="
                             "'mtp'); use an Engine without it")
        for spec in specs:
            if spec is not None and not callable(getattr(spec, "start", None)):
                raise ValueError(f"constraint must be a spec with a start() method (constraint.py), got {spec!r}")
        return specs

    def _run_to_end(self, prompts, src, max_new_tokens, params, stop, generator, want_logprobs) -> list[Completion]:
        """Admit rows src[i] -> prompts[src[i]] (sampling with params[i]) into one batch (one prefill per prompt)
        and step until every row stops. Tokens stay on the device; the host looks for finished rows every
        FINISH_CHECK_EVERY steps (every step when speculating: rows then gain different numbers of tokens, and the
        step reads them anyway)."""
        device = self.model.device
        R, T = len(src), 1 + self.draft_tokens  # T: tokens a step may give a row
        # a row's last step may write up to T - 1 tokens past its end (cut off below); its cache, as many slots
        max_len = max(len(prompts[i]) for i in src) + max_new_tokens + T - 1
        batch = self._new_batch(R, max_len, self._graphs_for_generate(R, max_len))
        batch.admit(prompts, src, list(range(R)), params, list(range(R)))
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
        row_of = torch.arange(R, device=device)  # output row of each batch row (rows leave once finished)
        out_tokens = torch.zeros(R, max_new_tokens + T, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(R, max_new_tokens + T, device=device) if want_logprobs else None
        produced = torch.zeros(R, dtype=torch.long, device=device)  # new tokens per batch row (max_new_tokens at most)
        finished = torch.zeros(R, dtype=torch.bool, device=device)
        offsets = torch.arange(T, device=device)
        for step in range(1, max_new_tokens + 1):  # every step gives every row at least one token
            with self.threads.unit():
                out = batch.step(generator, want_logprobs)
            at = produced[:, None] + offsets  # a row's tokens past its count are overwritten by its next step
            out_tokens[row_of[:, None], at] = out.tokens
            if want_logprobs:
                out_logprobs[row_of[:, None], at] = out.logprobs
            if self.draft_tokens:
                self.stats.record(out.counts[~finished], self.draft_tokens)
            if stop:
                finished |= (torch.isin(out.tokens, stop_ids) & (offsets < out.counts[:, None])).any(dim=1)
            produced = (produced + out.counts).clamp(max=max_new_tokens)
            if step < max_new_tokens and (self.draft_tokens or stop and step % FINISH_CHECK_EVERY == 0):
                finished |= produced == max_new_tokens
                done = int(finished.sum())
                if done == len(finished):
                    break
                if done * 4 >= len(finished):  # drop finished rows from the batch: later steps get cheaper
                    keep = (~finished).nonzero()[:, 0]
                    batch.keep(keep)
                    if isinstance(generator, list):
                        generator = [generator[i] for i in keep.tolist()]
                    row_of, finished, produced = row_of[keep], finished[keep], produced[keep]
        out_tokens = out_tokens[:, :max_new_tokens]
        out_logprobs = None if out_logprobs is None else out_logprobs[:, :max_new_tokens]
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
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
        on_token=None,
        constraint=None,
        adapter: int = 0,
    ) -> RequestHandle:
        """Queue one request into the running batch; returns its handle at once (see docs/engine.md). adapter: the
        LoRA adapter it runs with, on a model with several (multi_lora.py; 0 = the base model)."""
        if not (prompt_logprobs and max_new_tokens == 0):
            self._check_max_new(max_new_tokens)
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        if top_logprobs > self.cfg.vocab_size:
            raise ValueError(f"top_logprobs={top_logprobs} is more than the vocabulary ({self.cfg.vocab_size})")
        params = _constrained(SamplingParams(temperature, top_p, top_k), self._constraint_specs(constraint, 1)[0])
        prompt = self._check_prompt(prompt, max_new_tokens, self.max_seq_len)
        if self.adapters is not None:
            self.adapters.check(adapter)
        elif adapter != 0:
            raise ValueError(f"adapter={adapter!r}: this model has no adapters to choose between (0 = the model)")
        generator = None if seed is None else torch.Generator(self.model.device).manual_seed(seed)
        request = RequestHandle(prompt, max_new_tokens, params, self._stop_ids(stop_token_ids), generator, logprobs,
                                top_logprobs, prompt_logprobs, on_token, adapter)
        with self._wake:
            if self._closed:
                raise RuntimeError("engine is closed")
            if self.failure is not None:
                raise self._stopped_error() from self.failure
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
        """The serving thread: one running batch whose rows are requests (`Batch.owner`), advanced by one
        `_serve_step` at a time. A step that raises fails its own requests and the loop goes on with a fresh batch;
        an error that ends the loop is kept in `failure` and fails every request left (see docs/engine.md)."""
        batch: Batch | None = None  # made on first use; dropped when a step fails
        new: list[RequestHandle] = []
        try:
            while True:
                running = [r for r in batch.owner if r is not None] if batch else []
                new = self._take_waiting(running)
                if new is None:
                    return
                try:
                    batch = self._serve_step(batch, new)
                except Exception as error:  # this step's requests fail; the waiting ones get the next steps
                    for r in [*running, *new]:
                        if not r.done:
                            r._finish("error", error)
                    batch = None
                self.running = sum(r is not None for r in batch.owner) if batch else 0
        except BaseException as error:
            with self._wake:
                self.failure = error
                waiting = list(self._queue)
                self._queue.clear()
            # an Exception for them, whatever the error was: a SystemExit must not stop the threads awaiting them
            stopped = self._stopped_error()
            stopped.__cause__ = error
            for r in [*waiting, *(batch.owner if batch else []), *new]:
                if r is not None and not r.done:
                    r._finish("error", stopped)
            raise
        finally:
            self.running = 0

    def _stopped_error(self) -> RuntimeError:
        return RuntimeError(f"the engine's serving thread stopped on an error: {self.failure!r}")

    def _take_waiting(self, running: list[RequestHandle]) -> list[RequestHandle] | None:
        """Wait until there is work; then the waiting requests that fit into the free rows (cancelled ones finish
        here instead). None once the engine is closed: every request waiting or `running` has then finished
        "cancelled"."""
        with self._wake:
            while not self._closed and not self._queue and not running:
                self._wake.wait()
            if self._closed:
                for r in [*self._queue, *running]:
                    r._finish("cancelled")
                return None
            new = []
            while self._queue and len(new) < self.max_batch_size - len(running):
                request = self._queue.popleft()
                if request.cancelled:
                    request._finish("cancelled")
                else:
                    new.append(request)
            return new

    def _serve_step(self, batch: Batch | None, new: list[RequestHandle]) -> Batch:
        """Admit `new` into free rows of `batch` (made here on first use), retire the cancelled requests, decode one
        step for every row, stream its tokens, and keep each finished sequence in the prefix cache and free its row.
        Returns the batch."""
        with self._model_lock, torch.inference_mode():
            if batch is None:
                # a row's last step may write k draft slots past max_seq_len
                batch = self._new_batch(self.max_batch_size, self.max_seq_len + self.draft_tokens)
            if new:
                self._admit_isolating_faults(batch, new)
            cancelled = [i for i, r in enumerate(batch.owner) if r is not None and r.cancelled]
            for i in cancelled:
                batch.owner[i]._finish("cancelled")
            batch.vacate(cancelled)
            if not batch.size:
                return batch
            chosen, counts, logprobs, top_logprobs = self._decode_step(batch)
        finished = [i for i, r in enumerate(batch.owner) if r is not None and any(
            self._emit(r, chosen[i][j], logprobs[i][j], top_logprobs[i][j]) for j in range(counts[i]))]
        for i in finished:
            request = batch.owner[i]
            if self.prefix_cache is not None and request.finish_reason in ("stop", "length"):
                # the row holds the prompt and every new token but the last (never fed)
                self.prefix_cache.save(request.prompt + request.token_ids[:-1], batch.cache, i, request.adapter)
        batch.vacate(finished)
        return batch

    def _decode_step(self, batch: Batch) -> tuple[list, list, list, list]:
        """One decode step of the serving batch, read back to the host: per row its tokens, how many of them are
        new, their log-probs (None when no row asked) and their top log-probs as (id, log-prob) pairs."""
        live = [r for r in batch.owner if r is not None]
        want_logprobs = any(r.want_logprobs for r in live)
        top = max((r.top_logprobs_k for r in live if r.want_logprobs), default=0)
        generators = [None if r is None else r.generator for r in batch.owner]
        with self.threads.unit():
            out = batch.step(generators, want_logprobs, top)
        rows, T = out.tokens.shape
        if self.draft_tokens:
            owned = torch.tensor([r is not None for r in batch.owner], device=out.counts.device)
            self.stats.record(out.counts[owned], self.draft_tokens)
        logprobs = out.logprobs.tolist() if want_logprobs else [[None] * T] * rows
        pairs = top_pairs(None if top == 0 else tuple(t.flatten(0, 1) for t in out.top_logprobs), rows * T)
        return out.tokens.tolist(), out.counts.tolist(), logprobs, [pairs[i * T : (i + 1) * T] for i in range(rows)]

    def _admit_isolating_faults(self, batch: Batch, new: list[RequestHandle]) -> None:
        """Admit `new` together; if that raises, admit each by itself, so that only the requests whose own
        admission raises (a prompt that breaks the prefill, one too large for the memory left) fail, with their
        error, and the others are served as if the failing ones had never come."""
        error = self._try_admit(batch, new)
        if error is None:
            return
        if len(new) == 1:
            new[0]._finish("error", error)
            return
        for request in new:
            if request.done:  # finished within the failed admission (max_new_tokens=0)
                continue
            error = self._try_admit(batch, [request])
            if error is not None:
                request._finish("error", error)

    def _try_admit(self, batch: Batch, new: list[RequestHandle]) -> Exception | None:
        """`_admit` into the first free rows; when it raises, those rows are freed again (the running rows were
        never touched: an admission writes only its own rows) and the error is returned."""
        rows = batch.free_rows(len(new))
        try:
            self._admit(batch, new, rows)
        except Exception as error:
            batch.vacate([row for row in rows if row < batch.size])  # rows past the end were never added
            return error
        return None

    def _admit(self, batch: Batch, new: list[RequestHandle], rows: list[int]) -> None:
        """Prefill new requests into free `rows` (continuing their longest cached prefix), score the prompts that
        ask for it, keep the prompts in the prefix cache, and finish the requests that want no new token."""
        prefix = self._current_prefix_cache()
        starts = [0 if prefix is None or r.prompt_logprobs is not None
                  else prefix.load(r.prompt, batch.cache, row, r.adapter) for r, row in zip(new, rows)]
        if self.draft_tokens:  # the MTP layer's last cached slot saw the token after it, which may differ here
            starts = [max(0, start - 1) for start in starts]
        scoring = any(r.prompt_logprobs is not None for r in new)
        hidden = batch.admit([r.prompt for r in new], list(range(len(new))), rows, [r.params for r in new], new,
                             starts, all_hidden=scoring, adapters=[r.adapter for r in new])
        for i, (request, row) in enumerate(zip(new, rows)):
            if prefix is not None:
                prefix.save(request.prompt[:-1], batch.cache, row, request.adapter)
            if request.prompt_logprobs is not None:
                request._score_prompt(hidden[i], self.model.lm_head)
        done = [row for request, row in zip(new, rows) if request.max_new_tokens == 0]
        for row in done:
            batch.owner[row]._finish("length")
        batch.vacate(done)

    def _current_prefix_cache(self) -> PrefixCache | None:
        """The prefix cache, emptied first if the weights changed in place since it was filled."""
        if self.prefix_cache is None:
            return None
        version = sum(t._version for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        if version != self._weights_version:
            self.prefix_cache.clear()
            self._weights_version = version
        return self.prefix_cache

    @staticmethod
    def _emit(request: RequestHandle, token: int, logprob: float | None, top: TopLogprobs) -> bool:
        """Stream one decoded token to its request; True when that finishes the request."""
        try:
            request._emit(token, logprob, top[: request.top_logprobs_k])
        except Exception as error:  # the request's own on_token callback failed
            request._finish("error", error)
            return True
        if token in request.stop:
            request._finish("stop")
        elif len(request.token_ids) == request.max_new_tokens:
            request._finish("length")
        else:
            return False
        return True


def _constrained(params: SamplingParams, spec) -> SamplingParams:
    """params for one row, with its own state of constraint `spec` (None: unconstrained)."""
    return params if spec is None else dataclasses.replace(params, constraint=spec.start())


