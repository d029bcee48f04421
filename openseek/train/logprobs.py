"""Per-token log-probs of completions under the model being trained: the head runs over the final hidden states a
chunk of tokens at a time, so no [B, T, V] logits are ever held (GRPO's objective and reference pass)."""

from __future__ import annotations

import torch

from openseek.kernels import ops


LOGPROB_CHUNK = 2**24  # logits per lm_head chunk (64 MiB in float32): tokens per chunk = this / vocabulary
# Below this many logits in a whole pass (256 MiB in float32, about as much again for the log-softmax the backward
# keeps) the chunks' logits are kept for the backward pass instead of recomputed: recomputing cost a GRPO update at
# the benchmark's shape (2,048 tokens × 8,192) a second head matmul, log-softmax and entropy (benchmarks/RESULTS.md).
LOGPROB_RECOMPUTE_ABOVE = 2**26


def completion_logprobs(model, input_ids, padding_mask, prompt_len: int, temperature: float = 1.0,
                        entropy: bool = True):
    """Log-probs of the completion tokens (columns prompt_len:) under the model at the sampling temperature, and
    the per-token entropy (detached; None without `entropy`). Rows are [left-padded prompt | right-padded
    completion]; a batch without padding takes the plain causal path. The head runs over the final hidden states
    a chunk of tokens at a time (`head_logprobs`), so no [B, T, V] logits are ever held."""
    if bool(padding_mask.all()):
        padding_mask = None
    hidden = model.hidden_states(input_ids, padding_mask=padding_mask)[:, prompt_len - 1 : -1]
    return head_logprobs(model.lm_head, hidden, input_ids[:, prompt_len:], temperature, entropy)


def head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   entropy: bool = True, chunk: int | None = None,
                   recompute_above: int = LOGPROB_RECOMPUTE_ABOVE):
    """log softmax(head(hidden) / T) at `targets` ([B, L] from hidden [B, L, H]), and the entropy of each
    distribution, computed `chunk` tokens at a time (default: LOGPROB_CHUNK logits' worth) in float32 (float64
    stays). When the pass has more than `recompute_above` logits, each chunk's logits are recomputed in the backward
    pass instead of being kept (activation checkpointing), so memory holds one chunk's logits at a time."""
    chunk = chunk or max(16, LOGPROB_CHUNK // head.out_features)
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    recompute = torch.is_grad_enabled() and flat.requires_grad and flat.shape[0] * head.out_features > recompute_above
    logprobs, entropies = [], []
    for start in range(0, flat.shape[0], chunk):
        h, t = flat[start : start + chunk], flat_targets[start : start + chunk]
        if recompute:
            logp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, t, temperature, entropy,
                                                          use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(head, h, t, temperature, entropy)
        logprobs.append(logp)
        entropies.append(ent)
    logprobs = torch.cat(logprobs).view(targets.shape)
    return logprobs, torch.cat(entropies).view(targets.shape) if entropy else None


def _chunk_logprobs(head, h: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """One chunk: (log-prob of each target, entropy of each distribution, detached, or None without `entropy`,
    which the reference pass does not need), on our kernel where it runs (ops.token_logprobs)."""
    return ops.token_logprobs(head(h), targets, temperature, entropy)
