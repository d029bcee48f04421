"""The decode step's forwards through torch.compile (`Engine(model, compile=True)`, `--compile`), with dynamo's
guards on the model replaced by one guard on a tag of it. Why and when it pays: docs/engine.md."""

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
