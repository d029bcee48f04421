"""GRPO and its relatives (Dr. GRPO, DAPO, GSPO; std, mean, RLOO and REINFORCE++ advantages): the config, the
objective, and the RL loop written out in `train()`.

One step, read top to bottom in `train()`: `roll_out` (prompts → `generate_and_score` in rollout.py → rewards,
advantages) → μ × `Trainer.step(…, GRPOObjective)` → `Trainer.log`. The loss modes, the rollout view and its
correction, LoRA, and every metric are described in docs/training.md.

    openseek grpo --model DIR --task countdown --group-size 8 --prompts-per-step 16 --max-new-tokens 512 \
        --loss-type dapo --epsilon-high 0.28 --dynamic-sampling --overlong-buffer 128 --output-dir runs/grpo
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import openseek
from openseek.engine import Engine
from openseek.quantize import QUANTIZE
from openseek.lora import adapters_disabled
from openseek import report as reporting
from openseek.tasks import TEMPLATES
from openseek.train.logprobs import completion_logprobs
from openseek.train.rollout import (
    ADVANTAGE_ALIASES,
    ADVANTAGES,
    RolloutBatch,
    roll_out,
    PromptStream,
    Rewards,
    hash_seed,
    load_rows,
    refresh_view,
    resolve_rewards,
    rollout_policy,
)
from openseek.flags import (
    add_config_arguments,
    add_stage_arguments,
    apply_recipe,
    config_defaults,
    config_from_args,
)
from openseek.tokenizer import load_tokenizer
from openseek.train.config import TrainConfig, add_train_arguments, train_config_from_args
from openseek.train.trainer import MeanOf, Trainer, init_distributed


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo")
CORRECTIONS = ("auto", "none", "token_tis", "sequence_mask")

# ---------------------------------------------------------------------------------------------------------------
# The objective, as pure functions of tensors (each pinned by a hand-computed test)


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


def sequence_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: one importance ratio per sequence, s = exp(mean over its tokens of log π − log π_old), clipped per
    sequence: -min(s·A, clip(s, 1-ε_low, 1+ε_high)·A). Returns (loss [N], clipped [N] bool)."""
    m = mask.to(logprobs.dtype)
    lengths = m.sum(dim=1).clamp(min=1)
    ratio = torch.exp(((logprobs - old_logprobs) * m).sum(dim=1) / lengths)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)
    clipped = ((ratio > 1 + epsilon_high) & (advantages > 0)) | ((ratio < 1 - epsilon_low) & (advantages < 0))
    return loss, clipped


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights [N, L] (no gradient) for tokens sampled by a rollout policy that differs from the trained
    one (another precision, another engine): ρ = π_old / π_rollout per token.
    token_tis: truncated importance sampling, min(ρ, cap) per token (TRL's and verl's default);
    sequence_mask: 1, or 0 for every token of a sequence whose geometric-mean ρ leaves [1/cap, cap].
    Also returns what to log: the raw ρ (mean, max) and the share of tokens truncated or masked."""
    m = mask.to(old_logprobs.dtype)
    log_ratio = (old_logprobs - rollout_logprobs).detach() * m
    ratio = torch.exp(log_ratio)
    n = m.sum().clamp(min=1)
    stats = {"rollout/is_ratio_mean": float((ratio * m).sum() / n),
             "rollout/is_ratio_max": float(ratio.masked_fill(~mask, 0).max()) if mask.any() else 0.0}
    if mode == "token_tis":
        stats["rollout/is_truncated_fraction"] = float(((ratio > cap) & mask).sum() / n)
        return ratio.clamp(max=cap), stats
    sequence = torch.exp(log_ratio.sum(dim=1) / m.sum(dim=1).clamp(min=1))
    keep = (sequence <= cap) & (sequence >= 1 / cap)
    stats["rollout/is_masked_fraction"] = float(((~keep[:, None]) & mask).sum() / n)
    return keep[:, None].expand_as(ratio).to(ratio.dtype), stats


def loss_units(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:
    """What `loss_type` divides by, counted in one batch: completions (grpo, gspo), completion tokens (dapo) or
    completion slots, completions × max_new_tokens (dr_grpo). Over a whole step these add up across micro-batches."""
    if loss_type in ("grpo", "gspo"):
        return float(mask.shape[0])
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_sum(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of `loss_type` over per-token losses [N, L]: each completion's token mean, summed (grpo, gspo),
    or the plain sum of completion tokens' losses (dapo, dr_grpo)."""
    mask = mask.to(loss.dtype)
    if loss_type in ("grpo", "gspo"):
        return ((loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    return (loss * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> MeanOf:
    """The mean of x over the mask's tokens; as a MeanOf, the trainer averages it exactly over the whole step."""
    mask = mask.to(x.dtype)
    return MeanOf(float((x * mask).sum()), float(mask.sum()))


# ---------------------------------------------------------------------------------------------------------------
# The objective: what `Trainer.step` calls on each micro-batch of a rollout


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
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo | gspo (sequence-level ratio; use ε around 3e-4 / 4e-4)
    advantage: str = "std"  # std = group_std (GRPO, DAPO) | mean = group_mean (Dr. GRPO) | rloo | reinforce_pp
    updates_per_rollout: int = 1  # μ
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_refill_rounds: int = 4  # extra generation rounds dynamic sampling may spend per step
    overlong_buffer: int = 0  # DAPO soft overlong punishment: ramp length in tokens (0 = off)
    overlong_penalty: float = 1.0
    template: str = "r1-zero"  # r1-zero | chat | plain
    rollout_dtype: str = "auto"  # auto | float32 | bfloat16: the Engine's view of the policy (see rollout_policy)
    rollout_quantize: str = "auto"  # auto | none | int8 | int4: weight-only quantised rollouts (see rollout_policy)
    rollout_correction: str = "auto"  # none | token_tis | sequence_mask | auto: token_tis with a rollout view
    rollout_correction_cap: float = 3.0  # TRL's default truncation
    log_completions: bool = False  # write every trained completion to run_dir/completions.jsonl

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        self.advantage = ADVANTAGE_ALIASES.get(self.advantage, self.advantage)
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES + tuple(ADVANTAGE_ALIASES)}, got "
                             f"{self.advantage!r}")
        if self.rollout_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"rollout_dtype must be auto, float32 or bfloat16, got {self.rollout_dtype!r}")
        if self.rollout_quantize not in ("auto", *QUANTIZE):
            raise ValueError(f"rollout_quantize must be one of {('auto', *QUANTIZE)}, got {self.rollout_quantize!r}")
        if self.rollout_correction not in CORRECTIONS:
            raise ValueError(f"rollout_correction must be one of {CORRECTIONS}, got {self.rollout_correction!r}")
        if not self.rollout_correction_cap > 0:
            raise ValueError(f"--rollout-correction-cap must be positive (a ratio, TRL's default is 3.0), got "
                             f"{self.rollout_correction_cap}")
        check_group_size(self.group_size, self.advantage)
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) and max_new_tokens ({self.max_new_tokens}) "
                             "must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0: GRPO needs sampled groups (greedy completions of one prompt "
                             f"are all the same), got {self.temperature}")
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout (μ) must be >= 1, got {self.updates_per_rollout}")
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            raise ValueError(f"clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} exceeds max_new_tokens {self.max_new_tokens}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")


class GRPOObjective:
    """The clipped, KL-regularised group policy-gradient loss over one rollout (micro-)batch, in the Trainer's
    objective contract: `counts(batch)` gives the units `loss_type` divides by, and the loss is the batch's
    `loss_sum` over the step's count of them (the batch's own count when called alone)."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def counts(self, batch: RolloutBatch) -> dict[str, float]:
        return {self.cfg.loss_type: loss_units(batch.completion_mask, self.cfg.loss_type, self.cfg.max_new_tokens)}

    def __call__(self, model, batch: RolloutBatch, counts: dict | None = None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        units = max((counts or self.counts(batch))[cfg.loss_type], 1.0)
        mask = batch.completion_mask
        logprobs, entropy = completion_logprobs(
            model, batch.input_ids, batch.padding_mask, batch.prompt_len, cfg.temperature
        )
        # Padded positions get ratio 1 and KL 0, so a huge log-prob there can never turn into inf * 0.
        own = logprobs.detach()
        rollout = torch.where(mask, batch.rollout_logprobs.to(logprobs), own)
        ref = None if batch.ref_logprobs is None else torch.where(mask, batch.ref_logprobs.to(logprobs), own)
        metrics = {}
        if cfg.rollout_correction in ("none", "auto"):  # the rollout policy is the trained one: ratios against it
            old, weights = rollout, None
        else:  # ratios against the trained policy at rollout time, sampled tokens reweighted to it
            if batch.old_logprobs is None:
                batch.old_logprobs = own
            old = torch.where(mask, batch.old_logprobs.to(logprobs), own)
            weights, metrics = rollout_correction(old, rollout, mask, cfg.rollout_correction,
                                                  cfg.rollout_correction_cap)
        advantages = batch.advantages.to(logprobs)
        if cfg.loss_type == "gspo":
            sequence, clipped_rows = sequence_loss(logprobs, old, advantages, mask, cfg.epsilon_low, cfg.epsilon_high)
            kl = k3_kl(logprobs, ref) if cfg.beta != 0.0 else None
            loss_tok = sequence[:, None].expand_as(logprobs) + (cfg.beta * kl if kl is not None else 0.0)
            clipped = clipped_rows[:, None].expand_as(mask)
        else:
            loss_tok, clipped, kl = per_token_loss(logprobs, old, advantages, cfg.epsilon_low, cfg.epsilon_high,
                                                   cfg.beta, ref)
        if weights is not None:
            loss_tok = loss_tok * weights
        loss = loss_sum(loss_tok, mask, cfg.loss_type) / units
        mismatch = (own - rollout).abs()  # 0 when rollout and loss see the same weights alike
        metrics.update({
            "tokens": float(batch.padding_mask.sum()),
            "clip_fraction": masked_mean(clipped.float(), mask),
            "entropy": masked_mean(entropy, mask),
            "rollout/logprob_abs_diff_mean": masked_mean(mismatch, mask),
            "rollout/logprob_abs_diff_max": float(mismatch.masked_fill(~mask, 0).max()) if mask.any() else 0.0,
        })
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Python API and `openseek grpo`


def rollout_engine(policy_view, trainer: Trainer, grpo: GRPOConfig) -> Engine:
    """The Engine of the rollouts, on the policy or its view. `--threads N` holds for the rollouts too (the
    Engine's own default would tune the count on its decode steps)."""
    return Engine(policy_view, max_batch_size=max(64, grpo.prompts_per_step * grpo.group_size),
                  threads=trainer.threads.fixed)


def reference_logprobs(ref_model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The frozen reference's log-probs of a rollout's completion tokens (β > 0); with LoRA, the trained module with
    its adapters disabled."""
    with torch.no_grad(), adapters_disabled(ref_model):
        logprobs, _ = completion_logprobs(ref_model, batch.input_ids, batch.padding_mask, batch.prompt_len,
                                          temperature, entropy=False)
    return logprobs


def attribute_rollout(metrics: dict, update: int, rollout_metrics: dict, rollout_s: float) -> None:
    """A rollout's figures and its share of the time go with its first update's row; later updates generated
    nothing, and their log-prob gap is the policy's own move, not the rollout's."""
    if update == 0:
        metrics.update(rollout_metrics)
        metrics["time/scoring"] = rollout_s - metrics["time/generation"]
        return
    metrics.update({"time/generation": 0.0, "time/scoring": 0.0})
    for key in ("rollout/logprob_abs_diff_mean", "rollout/logprob_abs_diff_max"):
        metrics.pop(key)


def log_completions(run_dir, step: int, completions: list[dict]) -> None:
    """Append a step's completions to run_dir/completions.jsonl, one line each with its step (rank 0's share; a run
    resumed after a crash may repeat the lines of the steps after its last checkpoint)."""
    with open(Path(run_dir) / "completions.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"step": step, **c}, ensure_ascii=False) + "\n" for c in completions)


# Shown on the progress bar next to the loss: {short name: metric key}.
PROGRESS = {"reward": "reward", "acc": "accuracy", "len": "completion_length/mean", "kl": "kl",
            "gen_s": "time/generation", "update_s": "time/update"}


def train(model, tokenizer, rows: list[dict], reward_fns: list, grpo: GRPOConfig, train_cfg: TrainConfig,
          weights: list[float] | None = None, accuracy_fn=None) -> dict:
    """GRPO, written out: each step rolls out with the Engine on the very module being trained, scores, takes
    group advantages and makes μ updates through `Trainer.step` against the rollout's log-probs. Returns the
    report; `run_dir` gets metrics.jsonl, checkpoints, report.md and the reward plots."""
    rewards = Rewards(reward_fns, weights, accuracy_fn)
    rank, world_size = init_distributed()
    if grpo.prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step={grpo.prompts_per_step} must be a multiple of the {world_size} "
                         "processes (each generates its own share)")
    prompts = PromptStream(rows, train_cfg.seed, rank, world_size)
    model.mtp.requires_grad_(False)  # GRPO never trains the MTP module; frozen, it stays out of the optimizer
    # The frozen reference is the starting weights, taken before a resumed run loads its checkpoint. With LoRA it
    # is the trained module itself with its adapters disabled: the frozen base, with no second copy of the weights.
    lora = train_cfg.lora() is not None
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if grpo.beta != 0 and not lora else None
    trainer = Trainer(model, train_cfg, tokenizer,
                      flops_per_token=reporting.flops_per_token(model.cfg, grpo.max_new_tokens))
    trainer.track_data(prompts)
    ref_model = frozen.to(trainer.device) if frozen is not None else trainer.model if grpo.beta != 0 else None
    policy_view = rollout_policy(trainer, grpo)  # the trained module itself, or a bf16/quantised view of it
    engine = rollout_engine(policy_view, trainer, grpo)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if grpo.rollout_correction == "auto":
        grpo = dataclasses.replace(grpo, rollout_correction="none" if policy_view is trainer.model else "token_tis")
    objective = GRPOObjective(grpo)

    with trainer.session():
        logged = time.perf_counter()  # the end of the previous step (its logging): time/wall runs from here
        while not trainer.done:
            started = time.perf_counter()
            seed = hash_seed(train_cfg.seed, prompts.position["rollouts"])
            trainer.model.eval()  # rollouts sample the policy itself: no (LoRA) dropout, as a serving engine would
            with trainer.autocast():  # rollouts see the weights in the loss's precision
                completions = [] if grpo.log_completions and trainer.is_main else None
                batch, rollout_metrics = roll_out(engine, tokenizer, prompts, rewards, grpo, seed, pad_id,
                                                  completions)
                if ref_model is not None:
                    batch.ref_logprobs = reference_logprobs(ref_model, batch, grpo.temperature)
            trainer.model.train()
            rollout_s = time.perf_counter() - started
            rollout_metrics = trainer.reduce_metrics(rollout_metrics)  # each process's share -> the whole step
            micro_batches = batch.split(train_cfg.grad_accum)
            for update in range(grpo.updates_per_rollout):
                metrics = trainer.step(micro_batches, objective)
                attribute_rollout(metrics, update, rollout_metrics, rollout_s)
                metrics["time/refresh"] = 0.0
                last = update == grpo.updates_per_rollout - 1 or trainer.done
                if last and policy_view is not trainer.model:  # the next rollout samples the updated policy
                    refreshing = time.perf_counter()
                    refresh_view(policy_view, trainer.model)
                    metrics["time/refresh"] = time.perf_counter() - refreshing
                metrics["time/step"] = (metrics["time/generation"] + metrics["time/scoring"] + metrics["time/update"]
                                        + metrics["time/refresh"])
                metrics["time/wall"] = time.perf_counter() - logged
                if completions is not None and update == 0:
                    log_completions(train_cfg.run_dir, trainer.global_step, completions)
                trainer.log(metrics, progress=PROGRESS)
                logged = time.perf_counter()
                if trainer.done:
                    break
    if trainer.report is not None:
        reporting.plot_rollouts(train_cfg.run_dir)
    return trainer.report


GRPO_HELP = {
    "group_size": "G: completions per prompt",
    "prompts_per_step": "P: prompts per rollout batch",
    "max_new_tokens": "L: completion length limit",
    "beta": "k3 KL coefficient to the frozen start (0: no reference)",
    "loss_type": "grpo: sequence mean then mean; dapo: token mean; dr_grpo: token sum / (N·L); gspo: one clipped "
                 "ratio per sequence (GSPO: use --epsilon 3e-4 --epsilon-high 4e-4)",
    "advantage": "std (= group_std): (r-mean)/std (GRPO, DAPO); mean (= group_mean): r-mean (Dr. GRPO); rloo: "
                 "leave-one-out baseline; reinforce_pp: r-mean over the batch's std (REINFORCE++-baseline) "
                 "(default: mean for dr_grpo, else std)",
    "rollout_dtype": "the Engine samples with a view of the policy in this dtype, refreshed after every rollout's "
                     "updates (auto: bfloat16 when the update runs in bf16 without LoRA, else the trained weights)",
    "rollout_quantize": "weight-only quantised rollouts (int8 per channel, int4 per group; CPU kernels) (auto: int8 "
                        "with a bf16 rollout view on a CPU with AVX-512 VNNI, else none)",
    "rollout_correction": "for rollouts sampled by another view of the policy: token_tis truncates each token's "
                          "π_old/π_rollout at the cap; sequence_mask drops sequences whose geometric-mean ratio "
                          "leaves [1/cap, cap]; auto: token_tis with a rollout view, none without",
    "rollout_correction_cap": "the truncation / mask threshold of --rollout-correction",
    "epsilon_low": "ε_low",
    "epsilon_high": "ε_high (DAPO clip-higher: 0.28) (default: ε_low)",
    "updates_per_rollout": "μ: policy updates per rollout batch",
    "dynamic_sampling": "DAPO: drop groups whose rewards are all equal and refill with new prompts",
    "overlong_buffer": "DAPO soft overlong punishment over the last N tokens before --max-new-tokens (0: off)",
    "overlong_penalty": "the punishment at --max-new-tokens",
    "log_completions": "write each step's completions with their rewards to completions.jsonl in the run directory "
                       "(to read what the policy does: lengths of right and wrong answers, reflective steps)",
    "template": f"prompt template, one of {', '.join(TEMPLATES)}: R1-Zero's, the model's chat template, or the bare "
                "prompt",
}

# Defaults of `openseek grpo`: GRPOConfig's, then where they differ from the dataclasses': GRPO's learning rate and
# schedule, and the two settings whose default follows another flag (resolved in grpo_config_from_args).
DEFAULTS = config_defaults(TrainConfig, GRPOConfig) | dict(
    task_size=5000, run_dir="runs/grpo", lr=1e-6, steps=200, schedule="constant", weight_decay=0.0, min_lr_ratio=1.0,
    epsilon_high=None, advantage=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.argument_default = argparse.SUPPRESS  # only typed flags parse; apply_recipe settles the rest
    add_stage_arguments(parser, "model directory (HF format, with its tokenizer) to reinforce")
    parser.add_argument("--dataset", help="JSONL prompts: `prompt`, `question` or `problem`, maybe `answer`; other "
                                          "columns are passed to the reward functions")
    parser.add_argument("--task", help="built-in task instead of a dataset: arithmetic, countdown "
                                       "(options after a colon: arithmetic:digits=4,ops=+-)")
    parser.add_argument("--task-size", type=int, help="prompts generated from --task (default: 5000)")
    parser.add_argument("--reward", action="append", help="reward: format, accuracy, countdown or file.py:function "
                                                          "(repeatable; default: the task's checker + format)")
    parser.add_argument("--reward-weights", type=float, nargs="+", help="one weight per --reward (default 1 each)")
    add_config_arguments(parser, GRPOConfig, "GRPO", GRPO_HELP,
                         aliases={"epsilon_low": ["--epsilon"], "updates_per_rollout": ["--mu"]})
    add_train_arguments(parser)
    parser.add_argument("--output-dir", dest="run_dir", help="same as --run-dir (default: runs/grpo)")


def grpo_config_from_args(args) -> GRPOConfig:
    """GRPOConfig from the settled flags; ε_high defaults to ε_low and the advantage to Dr. GRPO's for dr_grpo."""
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon_low
    if args.advantage is None:
        args.advantage = "mean" if args.loss_type == "dr_grpo" else "std"
    return config_from_args(GRPOConfig, args)


def main(args: argparse.Namespace) -> int:
    apply_recipe(args, add_arguments, DEFAULTS)
    grpo = grpo_config_from_args(args)  # refuses bad settings (e.g. --group-size 1, --lora-rank 0) before loading
    train_cfg = train_config_from_args(args)
    if not args.model:
        raise ValueError("no model: pass --model DIR (an HF-format model directory)")
    rows, task = load_rows(args)
    reward_fns, accuracy_fn = resolve_rewards(args.reward, task, rows)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = openseek.load(args.model, dtype=train_cfg.load_dtype())
    report = train(model, tokenizer, rows, reward_fns, grpo, train_cfg, args.reward_weights, accuracy_fn)
    if report:
        print(f"done: {report['steps']} steps; report: {Path(args.run_dir) / 'report.md'}")
    return 0
