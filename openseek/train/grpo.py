"""GRPO and its fixes (Dr. GRPO, DAPO): an objective plus its data, plugged into the one Trainer loop.

Each step: P prompts, G completions each from the Engine (on the very module the trainer updates), rewards,
group advantages, then μ clipped policy-gradient updates against the rollout log-probs. The loss modes, named as
users know them:

    advantage  std : (r - mean) / (std + 1e-4)       GRPO, DAPO
               mean: r - mean                        Dr. GRPO (no difficulty bias)
    loss_type  grpo   : mean over each completion's tokens, then over completions
               dapo   : mean over all tokens of the batch (token-level loss)
               dr_grpo: token sum / (completions × max_new_tokens) (no length bias)

Per token: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) + β·KL, ρ = π/π_rollout, KL the k3 estimator to a frozen reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ADVANTAGES = ("std", "mean")
STD_EPS = 1e-4

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)


# ---------------------------------------------------------------------------------------------------------------
# The objective, as pure functions of tensors (each pinned by a hand-computed test)


def group_advantages(rewards: torch.Tensor, advantage: str = "std") -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: centred on the group mean; divided by the group std for GRPO."""
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if advantage == "mean":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)


def check_group_size(group_size: int, advantage: str) -> None:
    """Refuse group sizes that make every advantage zero or undefined, saying why."""
    if group_size >= 2:
        return
    if advantage == "std":
        raise ValueError(
            f"--group-size {group_size} cannot be used with std-normalised advantages: the standard deviation of "
            "a group of one completion is undefined, so (r - mean) / std gives no learning signal; use "
            "--group-size 2 or more"
        )
    raise ValueError(
        f"--group-size {group_size} gives no learning signal: with one completion per prompt every advantage "
        "r - mean is 0; use --group-size 2 or more"
    )


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max - buffer tokens, then a linear ramp down
    to -factor at max_new_tokens (and -factor beyond). buffer = 0 turns it off."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    if buffer > max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} is longer than max_new_tokens {max_new_tokens}")
    excess = lengths.float() - (max_new_tokens - buffer)
    return -factor * (excess / buffer).clamp(min=0.0, max=1.0)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P] bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps only these)."""
    return (rewards != rewards[:, :1]).any(dim=1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): π_ref/π - log(π_ref/π) - 1 (unbiased, always >= 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def per_token_loss(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-min(ρA, clip(ρ)A) + β·KL per token. Returns (loss [N, L], clipped [N, L] bool, kl [N, L] or None).

    `clipped` marks tokens whose gradient the clip removed: ρ above 1+ε_high with A > 0, or below 1-ε_low with A < 0.
    """
    ratio = torch.exp(logprobs - rollout_logprobs)
    adv = advantages[:, None]
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    clipped = ((ratio > 1 + epsilon_high) & (adv > 0)) | ((ratio < 1 - epsilon_low) & (adv < 0))
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs the reference model's log-probs (ref_logprobs)")
        kl = k3_kl(logprobs, ref_logprobs)
        loss = loss + beta * kl
    return loss, clipped, kl


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """Reduce per-token losses [N, L] over the completion mask [N, L] to a scalar, the way `loss_type` names."""
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (loss.shape[0] * max_new_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(x.dtype)
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def completion_logprobs(model, input_ids, padding_mask, prompt_len: int, temperature: float = 1.0):
    """Log-probs of the completion tokens (columns prompt_len:) under the model at the sampling temperature, and
    the per-token entropy (detached). Rows are [left-padded prompt | right-padded completion]."""
    logits = model(input_ids, padding_mask=padding_mask)[:, prompt_len - 1 : -1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy



# ---------------------------------------------------------------------------------------------------------------
# The objective the Trainer calls: objective(model, batch) -> (loss, metrics)


@dataclass
class GRPOConfig:
    """The knobs of the objective and of its rollouts (flags map onto these one to one)."""

    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 4  # P prompts per rollout batch
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher uses 0.28
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo
    advantage: str = "std"  # std (GRPO, DAPO) | mean (Dr. GRPO)
    updates_per_rollout: int = 1  # μ
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_refill_rounds: int = 4  # extra generation rounds dynamic sampling may spend per step
    overlong_buffer: int = 0  # DAPO soft overlong punishment: ramp length in tokens (0 = off)
    overlong_penalty: float = 1.0
    template: str = "r1_zero"  # r1_zero | chat | none

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        check_group_size(self.group_size, self.advantage)
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout (μ) must be >= 1, got {self.updates_per_rollout}")
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            raise ValueError(f"clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} exceeds max_new_tokens {self.max_new_tokens}")


@dataclass
class RolloutBatch:
    """One rollout batch, laid out for a single forward: rows are [left-padded prompt | right-padded completion]."""

    input_ids: torch.Tensor  # [N, prompt_len + L]
    padding_mask: torch.Tensor  # [N, prompt_len + L] bool, True = real token
    prompt_len: int
    completion_mask: torch.Tensor  # [N, L] bool
    rollout_logprobs: torch.Tensor  # [N, L] log-probs the Engine sampled with
    advantages: torch.Tensor  # [N]
    ref_logprobs: torch.Tensor | None = None  # [N, L] frozen reference (beta > 0)
    metrics: dict[str, float] = field(default_factory=dict)  # rollout-time: rewards, lengths, timings


class GRPOObjective:
    """The clipped, KL-regularised group policy-gradient loss over one rollout batch."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def __call__(self, model, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        mask = batch.completion_mask
        logprobs, entropy = completion_logprobs(
            model, batch.input_ids, batch.padding_mask, batch.prompt_len, cfg.temperature
        )
        # Padded positions get ratio 1 and KL 0, so a huge log-prob there can never turn into inf * 0.
        rollout = torch.where(mask, batch.rollout_logprobs.to(logprobs), logprobs.detach())
        ref = None if batch.ref_logprobs is None else torch.where(mask, batch.ref_logprobs.to(logprobs),
                                                                 logprobs.detach())
        loss_tok, clipped, kl = per_token_loss(
            logprobs, rollout, batch.advantages.to(logprobs), cfg.epsilon_low, cfg.epsilon_high, cfg.beta, ref
        )
        loss = aggregate_loss(loss_tok, mask, cfg.loss_type, cfg.max_new_tokens)
        metrics = dict(batch.metrics)
        metrics["clip_fraction"] = masked_mean(clipped.float(), mask)
        metrics["entropy"] = masked_mean(entropy, mask)
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return loss, metrics
