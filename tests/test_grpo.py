"""The GRPO objective pinned by hand: advantages, every loss mode, clipping, k3 KL, overlong shaping, and the
gradient identity with the policy-gradient formula (μ = 1, β = 0)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_grpo import tiny_fp64_model as tiny_model
from openseek.train.grpo import (
    GRPOConfig,
    GRPOObjective,
    check_group_size,
    k3_kl,
    loss_sum,
    loss_units,
    per_token_loss,
)
from openseek.train.rollout import RolloutBatch, group_advantages, informative_groups, overlong_penalty, refill_size

def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """Per-token losses [N, L] over the completion mask reduced to a scalar the way `loss_type` names: the objective's
    `loss_sum` over one batch's own `loss_units`."""
    return loss_sum(loss, mask, loss_type) / max(loss_units(mask, loss_type, max_new_tokens), 1.0)


# A fixed example: P = 2 prompts, G = 2 completions each, up to L = 3 tokens.
REWARDS = [[1.0, 0.0], [2.0, 0.5]]
LENGTHS = [3, 1, 2, 3]
# The ratio π/π_rollout each token is built to have (rows 0, 2 have A > 0; rows 1, 3 have A < 0).
RATIOS = [[1.0, 1.5, 0.9], [0.5, 1.0, 1.0], [1.2, 0.7, 1.0], [1.0, 1.3, 2.0]]
LOGPROBS = [[-0.5, -1.0, -2.0], [-0.3, -9.0, -9.0], [-1.5, -0.2, -9.0], [-0.7, -0.9, -1.1]]
REF_LOGPROBS = [[-0.6, -0.8, -2.5], [-0.1, 0.0, 0.0], [-1.0, -0.4, 0.0], [-0.7, -1.2, -0.6]]
EPS_LOW, EPS_HIGH, BETA, L_MAX = 0.2, 0.28, 0.04, 4


def example(dtype=torch.float64):
    logprobs = torch.tensor(LOGPROBS, dtype=dtype)
    rollout = logprobs - torch.tensor(RATIOS, dtype=dtype).log()
    mask = torch.tensor([[t < n for t in range(3)] for n in LENGTHS])
    return logprobs, rollout, torch.tensor(REF_LOGPROBS, dtype=dtype), mask


def hand_advantages(std: bool) -> list[float]:
    out = []
    for group in REWARDS:
        mean = sum(group) / len(group)
        sd = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # Bessel, as torch.std
        out += [(r - mean) / (sd + 1e-4) if std else r - mean for r in group]
    return out


def hand_token_losses(advantages, beta):
    """-min(ρA, clip(ρ)A) + β(π_ref/π - log(π_ref/π) - 1), token by token, on real tokens only."""
    rows = []
    for i, n in enumerate(LENGTHS):
        row = []
        for t in range(n):
            rho, a = RATIOS[i][t], advantages[i]
            clipped_rho = min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH)
            loss = -min(rho * a, clipped_rho * a)
            d = REF_LOGPROBS[i][t] - LOGPROBS[i][t]
            row.append(loss + beta * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


def test_advantages_by_hand():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    # group 1: mean 0.5, std sqrt(0.5); group 2: mean 1.25, std sqrt(1.125)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 0.75 / (math.sqrt(1.125) + 1e-4)
    assert group_advantages(rewards, "std").flatten().tolist() == pytest.approx([a, -a, b, -b], abs=1e-15)
    assert group_advantages(rewards, "mean").flatten().tolist() == [0.5, -0.5, 0.75, -0.75]
    assert group_advantages(rewards, "std").flatten().tolist() == pytest.approx(hand_advantages(True), abs=1e-15)
    # equal rewards: advantage 0, not NaN
    assert group_advantages(torch.ones(1, 4), "std").tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_clipping_by_hand():
    logprobs, rollout, _, mask = example()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, clipped, kl = per_token_loss(logprobs, rollout, adv, EPS_LOW, EPS_HIGH)
    assert kl is None
    # row 0 (A=+1): ρ 1.5 is capped at 1 + ε_high; row 1 (A=-1): ρ 0.5 is raised to 1 - ε_low;
    # row 2 (A=+1): ρ 0.7 is below the range but A > 0, so the unclipped term is the min; row 3 (A=-1): ρ 1.3 > 1.28
    # but A < 0, the unclipped term wins too.
    assert loss[0].tolist() == pytest.approx([-1.0, -1.28, -0.9], abs=1e-12)
    assert loss[1, 0].item() == pytest.approx(0.8, abs=1e-12)
    assert loss[2, :2].tolist() == pytest.approx([-1.2, -0.7], abs=1e-12)
    assert loss[3].tolist() == pytest.approx([1.0, 1.3, 2.0], abs=1e-12)
    assert (clipped & mask).nonzero().tolist() == [[0, 1], [1, 0]]


def test_k3_kl_by_hand():
    logprobs, _, ref, _ = example()
    kl = k3_kl(logprobs, ref)
    d = -0.8 - -1.0
    assert kl[0, 1].item() == pytest.approx(math.exp(d) - d - 1, abs=1e-15)
    assert kl[3, 0].item() == 0.0  # same log-prob: no divergence
    assert (kl >= 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_each_loss_mode_equals_hand_computation(loss_type, std, beta):
    logprobs, rollout, ref, mask = example()
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), "std" if std else "mean").flatten()
    loss_tok, _, _ = per_token_loss(logprobs, rollout, advantages, EPS_LOW, EPS_HIGH, beta, ref)
    got = aggregate_loss(loss_tok, mask, loss_type, L_MAX).item()

    rows = hand_token_losses(hand_advantages(std), beta)
    if loss_type == "grpo":  # mean over each completion's tokens, then over completions
        want = sum(sum(row) / len(row) for row in rows) / len(rows)
    elif loss_type == "dapo":  # one mean over every token of the batch
        want = sum(sum(row) for row in rows) / sum(LENGTHS)
    else:  # token sum over (completions x max_new_tokens)
        want = sum(sum(row) for row in rows) / (len(rows) * L_MAX)
    assert got == pytest.approx(want, abs=1e-12)


def test_loss_modes_literal_numbers():
    """One case written out in full, without loops: Dr. GRPO advantages (r - mean), β = 0."""
    logprobs, rollout, ref, mask = example()
    adv = torch.tensor([0.5, -0.5, 0.75, -0.75], dtype=torch.float64)
    loss_tok, _, _ = per_token_loss(logprobs, rollout, adv, EPS_LOW, EPS_HIGH)
    row0 = -(0.5 * 1.0) - (0.5 * 1.28) - (0.5 * 0.9)  # -1.59
    row1 = 0.5 * 0.8  # 0.4
    row2 = -(0.75 * 1.2) - (0.75 * 0.7)  # -1.425
    row3 = 0.75 * 1.0 + 0.75 * 1.3 + 0.75 * 2.0  # 3.225
    total = row0 + row1 + row2 + row3  # 0.61
    grpo = (row0 / 3 + row1 / 1 + row2 / 2 + row3 / 3) / 4
    assert aggregate_loss(loss_tok, mask, "grpo", L_MAX).item() == pytest.approx(grpo, abs=1e-12)
    assert aggregate_loss(loss_tok, mask, "dapo", L_MAX).item() == pytest.approx(total / 9, abs=1e-12)
    assert aggregate_loss(loss_tok, mask, "dr_grpo", L_MAX).item() == pytest.approx(total / 16, abs=1e-12)
    assert total == pytest.approx(0.61, abs=1e-12)


def test_unknown_modes_are_named():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "bnpo_typo", 1)
    with pytest.raises(ValueError, match="advantage must be one of"):
        group_advantages(torch.zeros(1, 2), "rank")
    with pytest.raises(ValueError, match="ref_logprobs"):
        per_token_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), 0.2, 0.2, beta=0.1)


def test_group_size_one_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="standard deviation of a group of one completion is undefined"):
        check_group_size(1, "std")
    with pytest.raises(ValueError, match="--group-size 1 cannot be used with std-normalised advantages"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="every advantage r - mean is 0"):
        GRPOConfig(group_size=1, advantage="mean")
    GRPOConfig(group_size=2)


def test_dynamic_sampling_keeps_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def test_dynamic_sampling_refills_at_the_observed_keep_rate():
    assert refill_size(16, kept=0, drawn=0) == 16  # the first round draws the whole step
    assert refill_size(16, kept=0, drawn=16) == 16  # nothing kept yet: no rate to go by
    assert refill_size(16, kept=8, drawn=16) == 16  # half kept: 8 missing need 16 more
    assert refill_size(16, kept=12, drawn=16) == 6  # 4 missing at 3/4 -> 5.33, rounded up
    assert refill_size(16, kept=15, drawn=48) == 4  # 1 missing at 15/48 -> 3.2
    assert refill_size(16, kept=2, drawn=16) == 16  # never more than a whole step's prompts


def test_overlong_penalty_dapo_ramp():
    # max 20 tokens, buffer 8: no penalty up to 12 tokens, linear to -1 at 20
    lengths = torch.tensor([5, 12, 13, 16, 20, 25])
    assert overlong_penalty(lengths, 20, 8).tolist() == pytest.approx([0, 0, -1 / 8, -0.5, -1, -1])
    assert overlong_penalty(lengths, 20, 8, factor=0.5).tolist() == pytest.approx([0, 0, -1 / 16, -0.25, -.5, -.5])
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="overlong_buffer 30 exceeds max_new_tokens 20"):
        GRPOConfig(max_new_tokens=20, overlong_buffer=30)


# ---------------------------------------------------------------------------------------------------------------
# The gradient: for μ = 1 and β = 0 the ratio is exactly 1, and the objective's gradient must equal the
# policy-gradient formula  -Σ_i A_i Σ_t w_{i,t} ∇ log π(o_{i,t})  with each mode's weights w.


def tiny_batch(model, lengths=(4, 2, 3, 1), prompt_lens=(3, 3, 2, 2), L=4, P=3, seed=1):
    """Rows [left-padded prompt | right-padded completion] of random tokens; rollout log-probs = the model's own."""
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    ids = torch.randint(2, 32, (N, P + L), generator=g)
    padding = torch.zeros(N, P + L, dtype=torch.bool)
    mask = torch.zeros(N, L, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        padding[i, P - p : P + n] = True
        mask[i, :n] = True
    ids[~padding] = 0
    return ids, padding, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_equals_policy_gradient_formula(loss_type):
    from openseek.train.logprobs import completion_logprobs

    model = tiny_model()
    ids, padding, mask = tiny_batch(model)
    P, L = 3, 4
    advantages = torch.tensor([1.3, -0.4, 0.7, -1.6], dtype=torch.float64)
    with torch.no_grad():
        rollout, _ = completion_logprobs(model, ids, padding, P)
    batch = RolloutBatch(ids, padding, P, mask, rollout, advantages)
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=L, loss_type=loss_type, beta=0.0)
    model.zero_grad()
    loss, metrics = GRPOObjective(cfg)(model, batch)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert metrics["clip_fraction"] == 0.0

    # The formula, one completion at a time: ∇ Σ_t log π(o_{i,t}) from its own backward pass.
    N, lengths = len(advantages), mask.sum(1).tolist()
    want = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(N):
        model.zero_grad()
        logprobs, _ = completion_logprobs(model, ids[i : i + 1], padding[i : i + 1], P)
        logprobs[0, : lengths[i]].sum().backward()
        norm = {"grpo": N * lengths[i], "dapo": sum(lengths), "dr_grpo": N * L}[loss_type]
        for w, p in zip(want, model.parameters()):
            w -= advantages[i] / norm * p.grad
    # The model normalises in float32 (as transformers does), so float64 agreement stops near 1e-7.
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    assert max(w.abs().max() for w in want) > 1e-2  # far above the tolerance: a wrong weight would show


def test_objective_masks_padding_and_reports_metrics():
    model = tiny_model()
    ids, padding, mask = tiny_batch(model)
    from openseek.train.logprobs import completion_logprobs

    with torch.no_grad():
        own, _ = completion_logprobs(model, ids, padding, 3)
    # Garbage (even -inf) in the padded slots of the rollout/ref log-probs must not reach the loss.
    rollout = torch.where(mask, own, torch.tensor(-math.inf, dtype=own.dtype))
    ref = torch.where(mask, own - 0.1, torch.tensor(-1e9, dtype=own.dtype))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    cfg = GRPOConfig(group_size=2, max_new_tokens=4, beta=0.04)
    loss, metrics = GRPOObjective(cfg)(model, RolloutBatch(ids, padding, 3, mask, rollout, adv, ref))
    assert torch.isfinite(loss)
    d = -0.1
    assert metrics["kl"] == pytest.approx(math.exp(d) - d - 1, rel=1e-9)
    assert metrics["clip_fraction"] == 0.0
    assert 0 < metrics["entropy"] <= math.log(32)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="temperature must be > 0: GRPO needs sampled groups"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="updates_per_rollout"):
        GRPOConfig(updates_per_rollout=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GRPOConfig(max_new_tokens=0)


# ---------------------------------------------------------------------------------------------------------------
# RLOO, REINFORCE++-baseline and GSPO, by hand


def test_rloo_and_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 0.5, 0.5]], dtype=torch.float64)
    # RLOO: each reward minus the mean of the other two
    want = [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 2.0 - 0.5, 0.5 - 1.25, 0.5 - 1.25]
    assert group_advantages(rewards, "rloo").flatten().tolist() == pytest.approx(want, abs=1e-15)
    # REINFORCE++-baseline: minus the group mean, then over the std of all six of those (Bessel, as torch.std)
    centred = [0.5, -0.5, 0.0, 1.0, -0.5, -0.5]
    mean = sum(centred) / 6
    sd = math.sqrt(sum((c - mean) ** 2 for c in centred) / 5)
    got = group_advantages(rewards, "reinforce_pp").flatten().tolist()
    assert got == pytest.approx([c / (sd + 1e-4) for c in centred], abs=1e-15)
    # the names users know from TRL/verl
    assert group_advantages(rewards, "group_std").tolist() == group_advantages(rewards, "std").tolist()
    assert GRPOConfig(advantage="group_mean").advantage == "mean"


def test_gspo_loss_and_gradient_by_hand():
    """GSPO: s_i = exp(mean_t log π/π_old), loss = mean_i -min(s_i A_i, clip(s_i) A_i); its gradient is
    -(1/N) Σ_i A_i s_i (1/|y_i|) Σ_t ∇ log π(y_i,t) where unclipped, 0 where clipped."""
    from openseek.train.logprobs import completion_logprobs

    model = tiny_model()
    ids, padding, mask = tiny_batch(model)
    P = 3
    with torch.no_grad():
        own, _ = completion_logprobs(model, ids, padding, P)
    shift = torch.tensor([0.3, -0.02, 0.01, -0.4], dtype=torch.float64)  # per-sequence log-ratio offsets
    old = own - shift[:, None]
    advantages = torch.tensor([1.3, -0.4, 0.7, -1.6], dtype=torch.float64)
    eps_low, eps_high = 0.05, 0.05
    cfg = GRPOConfig(group_size=2, max_new_tokens=4, loss_type="gspo", epsilon_low=eps_low, epsilon_high=eps_high)
    model.zero_grad()
    loss, metrics = GRPOObjective(cfg)(model, RolloutBatch(ids, padding, P, mask, old, advantages))
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]

    s = [math.exp(x) for x in shift.tolist()]  # the mean log-ratio of row i is exactly shift[i]
    clipped = [(r > 1 + eps_high and a > 0) or (r < 1 - eps_low and a < 0) for r, a in zip(s, advantages.tolist())]
    assert clipped == [True, False, False, True]
    hand = sum(-min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a) for r, a in zip(s, advantages.tolist())) / 4
    assert loss.item() == pytest.approx(hand, rel=1e-9)
    assert metrics["clip_fraction"] == pytest.approx(float(mask[[0, 3]].sum() / mask.sum()))

    want = [torch.zeros_like(p) for p in model.parameters()]
    lengths = mask.sum(1).tolist()
    for i in (1, 2):  # the unclipped rows
        model.zero_grad()
        logprobs, _ = completion_logprobs(model, ids[i : i + 1], padding[i : i + 1], P)
        logprobs[0, : lengths[i]].sum().backward()
        for w, p in zip(want, model.parameters()):
            w -= advantages[i] * s[i] / lengths[i] / 4 * p.grad
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=name)
    assert max(w.abs().max() for w in want) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Rollout correction: tokens sampled by another view of the policy, reweighted to the trained one


@pytest.mark.parametrize("mode", ["token_tis", "sequence_mask"])
def test_a_rollout_policy_equal_to_the_trainers_gives_weight_one_and_the_plain_loss(mode):
    from openseek.train.logprobs import completion_logprobs

    model = tiny_model()
    ids, padding, mask = tiny_batch(model)
    with torch.no_grad():
        own, _ = completion_logprobs(model, ids, padding, 3)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    plain, plain_metrics = GRPOObjective(GRPOConfig(group_size=2, max_new_tokens=4))(
        model, RolloutBatch(ids, padding, 3, mask, own, advantages))
    corrected, metrics = GRPOObjective(GRPOConfig(group_size=2, max_new_tokens=4, rollout_correction=mode))(
        model, RolloutBatch(ids, padding, 3, mask, own, advantages))
    assert corrected.item() == plain.item()
    assert metrics["rollout/is_ratio_mean"] == 1.0 and metrics["rollout/is_ratio_max"] == 1.0
    assert metrics.get("rollout/is_truncated_fraction", 0.0) == 0.0
    assert metrics.get("rollout/is_masked_fraction", 0.0) == 0.0


def test_a_perturbed_rollout_policy_is_corrected_as_computed_by_hand():
    """At the first update π_old = π (the ratio is 1, its gradient ∇ log π), so the dapo loss is
    -(1/T) Σ_t w_t A_i with w = min(π/π_rollout, cap) for token_tis, and w = 0 or 1 per sequence for sequence_mask."""
    from openseek.train.logprobs import completion_logprobs

    model = tiny_model()
    ids, padding, mask = tiny_batch(model)
    with torch.no_grad():
        own, _ = completion_logprobs(model, ids, padding, 3)
    offsets = torch.tensor([[2.0, 0.1, 0.0, 0.0], [-0.2, 0.0, 0.0, 0.0], [0.5, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                           dtype=torch.float64)  # log π - log π_rollout
    rollout = own - offsets
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    cap = 3.0
    lengths = mask.sum(1).tolist()
    tokens = sum(lengths)

    cfg = GRPOConfig(group_size=2, max_new_tokens=4, loss_type="dapo", rollout_correction="token_tis",
                     rollout_correction_cap=cap)
    batch = RolloutBatch(ids, padding, 3, mask, rollout, advantages)
    loss, metrics = GRPOObjective(cfg)(model, batch)
    hand = -sum(min(math.exp(offsets[i, t].item()), cap) * advantages[i].item()
                for i in range(4) for t in range(lengths[i])) / tokens
    assert loss.item() == pytest.approx(hand, rel=1e-9)
    assert metrics["rollout/is_truncated_fraction"] == pytest.approx(1 / tokens)  # e^2 > 3, once
    assert metrics["rollout/is_ratio_max"] == pytest.approx(math.exp(2.0))
    assert torch.equal(batch.old_logprobs, own)  # kept for the μ - 1 updates after this one

    cfg = GRPOConfig(group_size=2, max_new_tokens=4, loss_type="dapo", rollout_correction="sequence_mask",
                     rollout_correction_cap=cap)
    loss, metrics = GRPOObjective(cfg)(model, RolloutBatch(ids, padding, 3, mask, rollout, advantages))
    geo = [math.exp(sum(offsets[i, : lengths[i]].tolist()) / lengths[i]) for i in range(4)]
    keep = [1 / cap <= g <= cap for g in geo]
    hand = -sum(advantages[i].item() * lengths[i] for i in range(4) if keep[i]) / tokens
    assert keep.count(False) >= 1 and loss.item() == pytest.approx(hand, rel=1e-9)


def test_a_non_positive_correction_cap_is_refused():
    with pytest.raises(ValueError, match="--rollout-correction-cap must be positive"):
        GRPOConfig(rollout_correction="token_tis", rollout_correction_cap=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.kernels("dense")
def test_logprob_kernel_equals_the_float64_log_softmax(dtype, temperature, level):
    """The head's log-probs on our kernel (logprobs._chunk_logprobs): log softmax(logits / T) at each target, the
    entropy, and the gradient into the logits (rounded once to their dtype) against float64, with a vocabulary that
    is not a multiple of 16 and targets at its first and last ids. A target outside the vocabulary is refused by
    name."""
    from openseek.train.logprobs import _chunk_logprobs

    torch.manual_seed(0)
    N, V, H = 40, 1003, 24
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[:3] = torch.tensor([0, V - 1, V - 2])
    logp, entropy = _chunk_logprobs(head, hidden, targets, temperature, True)
    weights = torch.randn(N)
    (logp * weights).sum().backward()
    logits = head(hidden).detach().double().requires_grad_()
    all64 = torch.log_softmax(logits / temperature, dim=-1)
    want = all64.gather(-1, targets[:, None]).squeeze(-1)
    (want * weights.double()).sum().backward()
    want_hidden_grad = (logits.grad.to(dtype) @ head.weight).double()
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32 and not entropy.requires_grad
    assert float((logp.double() - want).abs().max()) < 1e-5
    assert float((entropy.double() + (all64.exp() * all64).sum(-1)).abs().max()) < 1e-5
    tolerance = 1e-6 if dtype is torch.float32 else 1e-2  # the hidden gradient is a bf16 matmul of bf16 logit grads
    assert float((hidden.grad.double() - want_hidden_grad).norm() / want_hidden_grad.norm()) < tolerance
    with pytest.raises(RuntimeError, match="outside the vocabulary of 1003"):
        _chunk_logprobs(head, hidden, torch.full((N,), V), temperature, False)


@pytest.mark.parametrize("chunk,recompute_above", [(1, 0), (5, 0), (1000, 0), (5, 10**9)])
def test_chunked_logprobs_equal_the_full_logits_computation(chunk, recompute_above):
    """Log-probs, entropies and gradients through the head a chunk at a time equal the full [B, T, V] path."""
    from openseek.train.logprobs import head_logprobs

    model = tiny_model().float()
    ids, padding, _ = tiny_batch(model)
    hidden = model.hidden_states(ids, padding_mask=padding)[:, 2:-1]
    targets = ids[:, 3:]
    logp_all = torch.log_softmax(model.lm_head(hidden) / 0.7, dim=-1)
    want = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hidden = model.hidden_states(ids, padding_mask=padding)[:, 2:-1]
    got, entropy = head_logprobs(model.lm_head, hidden, targets, 0.7, chunk=chunk, recompute_above=recompute_above)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy.detach(), rtol=0, atol=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), [p.grad for p in model.parameters()], want_grads):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), (name, (g - w).abs().max(), w.abs().max())
