"""The Engine: the only thing in openseek that generates (RL rollouts, eval, chat and serve all call it).

Batch generation (RL, eval):

    engine = Engine(model, max_batch_size=64)
    outs = engine.generate(prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, n=1,
                           stop_token_ids=None, seed=None, logprobs=False, constraint=None)

`prompts` is a list of token-id lists of any lengths. The result has one item per prompt: a list of n
`Completion`s (also when n == 1), which share one prefill of their prompt. `constraint` (one spec, or a list with
one per prompt; see constraint.py) holds each row to the tokens its own state of the spec allows: a grammar (JSON
schema, Lark, regex), a thinking budget, or both (`Thinking(end_ids, budget, then=grammar)`); it is not available
with speculative decoding. `Completion.token_ids` are the new tokens only, ending with the stop token when `finish_reason == "stop"`; `.logprobs` (when asked) are
log_softmax(logits / temperature) of each chosen token over the full vocabulary, before top-k/top-p (plain
log_softmax at temperature 0); see sampling.py. `stop_token_ids=None` means the model's EOS ids
(`model.cfg.eos_token_id`); `[]` never stops early. Temperature 0 is greedy; a seed makes sampling reproducible.

Streaming with continuous batching (serve, chat):

    request = engine.submit(prompt, max_new_tokens, temperature=..., top_p=..., top_k=..., stop_token_ids=None,
                            seed=None, logprobs=False, top_logprobs=0, prompt_logprobs=False, on_token=callback,
                            constraint=None)
    async for token_id in request: ...      # tokens as they come (or `on_token(token_id)`, on the engine thread)
    completion = await request              # or request.result(timeout) from a thread
    request.cancel()                        # leaves the batch at the next step; finish_reason "cancelled"

With `logprobs`, each new token's log-prob arrives with it (`request.logprobs[i]`, `request.top_logprobs[i]`: the
`top_logprobs` most likely (id, log-prob) pairs, best first). `prompt_logprobs` scores the prompt in its prefill
forward: `request.prompt_logprobs` is None for the first token, then each token's log-prob given those before it
(`prompt_top_logprobs` likewise); `max_new_tokens=0` then scores the prompt alone. Log-probs are defined as in
generation (sampling.py), at the request's temperature.

A background thread (started on the first submit; `engine.close()` stops it) keeps one running batch of up to
`max_batch_size` rows: each step it admits waiting requests into free rows (prefilling them), decodes one token
for every row, streams the tokens and retires finished or cancelled requests. Rows hold up to `max_seq_len`
tokens (prompt + new; default min(context, 4096), so a long-context model does not preallocate its whole context).
`engine.running` is how many requests hold a row after the last step.

Faults stay with the requests they hit: finish_reason "error", and awaiting them raises the error. A request whose
admission raises (its prefill, its prefix-cache copy, scoring its prompt; or a raising `on_token`) fails alone: when
requests admitted together fail, each is admitted again by itself, so only those that fail by themselves get the
error and the running rows never see it. Any other error in a step fails that step's unfinished requests, and the
thread goes on with a fresh batch. Should the thread itself stop on an error (one raised outside a step, or one that
is no `Exception`), `engine.failure` holds it, every waiting or running request fails with it and `submit` raises
RuntimeError from then on: no request ever waits on a thread that is gone.

Prefix caching (prefix.py, serving thread only): each prompt's cache rows are kept when it is prefilled, and prompt +
answer when it finishes, up to `prefix_cache_tokens` tokens (least recently used dropped first; 0 turns it off).
A later request copies the longest cached prefix of its prompt into its row and prefills only the rest; requests
scoring their prompt (`prompt_logprobs`) prefill all of it. The cache is emptied when the weights change in place
(optimizer steps, load_state_dict). `engine.prefix_cache` holds its counters (`queried_tokens`, `hit_tokens`).

Bad input (empty prompt, token id outside the vocabulary, prompt + max_new_tokens beyond the model's context,
n < 1, top_p outside (0, 1], ...) raises ValueError naming the culprit; nothing is ever truncated silently.

How it decodes: caches are preallocated (cache.py), a prompt's tokens but the last are prefilled with the
ordinary (naive MLA) forward, then every step feeds one token per row at its own position; MLA decodes with the
absorbed weights over the latent cache; so does a prompt continuing a cached prefix, over the stored tokens and
its own. `generate` and the serving thread run the same batch of rows (`_Batch`:
admit = prefill, step = the one decode step, row compaction): `generate` admits its rows (up to `max_batch_size`
at a time) and steps until every row stops, its tokens staying on the device except every FINISH_CHECK_EVERY
steps, when it looks for finished rows and drops them; the serving thread admits requests into free rows as they
come and reads every step's tokens to stream them. The engine works on the very module the trainer updates (no
copy) and never changes its weights. `engine.kv_bytes_per_token` is the cache cost of one token. Decode's attention
over the cache is written out in float32 (attention.py: faster than SDPA for a few queries on the CPU, and the same
result on any thread count); CUDA graphs for decode are not implemented yet.

`Engine(model, compile=True)` (`--compile` on the commands) runs the decode step's forwards (the plain step; with
speculation the verify forward with its logits, and the MTP module with its draft logits) through `torch.compile`
with dynamic shapes: on the CPU, inductor fuses the step's ~1,000 small ops (norms, RoPE, residuals, dtype casts,
MoE routing) into a few dozen C++ loops around our matmul kernels (which are operators for this, openseek/kernels).
Batch 1 and larger batches compile once each (about 30–120 s for a Qwen2.5-0.5B, less on later runs, which reuse
inductor's on-disk cache); prefill stays eager. Outputs are those of the eager step: bf16 roundings are kept where
eager makes them (`emulate_precision_casts`, set for the whole process). Measured in benchmarks/RESULTS.md: it pays
where those small ops are a large part of a step (int8 and int4 weights, MoE, small models), not where the matmuls
already stream the weights at the memory bandwidth (float32 and bf16 at batch 1).

Speculative decoding with the model's own MTP module (`Engine(model, speculative="mtp", num_speculative_tokens=k)`,
DeepSeek-V3's multi-token prediction as a draft, as vLLM and SGLang run it): the decode step becomes draft, verify,
accept. The MTP module drafts k tokens per row — the first from the main model's last hidden state and the embedding
of the token just produced, each further one by applying the module again to its own output and its last draft — the
main model scores the fed token and the k drafts in one forward over the cache, and the speculative-sampling rule
(sampling.py) accepts a prefix of the drafts and draws one more token, so each row gains 1..k+1 tokens per step and
its output is distributed exactly as without speculation (greedy: identical). Then the MTP module runs over the same
positions with the accepted tokens, filling its own cache layer (it attends over the whole sequence, as in training)
and leaving each row's state (and the draft logits it gives) for the next drafts; a prompt's prefill runs it over
the prompt. Rejected positions need
no rollback: a row's slot advances only past what it accepted, and the next step overwrites the rest. It is the same
`_Batch.step` under `generate` and the serving thread; the step reads the accepted counts on the host (one small
copy per step, which costs nothing on the CPU). `engine.stats` counts drafted and accepted tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import threading
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from openseek.engine.cache import kv_bytes_per_token, make_cache
from openseek.engine.prefix import PrefixCache
from openseek.engine.sampling import Sampler, SamplingParams, token_logprobs
from openseek.threads import AdaptiveThreads

FINISH_CHECK_EVERY = 8  # decode steps between host checks for finished rows in `generate`


def mtp_with_logits(model, hidden, next_ids, positions, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP module (depth 0) over the cache, and the draft logits of its outputs: [B, T, H] and [B, T, V], in one
    function so that a compiled engine runs both in one graph."""
    out = model.mtp_hidden(0, hidden, next_ids, positions, cache=cache)
    return out, model.mtp_head(0, out)


def compiled_forwards(model) -> tuple:
    """model.forward and `mtp_with_logits` through torch.compile, bound to `model`.

    Dynamo checks a compiled graph's guards before every call, and on a model it guards every parameter, buffer and
    module attribute: about 1.2 ms per decode step on a 24-layer model, a tenth of the step at int4. The compiled
    functions skip those guards and take instead a tag of this model object as an argument, which dynamo guards
    (one string compare), so each model gets its own graphs. Its weights may change in place (GRPO's rollout view);
    swapping its modules after compiling is not seen."""
    tag = _model_tags.get(model)
    if tag is None:  # kept beside the model, not on it: a deep copy of the model is another model
        tag = _model_tags[model] = f"model-{next(_tag_numbers)}"
    return tuple(functools.partial(fn, model, tag) for fn in _compiled_model_functions())


_model_tags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tag_numbers = itertools.count()


def _forward(model, tag, *args, **kwargs):
    _guard_on(tag)
    return model(*args, **kwargs)


def _mtp_with_logits(model, tag, *args):
    _guard_on(tag)
    return mtp_with_logits(model, *args)


def _guard_on(tag: str) -> None:
    """Read the tag's value, so that dynamo guards it (it guards only what the traced code reads)."""
    if not tag.startswith("model-"):
        raise ValueError(f"not a model tag: {tag!r}")


def _skip_guards_on_the_model(guards) -> list[bool]:
    """Keep every guard but those on `model` and what hangs from it (the tag stands for them)."""
    return [not (guard.name == "model" or guard.name.startswith(("model.", "model["))) for guard in guards]


@functools.cache
def _compiled_model_functions() -> tuple:
    """`_forward` and `_mtp_with_logits` through torch.compile, made once per process (dynamo keeps the graphs on
    the functions' code, with guards; it gives up compiling a function after `recompile_limit` graphs)."""
    # fused kernels keep bf16 intermediates rounded as eager rounds them, so the outputs do not change
    torch._inductor.config.emulate_precision_casts = True
    # graphs per function: batch 1 and any batch, one token and several, for each model in the process (tests)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    options = {"guard_filter_fn": _skip_guards_on_the_model}
    return tuple(torch.compile(fn, dynamic=True, options=options) for fn in (_forward, _mtp_with_logits))


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


TopLogprobs = list[tuple[int, float]]  # (token id, log-prob) of the most likely tokens at one position, best first


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"; "cancelled" for a cancelled request, "error" for one a fault ended
    top_logprobs: list[TopLogprobs] | None = None  # per new token (streaming requests with logprobs)
    prompt_logprobs: list[float | None] | None = None  # per prompt token, None first (with prompt_logprobs)
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


@dataclass
class SpeculationStats:
    """Speculative decoding so far: row-steps verified (each drafts k tokens and gains its accepted drafts plus one
    token of the main model), draft tokens verified and, of those, accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a row gains per step: 1 + accepted drafts (k + 1 at most)."""
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0

    def record(self, counts: torch.Tensor, drafts: int) -> None:
        """counts [rows]: the tokens each live row gained in one step."""
        rows, gained = len(counts), int(counts.sum())
        self.steps, self.drafted, self.accepted = self.steps + rows, self.drafted + drafts * rows, \
            self.accepted + gained - rows


@dataclass
class _Decoded:
    """What one decode step gives each of its rows, on the device: tokens [rows, T] (T = 1, or k + 1 when
    speculating) of which the first counts[row] are new (the rest are rejected drafts), their log-probs [rows, T]
    and top log-probs (values, ids) [rows, T, top] when asked (else None)."""

    tokens: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


# Prompt positions scored at once: their float32 logits, [256, V], are 156 MB at a 152k vocabulary.
PROMPT_SCORE_CHUNK = 256


def _pairs(top, rows: int) -> list[TopLogprobs]:
    """(log-probs [N, k], ids [N, k]) from `token_logprobs` as one list of (id, log-prob) pairs per row."""
    if top is None:
        return [[] for _ in range(rows)]
    values, ids = top
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class Engine:
    def __init__(self, model, max_batch_size: int = 64, max_seq_len: int | None = None,
                 prefix_cache_tokens: int | None = None, threads: int | None = None, speculative: str | None = None,
                 num_speculative_tokens: int = 1, compile: bool = False):
        """prefix_cache_tokens: tokens the serving thread's prefix cache holds at most (default 4 × max_seq_len;
        0 = no prefix caching). threads: CPU intra-op threads for decoding; None measures the decode steps at each
        count and keeps the fastest as the machine's load changes (openseek/threads.py). speculative="mtp": draft
        `num_speculative_tokens` tokens per step with the model's MTP module (see the module docstring).
        compile: run the decode step's forwards through torch.compile (see the module docstring)."""
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
        self.draft_tokens = k if speculative else 0  # k drafted per step; 0 = no speculation
        self.stats = SpeculationStats()
        self.model, self.cfg = model, model.cfg
        self.compiles = compile
        self.decode_forward, self.mtp_forward = (
            compiled_forwards(model) if compile else (model.forward, functools.partial(mtp_with_logits, model)))
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(self.cfg.max_position_embeddings, max_seq_len or 4096)
        capacity = 4 * self.max_seq_len if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefix_cache = PrefixCache(capacity) if capacity > 0 else None
        self._weights_version = None  # of the weights the prefix cache was filled with
        self.threads = AdaptiveThreads(fixed=threads, window=8, hold=16)
        self._model_lock = threading.Lock()  # one forward at a time (generate and the serving loop share the model)
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running = 0  # requests holding a row of the serving batch, after the last step
        self.failure: BaseException | None = None  # what stopped the serving thread, if an error did

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
        """Per prompt, a list of `n` Completions (also when n == 1) sharing one prefill; see the module docstring.
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
        batch = _Batch(self, R, max(len(prompts[i]) for i in src) + max_new_tokens + T - 1)
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
    ) -> Request:
        """Queue one request into the running batch; returns its handle at once (see the module docstring)."""
        if not (prompt_logprobs and max_new_tokens == 0):
            self._check_max_new(max_new_tokens)
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        if top_logprobs > self.cfg.vocab_size:
            raise ValueError(f"top_logprobs={top_logprobs} is more than the vocabulary ({self.cfg.vocab_size})")
        params = _constrained(SamplingParams(temperature, top_p, top_k), self._constraint_specs(constraint, 1)[0])
        prompt = self._check_prompt(prompt, max_new_tokens, self.max_seq_len)
        generator = None if seed is None else torch.Generator(self.model.device).manual_seed(seed)
        request = Request(prompt, max_new_tokens, params, self._stop_ids(stop_token_ids), generator, logprobs,
                          top_logprobs, prompt_logprobs, on_token)
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
        """The serving thread: one running batch whose rows are requests (`_Batch.owner`), advanced by one
        `_serve_step` at a time. A step that raises fails its own requests and the loop goes on with a fresh batch;
        an error that ends the loop is kept in `failure` and fails every request left (see the module docstring)."""
        batch: _Batch | None = None  # made on first use; dropped when a step fails
        new: list[Request] = []
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

    def _take_waiting(self, running: list[Request]) -> list[Request] | None:
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

    def _serve_step(self, batch: _Batch | None, new: list[Request]) -> _Batch:
        """Admit `new` into free rows of `batch` (made here on first use), retire the cancelled requests, decode one
        step for every row, stream its tokens, and keep each finished sequence in the prefix cache and free its row.
        Returns the batch."""
        with self._model_lock, torch.inference_mode():
            if batch is None:
                # a row's last step may write k draft slots past max_seq_len
                batch = _Batch(self, self.max_batch_size, self.max_seq_len + self.draft_tokens)
            if new:
                self._admit_isolating_faults(batch, new)
            cancelled = [i for i, r in enumerate(batch.owner) if r is not None and r.cancelled]
            for i in cancelled:
                batch.owner[i]._finish("cancelled")
            batch.vacate(cancelled)
            if not batch.size:
                return batch
            live = [r for r in batch.owner if r is not None]
            want_logprobs = any(r.want_logprobs for r in live)
            top = max((r.top_logprobs_k for r in live if r.want_logprobs), default=0)
            generators = [None if r is None else r.generator for r in batch.owner]
            with self.threads.unit():
                out = batch.step(generators, want_logprobs, top)
            rows, T = out.tokens.shape
            if self.draft_tokens:
                live = torch.tensor([r is not None for r in batch.owner], device=out.counts.device)
                self.stats.record(out.counts[live], self.draft_tokens)
            chosen, counts = out.tokens.tolist(), out.counts.tolist()
            logprobs = out.logprobs.tolist() if want_logprobs else [[None] * T] * rows
            pairs = _pairs(None if top == 0 else tuple(t.flatten(0, 1) for t in out.top_logprobs), rows * T)
            top_logprobs = [pairs[i * T : (i + 1) * T] for i in range(rows)]
        finished = [i for i, r in enumerate(batch.owner) if r is not None and any(
            self._emit(r, chosen[i][j], logprobs[i][j], top_logprobs[i][j]) for j in range(counts[i]))]
        for i in finished:
            request = batch.owner[i]
            if self.prefix_cache is not None and request.finish_reason in ("stop", "length"):
                # the row holds the prompt and every new token but the last (never fed)
                self.prefix_cache.save(request.prompt + request.token_ids[:-1], batch.cache, i)
        batch.vacate(finished)
        return batch

    def _admit_isolating_faults(self, batch: _Batch, new: list[Request]) -> None:
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

    def _try_admit(self, batch: _Batch, new: list[Request]) -> Exception | None:
        """`_admit` into the first free rows; when it raises, those rows are freed again (the running rows were
        never touched: an admission writes only its own rows) and the error is returned."""
        rows = batch.free_rows(len(new))
        try:
            self._admit(batch, new, rows)
        except Exception as error:
            batch.vacate([row for row in rows if row < batch.size])  # rows past the end were never added
            return error
        return None

    def _admit(self, batch: _Batch, new: list[Request], rows: list[int]) -> None:
        """Prefill new requests into free `rows` (continuing their longest cached prefix), score the prompts that
        ask for it, keep the prompts in the prefix cache, and finish the requests that want no new token."""
        prefix = self._current_prefix_cache()
        starts = [0 if prefix is None or r.prompt_logprobs is not None else prefix.load(r.prompt, batch.cache, row)
                  for r, row in zip(new, rows)]
        if self.draft_tokens:  # the MTP layer's last cached slot saw the token after it, which may differ here
            starts = [max(0, start - 1) for start in starts]
        scoring = any(r.prompt_logprobs is not None for r in new)
        hidden = batch.admit([r.prompt for r in new], list(range(len(new))), rows, [r.params for r in new], new,
                             starts, all_hidden=scoring)
        for i, (request, row) in enumerate(zip(new, rows)):
            if prefix is not None:
                prefix.save(request.prompt[:-1], batch.cache, row)
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
    def _emit(request: Request, token: int, logprob: float | None, top: TopLogprobs) -> bool:
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


_FREE = SamplingParams(0.0)  # the parameters of a free row (its tokens are never used)


def _constrained(params: SamplingParams, spec) -> SamplingParams:
    """params for one row, with its own state of constraint `spec` (None: unconstrained)."""
    return params if spec is None else dataclasses.replace(params, constraint=spec.start())


class _Batch:
    """Rows [0, size) of one preallocated cache, decoded together: batch `generate` and the serving thread both
    run on it. `admit` prefills prompts into rows, `step` is the decode step (one new token for every row),
    `keep` compacts the rows (finished ones leave; `generate`), `vacate` frees rows for later admissions (serve).

    Per row: its owner (None = a free row), its sampling parameters, the token it feeds next and that token's
    position (device tensors `tokens`, `slots`: a step needs no host sync; `positions` is the host copy). A
    token's slot is its position (cache.py). Free rows decode a dummy token at slot 0 and do not advance; free
    rows at the end are dropped, so `size` is 0 when no row is owned. When speculating (k = `draft_tokens` > 0),
    each row also carries `mtp_state` [1, H]: the MTP module's output at the position before its token, which the
    next step drafts from (zeros for a one-token prompt: its first draft is a guess, which changes no output).
    """

    def __init__(self, engine: Engine, capacity: int, max_len: int):
        self.model, self.device = engine.model, engine.model.device
        self.decode_forward, self.mtp_forward = engine.decode_forward, engine.mtp_forward
        self.draft_tokens = engine.draft_tokens
        self.cache = make_cache(engine.cfg, capacity, max_len, self.model.dtype, self.device,
                                mtp_layers=1 if self.draft_tokens else 0)
        self.cache.compiled = engine.compiles
        self.mtp_state = torch.zeros(0, 1, engine.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        self.owner: list = []
        self.params: list[SamplingParams] = []
        self.positions: list[int] = []
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)
        self._sampler: Sampler | None = None  # built from `params` when the rows change
        # when speculating, the next step's first draft logits [size, V] (from `mtp_state`), made by the last step's
        # MTP pass; None after the rows change, when the step makes them itself
        self._draft_logits: torch.Tensor | None = None
        self._advance = 1  # how far each row's slot moves per step: 1, or 0 for free rows ([size] tensor)
        self._vacated = False  # rows were freed since the device tensors were last brought up to date

    @property
    def size(self) -> int:
        return len(self.owner)

    def free_rows(self, count: int) -> list[int]:
        """The first `count` rows free for admission (holes first, then rows past the end)."""
        free = [i for i, o in enumerate(self.owner) if o is None]
        return (free + list(range(self.size, self.cache.rows)))[:count]

    def admit(self, prompts: list[list[int]], src: list[int], rows: list[int], params, owners,
              starts: list[int] | None = None, all_hidden: bool = False) -> list[torch.Tensor] | None:
        """Row rows[i] starts prompts[src[i]] for owners[i] with params[i]. One prefill per prompt (n samples of a
        prompt are n rows with the same src) stores each prompt but its last token; the first step feeds that.
        starts[i] (default 0): tokens of the prompt already in row rows[i] (a cached prefix); only the rest is
        prefilled. With `all_hidden`, returns per row the prefill's final hidden states [len(prompt) - 1 - starts[i],
        H]: those of positions starts[i].. (each predicts the token after it), for scoring the prompt. Hidden states,
        not logits: [T, V] float32 logits for every admitted prompt would be rows × length × vocabulary (tens of GB
        for 30 long prompts at V = 152k); the scorer applies the head a chunk at a time to the rows that asked."""
        self._update()
        grow = max(rows) + 1 - self.size
        if grow > 0:
            self.owner += [None] * grow
            self.params += [_FREE] * grow
            self.positions += [0] * grow
            zeros = torch.zeros(grow, dtype=torch.long, device=self.device)
            self.tokens, self.slots = torch.cat((self.tokens, zeros)), torch.cat((self.slots, zeros))
            self.mtp_state = torch.cat((self.mtp_state, self.mtp_state.new_zeros(grow, *self.mtp_state.shape[1:])))
        index = torch.tensor(rows, device=self.device)
        starts = starts or [0] * len(rows)
        hidden = [None] * len(rows)
        fresh = [i for i, start in enumerate(starts) if start == 0]
        if fresh:
            used = sorted({src[i] for i in fresh})
            out = self._prefill([prompts[p] for p in used], torch.tensor([used.index(src[i]) for i in fresh],
                                device=self.device), index[fresh], all_hidden)
            for i in fresh if all_hidden else ():
                hidden[i] = out[used.index(src[i]), : len(prompts[src[i]]) - 1]
        continuing = [i for i, start in enumerate(starts) if start > 0]
        if continuing:
            out = self._extend([prompts[src[i]] for i in continuing], [starts[i] for i in continuing],
                               index[continuing], all_hidden)
            for j, i in enumerate(continuing if all_hidden else ()):
                hidden[i] = out[j, : len(prompts[src[i]]) - 1 - starts[i]]
        last = torch.tensor([prompts[s][-1] for s in src], device=self.device)
        position = [len(prompts[s]) - 1 for s in src]
        self.tokens = self.tokens.index_copy(0, index, last)
        self.slots = self.slots.index_copy(0, index, torch.tensor(position, device=self.device))
        for row, owner, p, pos in zip(rows, owners, params, position):
            self.owner[row], self.params[row], self.positions[row] = owner, p, pos
        self._sampler = None
        self._draft_logits = None
        return hidden if all_hidden else None

    def _prefill(self, prompts: list[list[int]], src: torch.Tensor, dest: torch.Tensor, all_hidden: bool):
        """Store each prompt but its last token into its cache rows: prompts[src[i]] goes to cache row dest[i].
        Prompts are right-padded, so each starts at slot/position 0. Returns the final hidden states [P, T, H] with
        `all_hidden`, else None."""
        heads = [p[:-1] for p in prompts]
        T = max(len(h) for h in heads)
        if T == 0:
            self._set_mtp_state(dest, None, src, [])
            return torch.zeros(len(prompts), 0, self.model.cfg.hidden_size, device=self.device)
        ids = torch.zeros(len(heads), T + 1, dtype=torch.long)  # the prompt; column t + 1 is the token after t
        real = torch.zeros(len(heads), T, dtype=torch.bool)
        for i, (p, h) in enumerate(zip(prompts, heads)):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            real[i, : len(h)] = True
        self.cache.prefill(src, dest)
        padding = None if bool(real.all()) else real.to(self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0).to(self.device)  # pads repeat the last position
        return self._forward(ids.to(self.device), positions, padding, all_hidden, dest, src,
                             [len(h) - 1 for h in heads])

    def _extend(self, prompts: list[list[int]], starts: list[int], dest: torch.Tensor, all_hidden: bool):
        """Store prompts[i][starts[i]:-1] into cache row dest[i], which holds the prompt's first starts[i] tokens
        already: each token attends to those and to the ones before it. Rows are right-padded; a pad goes to the
        slot of its prompt's last token, which the first decode step overwrites. Returns the final hidden states
        [P, T, H] with `all_hidden`, else None."""
        T = max(len(p) - 1 - start for p, start in zip(prompts, starts))
        if T == 0:
            return torch.zeros(len(prompts), 0, self.model.cfg.hidden_size, device=self.device)
        ids = torch.zeros(len(prompts), T + 1, dtype=torch.long)  # column t + 1 is the token after t
        slots = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, (p, start) in enumerate(zip(prompts, starts)):
            ids[i, : len(p) - start] = torch.tensor(p[start:], dtype=torch.long)
            slots[i] = (torch.arange(start, start + T)).clamp(max=len(p) - 1)
        slots = slots.to(self.device)
        self.cache.decode(slots, length=int(slots.max()) + 1, rows=dest)
        rows = torch.arange(len(prompts), device=self.device)
        return self._forward(ids.to(self.device), slots, None, all_hidden, dest, rows,
                             [len(p) - 2 - start for p, start in zip(prompts, starts)])

    def _forward(self, ids, positions, padding_mask, all_hidden: bool, dest, src, last: list[int]):
        """The prefill forward over the cache of ids[:, :-1] (at `positions`), without the head: generation reads no
        prefill logits (the first decode step feeds the prompt's last token). Returns the final hidden states
        [P, T, H] with `all_hidden`, else None. When speculating, the MTP module then runs over the same
        positions, each seeing the token after it (ids[:, 1:]), which fills its cache layer, and its output at
        index last[src[i]] becomes the state of cache row dest[i] (the position before the prompt's last token)."""
        last_only = not (all_hidden or self.draft_tokens)
        hidden = self.model.hidden_states(ids[:, :-1], positions, padding_mask, self.cache, last_only)
        if self.draft_tokens:
            mtp = self.model.mtp_hidden(0, hidden, ids[:, 1:], positions, padding_mask, self.cache)
            self._set_mtp_state(dest, mtp, src, last)
        return hidden if all_hidden else None

    def _set_mtp_state(self, dest: torch.Tensor, mtp: torch.Tensor | None, src, last: list[int]) -> None:
        """Row dest[i] drafts next from mtp[src[i], last[src[i]]] (zeros where that index is -1: no state)."""
        if not self.draft_tokens:
            return
        state = torch.zeros(len(dest), 1, self.mtp_state.shape[-1], dtype=self.mtp_state.dtype, device=self.device)
        for i, j in enumerate(src.tolist()):
            if mtp is not None and last[j] >= 0:
                state[i, 0] = mtp[j, last[j]]
        self.mtp_state = self.mtp_state.index_copy(0, dest, state)

    def step(self, generator=None, want_logprobs: bool = False, top: int = 0) -> _Decoded:
        """The decode step: every row feeds its token at its position and samples the next one with its own
        parameters — or, when speculating, feeds its token and k drafts and keeps the accepted ones and one more.
        Returns per row its new tokens (1, or 1..k+1), their log-probs (float32, when asked) and the `top` most
        likely (log-probs, ids) (when asked), all on the device; without speculation, no host sync. generator: one
        torch.Generator for the whole batch, or a list with one per row (None = the global RNG)."""
        self._update()
        if self._sampler is None:
            self._sampler = Sampler(self.params, self.device)
            live = [o is not None for o in self.owner]
            self._advance = 1 if all(live) else torch.tensor(live, dtype=torch.long, device=self.device)
        if self.draft_tokens:
            return self._speculate(generator, want_logprobs, top)
        self.cache.decode(self.slots, length=max(self.positions) + 1)
        logits = self.decode_forward(self.tokens[:, None], positions=self.slots[:, None], cache=self.cache)[:, -1]
        tokens, logprobs, top_logprobs = self._sampler(logits, generator, want_logprobs, top)
        self.tokens, self.slots = tokens, self.slots + self._advance
        self.positions = [p + (o is not None) for p, o in zip(self.positions, self.owner)]
        unsqueeze = lambda t: None if t is None else t[:, None]  # noqa: E731
        return _Decoded(tokens[:, None], torch.ones_like(tokens), unsqueeze(logprobs),
                        None if top_logprobs is None else tuple(map(unsqueeze, top_logprobs)))

    def _speculate(self, generator, want_logprobs: bool, top: int) -> _Decoded:
        """The decode step with MTP speculation (see the module docstring): draft k tokens per row, verify them in
        one forward of the main model, accept, and run the MTP module over the accepted positions."""
        k, model, cache = self.draft_tokens, self.model, self.cache
        length = max(self.positions) + 1
        drafts, draft_probs, state = [], [], self.mtp_state
        draft_logits = self._draft_logits if self._draft_logits is not None else model.mtp_head(0, state)[:, -1]
        for j in range(k):  # draft j + 1 continues from draft j, at the next position
            if j:
                cache.decode(self.slots + j - 1, length=length + j - 1)
                state, draft_logits = self.mtp_forward(state, drafts[-1][:, None], (self.slots + j - 1)[:, None],
                                                       cache)
                draft_logits = draft_logits[:, -1]
            token, probs = self._sampler.draft(draft_logits, generator)
            drafts.append(token)
            draft_probs.append(probs)
        drafts = torch.stack(drafts, dim=1)
        slots = self.slots[:, None] + torch.arange(k + 1, device=self.device)
        cache.decode(slots, length=length + k)
        logits, hidden = self.decode_forward(torch.cat((self.tokens[:, None], drafts), dim=1), positions=slots,
                                             cache=cache, all_logits=True, return_hidden=True)
        tokens, counts, logprobs, top_logprobs = self._sampler.verify(
            logits, drafts, None if draft_probs[0] is None else torch.stack(draft_probs, dim=1),
            generator, want_logprobs, top)
        # the MTP module at each verified position, with the token after it, and its draft logits; only the accepted
        # ones are kept (a row's later slots, in its layers and the main model's, are overwritten by its next step)
        mtp, mtp_logits = self.mtp_forward(hidden, tokens, slots, cache)
        last = (counts - 1)[:, None]
        self.mtp_state = mtp.gather(1, last[:, :, None].expand(-1, 1, mtp.shape[-1]))
        self._draft_logits = mtp_logits.gather(1, last[:, :, None].expand(-1, 1, mtp_logits.shape[-1]))[:, 0]
        self.tokens = tokens.gather(1, last)[:, 0]
        # a row that finished in `generate` but is still in the batch stops at the cache's end
        end = cache.max_len - 1 - k
        self.slots = (self.slots + counts * self._advance).clamp(max=end)
        self.positions = [min(p + c, end) if o is not None else p
                          for p, c, o in zip(self.positions, counts.tolist(), self.owner)]
        return _Decoded(tokens, counts, logprobs, top_logprobs)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows` (device, long), moved to the front in that order: the others leave the batch."""
        self._update()
        self.cache.select_rows(rows)
        self.tokens, self.slots, self.mtp_state = self.tokens[rows], self.slots[rows], self.mtp_state[rows]
        order = rows.tolist()
        self.owner = [self.owner[i] for i in order]
        self.params = [self.params[i] for i in order]
        self.positions = [self.positions[i] for i in order]
        self._sampler = None
        self._draft_logits = None

    def vacate(self, rows: list[int]) -> None:
        """Free `rows` for later admissions. Host bookkeeping only (no device work, so no model lock needed): the
        device tensors follow at the next admit or step."""
        for i in rows:
            self.owner[i], self.params[i], self.positions[i] = None, _FREE, 0
        while self.owner and self.owner[-1] is None:
            self.owner.pop(), self.params.pop(), self.positions.pop()
        self._vacated = self._vacated or bool(rows)

    def _update(self) -> None:
        """Bring the device tensors in line with `vacate`: drop the free rows at the end, park the others at 0."""
        if not self._vacated:
            return
        self._vacated, self._sampler, self._draft_logits = False, None, None
        self.tokens, self.slots = self.tokens[: self.size], self.slots[: self.size]
        self.mtp_state = self.mtp_state[: self.size]
        free = [i for i, o in enumerate(self.owner) if o is None]
        if free:
            index = torch.tensor(free, device=self.device)
            self.tokens, self.slots = self.tokens.index_fill(0, index, 0), self.slots.index_fill(0, index, 0)


class Request:
    """Handle of one streaming request: iterate (async) over its tokens, await its Completion, or cancel it."""

    def __init__(self, prompt, max_new_tokens, params, stop, generator, want_logprobs, top_logprobs,
                 prompt_logprobs, on_token):
        self.prompt, self.max_new_tokens, self.params = prompt, max_new_tokens, params
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
            chunk_chosen, chunk_top = token_logprobs(logits, targets[start:end], self.top_logprobs_k)
            chosen += chunk_chosen.tolist()
            top += _pairs(chunk_top, len(chunk_chosen))
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
