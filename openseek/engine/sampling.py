"""Batched choice of the next token: greedy at temperature 0, else temperature, top-k and top-p sampling.

Each row of a batch may have its own parameters (the server mixes requests). Randomness comes only from the
torch.Generator passed in, so a seed reproduces the same samples.

The log-prob returned for a chosen token is under the model's temperature-scaled distribution over the whole
vocabulary — log_softmax(logits / temperature), plain log_softmax at temperature 0 — taken *before* top-k/top-p
filtering. That is the quantity RL compares with the trainer's recomputed log-probs, and what serve returns as
`logprobs` (`chosen_logprobs` scores prompt tokens the same way, so echo and eval agree with generation).

Speculative decoding (`Sampler.draft`, `Sampler.verify`) keeps the output distribution exactly the model's: a draft
token x drawn from the draft distribution q is accepted with probability min(1, p(x)/q(x)), and at the first
rejection the token is drawn from norm(max(0, p − q)) instead (Leviathan et al. 2023; Chen et al. 2023); greedy
rows accept a draft when it is the argmax. p and q are both the row's sampling distribution — temperature, top-k
and top-p applied alike — so what comes out is distributed as non-speculative sampling with those parameters.

A row may carry a constraint (`SamplingParams.constraint`, a per-row state from constraint.py): before each token
the Sampler asks it which tokens may come next and sets the others' logits to -inf (after temperature, before
top-k/top-p, so those pick among the allowed tokens; greedy takes the best allowed one), then tells it the token
chosen. Like top-k/top-p, the mask does not change the log-probs returned. Only batches with a constrained row read
their tokens on the host each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    constraint: object = field(default=None, compare=False)  # the row's RowConstraint state (constraint.py)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside its row's top-k, then outside the smallest head whose probability mass
    (renormalised over the top-k) reaches top_p. top_k [B] (0 = off), top_p [B] (1 = off). The best token stays."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:
    """The per-row parameters of one batch as tensors, built once and reused every step."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.params = params
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.greedy = temperature == 0
        self.divisor = torch.where(self.greedy, 1.0, temperature)[:, None]
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.any_greedy = any(p.temperature == 0 for p in params)
        self.filtering = any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params)
        self.constraints = [p.constraint for p in params]
        self.constrained = any(c is not None for c in self.constraints)

    def select(self, keep: torch.Tensor) -> Sampler:
        """The sampler of the rows `keep` (when finished rows leave the batch)."""
        return Sampler([self.params[i] for i in keep.tolist()], self.divisor.device)

    def __call__(self, logits: torch.Tensor, generator=None, want_logprobs: bool = False, top: int = 0):
        """logits [B, V] -> tokens [B] (long), their log-probs [B] (float32) or None, and the `top` most likely
        (log-probs, ids) [B, top] or None (see `chosen_logprobs`).

        generator: one torch.Generator for the batch, or a list with one per row (None = the global RNG).
        """
        logits = logits.float()
        allowed = self.allowed(logits.shape[-1]) if self.constrained else None
        best = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        if self.all_greedy:
            tokens = best.argmax(dim=-1)
            scaled = logits
        else:
            scaled, probs = self.distribution(logits, allowed)
            tokens = draw(probs, generator)
            if self.any_greedy:
                tokens = torch.where(self.greedy, best.argmax(dim=-1), tokens)
        if self.constrained:
            for constraint, token in zip(self.constraints, tokens.tolist()):
                if constraint is not None:
                    constraint.advance(token)
        if not want_logprobs:
            return tokens, None, None
        return tokens, *chosen_logprobs(scaled, tokens, top)

    def allowed(self, vocab: int) -> torch.Tensor:
        """Bool [B, vocab]: the tokens each row's constraint allows next (all, for a row without one)."""
        allowed = torch.ones(len(self.constraints), vocab, dtype=torch.bool)
        for row, constraint in enumerate(self.constraints):
            mask = None if constraint is None else constraint.allowed()
            if mask is not None:
                allowed[row, : len(mask)] = mask[:vocab]
                allowed[row, len(mask):] = False
        return allowed.to(self.divisor.device)

    def distribution(self, logits: torch.Tensor, allowed: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] or [B, T, V] (float32, T positions of each row) -> the temperature-scaled logits and the
        distribution each row samples from (the `allowed` [B, V] tokens only, then top-k/top-p), both of that
        shape."""
        shape = logits.shape
        scaled = logits.reshape(shape[0], -1, shape[-1]) / self.divisor[:, :, None]
        kept = scaled if allowed is None else scaled.masked_fill(~allowed[:, None], float("-inf"))
        if self.filtering:
            T = scaled.shape[1]
            kept = filter_top_k_top_p(kept.flatten(0, 1), self.top_k.repeat_interleave(T),
                                      self.top_p.repeat_interleave(T)).view_as(scaled)
        return scaled.view(shape), kept.softmax(dim=-1).view(shape)

    def draft(self, logits: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token per row from the draft model's logits [B, V], and the distribution q it was drawn from
        ([B, V]; None when every row is greedy, whose drafts are the argmax and need no q)."""
        logits = logits.float()
        if self.all_greedy:
            return logits.argmax(dim=-1), None
        _, probs = self.distribution(logits)
        tokens = draw(probs, generator)
        if self.any_greedy:
            tokens = torch.where(self.greedy, logits.argmax(dim=-1), tokens)
        return tokens, probs

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None, generator=None,
               want_logprobs: bool = False, top: int = 0):
        """The speculative-sampling acceptance rule. logits [B, k+1, V]: the model's at the fed token and at each of
        the k drafts [B, k] (drawn from draft_probs [B, k, V], see `draft`). Returns tokens [B, k+1] — each row's
        accepted drafts, then the token drawn where it stopped (from the residual after a rejection, from p after
        all k); entries past it are rejected drafts — the count of valid tokens per row [B] (1..k+1), and, as in
        `__call__`, their log-probs [B, k+1] and top log-probs ([B, k+1, top] each) when asked."""
        logits = logits.float()
        B, k = drafts.shape
        rows = torch.arange(B, device=logits.device)
        best = logits.argmax(dim=-1)
        if self.all_greedy:
            scaled, accepted = logits, drafts == best[:, :k]
        else:
            scaled, p = self.distribution(logits)
            p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
            q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]
            accepted = uniform((B, k), generator, logits.device) * q_draft < p_draft  # probability min(1, p/q)
            if self.any_greedy:
                accepted = torch.where(self.greedy[:, None], drafts == best[:, :k], accepted)
        n = accepted.long().cumprod(dim=1).sum(dim=1)  # drafts accepted before the first rejection
        last = best[rows, n]
        if not self.all_greedy:
            at = n.clamp(max=k - 1)
            after_rejection = residual(p[rows, at], draft_probs[rows, at])
            drawn = draw(torch.where((n < k)[:, None], after_rejection, p[rows, n]), generator)
            last = torch.where(self.greedy, last, drawn)
        tokens = torch.cat((drafts, last[:, None]), dim=1).scatter(1, n[:, None], last[:, None])
        if not want_logprobs:
            return tokens, n + 1, None, None
        chosen, top_logprobs = chosen_logprobs(scaled.flatten(0, 1), tokens.flatten(), top)
        if top_logprobs is not None:
            top_logprobs = tuple(t.view(B, k + 1, top) for t in top_logprobs)
        return tokens, n + 1, chosen.view(B, k + 1), top_logprobs


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) per row [B, V]: where a rejected draft's token comes from. (p itself where p ≤ q
    everywhere up to rounding: a rejection is then all but impossible, and p is what it should have kept.)"""
    mass = (p - q).clamp(min=0)
    total = mass.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=torch.finfo(mass.dtype).tiny), p)


def chosen_logprobs(scaled: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """The one log-prob computation: log_softmax of temperature-scaled logits [N, V] (float32), read at tokens [N],
    and the `top` most likely entries as (log-probs [N, top], ids [N, top]), best first (None when top == 0)."""
    logprobs = scaled.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return chosen, (tuple(logprobs.topk(top, dim=-1)) if top else None)


def uniform(shape: tuple[int, int], generator, device) -> torch.Tensor:
    """U[0, 1) draws [B, n], row b from generator[b] when `generator` is a list (as `draw`)."""
    if not isinstance(generator, list):
        return torch.rand(shape, generator=generator, device=device)
    values = torch.rand(shape, device=device)
    for row, g in enumerate(generator):
        if g is not None:
            values[row] = torch.rand(shape[1:], generator=g, device=device)
    return values


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row from probs [B, V] (rows need not sum to 1) by inverse transform sampling: the first token
    whose cumulative probability reaches u · total, u ~ U(0, 1) — one random number per row. `torch.multinomial`
    draws an exponential variate per vocabulary entry instead, which at a large vocabulary costs more than the
    model's forward. Tokens of probability 0 are never drawn: one is first to
    reach u only if its predecessor's cumulative probability, equal to its own, did not (u > 0 is kept above 0,
    and u · total, which may round up to the total, is reached first by the last token of non-zero probability)."""
    cdf = probs.cumsum(dim=-1)
    u = (uniform((probs.shape[0], 1), generator, probs.device) * cdf[:, -1:]).clamp(min=torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, u)[:, 0].clamp(max=probs.shape[-1] - 1)
