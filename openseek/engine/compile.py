"""The decode step's forwards through torch.compile (`Engine(model, compile=True)`, `--compile`), with dynamo's
guards on the model replaced by one guard on a tag of it; and the plain decode step captured as CUDA graphs
(`Engine(model, cuda_graphs=True)`, `--cuda-graphs`). Why and when each pays: docs/engine.md."""

from __future__ import annotations

import functools
import itertools
import weakref

import torch


def mtp_with_logits(model, hidden, next_ids, positions, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP module (depth 0) over the cache, and the draft logits of its outputs: [B, T, H] and [B, T, V], in one
    function so that a compiled engine runs both in one graph."""
    out = model.mtp_hidden(0, hidden, next_ids, positions, cache=cache)
    return out, model.mtp_head(0, out)


def compiled_forwards(model) -> tuple:
    """model.forward and `mtp_with_logits` through torch.compile, bound to `model`.

    Dynamo checks a compiled graph's guards before every call, and on a model it guards every parameter, buffer and
    module attribute, a sizeable share of a small decode step (benchmarks/RESULTS.md, "Round 6 — cheaper guards").
    The compiled functions skip those guards and take instead a tag of this model object as an argument, which
    dynamo guards (one string compare), so each model gets its own graphs. Its weights may change in place (GRPO's
    rollout view); swapping its modules after compiling is not seen."""
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


# Graphs attend over a whole multiple of this many cache slots (the rest masked), so one graph serves a row's next
# GRAPH_LENGTH_STEP tokens: a capture per (rows, length bucket) instead of one per step.
GRAPH_LENGTH_STEP = 256


def check_cuda_graphs(model, speculative: str | None) -> None:
    """A ValueError naming `cuda_graphs` where it cannot run: a model off CUDA, or MTP speculation (whose step reads
    its accepted counts on the host, so it has no static shape)."""
    if model.device.type != "cuda":
        raise ValueError(f"cuda_graphs=True (--cuda-graphs): the model is on {model.device}; CUDA graphs capture "
                         "CUDA work only: load it with device='cuda' (--device cuda) or leave the flag off")
    if speculative:
        raise ValueError(f"cuda_graphs=True (--cuda-graphs) captures the plain decode step only; with "
                         f"speculative={speculative!r} leave it off")


def graph_length(length: int, max_len: int) -> int:
    """The cache slots a graph for a step over `length` slots attends over: the next multiple of
    GRAPH_LENGTH_STEP, at most the cache's `max_len`."""
    return min(-(-length // GRAPH_LENGTH_STEP) * GRAPH_LENGTH_STEP, max_len)


def capture(step, pool):
    """Run `step()` twice on a side stream (so that compilation, cuBLAS's workspace and other first-call work happen
    outside the capture, as CUDA graphs require), then capture one call of it in the memory pool `pool` (None: a new
    one). Returns (the graph, the output tensor its replays overwrite)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class GraphedDecode:
    """The plain decode step over one cache as CUDA graphs, one per (rows, length bucket), captured on first use.

    A graph replays fixed kernels on fixed addresses, so every tensor it reads lives at one place: the cache's
    buffers (which the engine only ever updates in place), and per graph a static token and slot buffer that each
    call copies its inputs into. Inside the graph the cache is set up for the step over `graph_length` slots (the
    mask hides the slots past each row's own), so the graph fits every step until the rows outgrow that bucket.
    `forward` is the engine's decode forward, eager or compiled (compiled kernels are captured as they are).

    Capturing first runs the step twice for real on the static buffers, which hold the call's own tokens and slots:
    those runs write the very keys and values the step writes, so the cache ends as the step leaves it. The graphs
    share one memory pool: a graph's logits are valid until the next replay of any of them, and the engine reads
    them before then (every replay is on the same stream, in order)."""

    def __init__(self, forward, cache):
        self.forward, self.cache = forward, cache
        self.graphs: dict[tuple[int, int], tuple] = {}  # (rows, length) -> (graph, tokens, slots, logits)
        self._pool = None

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [B, V] of tokens [B] at slots [B], each attending over its slots up to its own (all < `length`)."""
        key = (tokens.shape[0], graph_length(length, self.cache.max_len))
        entry = self.graphs.get(key)
        if entry is None:
            static_tokens, static_slots = tokens.clone(), slots.clone()
            graph, logits = capture(functools.partial(self._step, static_tokens, static_slots, key[1]), self._pool)
            self._pool = graph.pool()
            entry = self.graphs[key] = graph, static_tokens, static_slots, logits
        else:
            entry[1].copy_(tokens)
            entry[2].copy_(slots)
        entry[0].replay()
        return entry[3]

    def _step(self, tokens: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
        self.cache.decode(slots, length)
        return self.forward(tokens[:, None], positions=slots[:, None], cache=self.cache)[:, -1]
