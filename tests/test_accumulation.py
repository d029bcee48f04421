"""Gradient accumulation is exact: a step over k micro-batches gives the gradient of one big batch, because every
loss term is divided by the step's global count of its units (labelled tokens, completions, ...), not by k."""

from __future__ import annotations

import pytest
import torch

from helpers_grpo import tiny_fp64_model
from openseek import data
from openseek.train.grpo import GRPOConfig, GRPOObjective
from openseek.train.rollout import RolloutBatch
from openseek.train.logprobs import completion_logprobs
from openseek.train.pretrain import NextTokenLoss
from openseek.train.config import TrainConfig
from openseek.train.trainer import Trainer


def gradient(trainer, micro_batches, objective) -> list[torch.Tensor]:
    for p in trainer.model.parameters():
        p.grad = None
    trainer.accumulate(micro_batches, objective)
    return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def assert_same(split, whole):
    assert len(split) == len(whole) > 0
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max(g.abs().max() for g in whole) > 1e-2  # far above the tolerance


def test_sft_with_ragged_masks(tmp_path):
    model = tiny_fp64_model()
    trainer = Trainer(model, TrainConfig(run_dir=str(tmp_path), device="cpu", progress=False, precision="float32"))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 32, (4, 12), generator=g)
    labels = ids.roll(-1, dims=1)
    for row, labelled in enumerate((11, 2, 7, 4)):  # very different token counts per micro-batch
        labels[row, : 11 - labelled] = data.IGNORE
    labels[:, -1] = data.IGNORE
    whole = {"input_ids": ids, "labels": labels}
    micro = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]
    objective = NextTokenLoss()
    split_grads = gradient(trainer, micro, objective)
    assert_same(split_grads, gradient(trainer, [whole], objective))
    # what `loss / grad_accum` would have given differs: the short micro-batch's tokens weigh more
    for p in trainer.model.parameters():
        p.grad = None
    for m in micro:
        (objective(trainer.model, m)[0] / 4).backward()
    naive = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert max((a - b).abs().max() for a, b in zip(naive, split_grads)) > 1e-3


def ragged_rollout(model, completion_lengths, prompt_lengths, L: int, seed: int) -> RolloutBatch:
    """Rows of left-padded prompts and right-padded completions of the given lengths, random tokens; rollout and
    reference log-probs are the model's own, perturbed in opposite directions; random advantages."""
    g = torch.Generator().manual_seed(seed)
    N, P = len(completion_lengths), max(prompt_lengths)
    ids = torch.randint(2, 32, (N, P + L), generator=g)
    padding = torch.zeros(N, P + L, dtype=torch.bool)
    mask = torch.zeros(N, L, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(completion_lengths, prompt_lengths)):
        padding[i, P - p : P + n] = True
        mask[i, :n] = True
    ids[~padding] = 0
    with torch.no_grad():
        own, _ = completion_logprobs(model, ids, padding, P)
    noise = 0.3 * torch.randn(own.shape, generator=g, dtype=own.dtype)
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    return RolloutBatch(ids, padding, P, mask, own + noise, advantages, ref_logprobs=own - noise)


@pytest.mark.parametrize("loss_type, correction", [("grpo", "none"), ("dapo", "none"), ("dr_grpo", "none"),
                                                   ("gspo", "none"), ("dapo", "token_tis"), ("grpo", "sequence_mask")])
def test_every_grpo_loss_mode(tmp_path, loss_type, correction):
    model = tiny_fp64_model()
    trainer = Trainer(model, TrainConfig(run_dir=str(tmp_path), device="cpu", progress=False))
    L = 5
    batch = ragged_rollout(model, (5, 1, 3, 2, 4, 1, 5, 2), (3, 2, 3, 1, 2, 3, 1, 3), L, seed=1)
    objective = GRPOObjective(GRPOConfig(group_size=2, max_new_tokens=L, loss_type=loss_type, beta=0.04,
                                         rollout_correction=correction, rollout_correction_cap=1.2))
    assert_same(gradient(trainer, batch.split(4), objective), gradient(trainer, [batch], objective))


def test_per_token_metrics_are_exact_over_ragged_micro_batches(tmp_path):
    """kl, entropy and clip_fraction are means over the step's completion tokens, whatever each micro-batch holds
    (a mean of micro-batch means would weigh the short ones' tokens more)."""
    model = tiny_fp64_model()
    trainer = Trainer(model, TrainConfig(run_dir=str(tmp_path), device="cpu", progress=False))
    L = 6
    batch = ragged_rollout(model, (6, 1, 6, 1), (2, 2, 2, 2), L, seed=2)
    objective = GRPOObjective(GRPOConfig(group_size=2, max_new_tokens=L, beta=0.04))
    whole, _, _ = trainer.accumulate([batch], objective)
    parts, _, _ = trainer.accumulate(batch.split(3), objective)  # rows (0, 1), (2), (3): 7, 6 and 1 tokens
    model.zero_grad(set_to_none=True)
    for key in ("kl", "entropy", "clip_fraction"):
        assert float(parts[key]) == pytest.approx(float(whole[key]), rel=1e-12), key
