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
Dynamic sampling drops groups whose rewards are all equal and refills; overlong shaping is DAPO's soft punishment.

    openseek grpo --model DIR --task countdown --group-size 8 --prompts-per-step 16 --max-new-tokens 512 \
        --loss-type dapo --epsilon-high 0.28 --dynamic-sampling --overlong-buffer 128 --output-dir runs/grpo

Rewards see the completion text and the prompt text the model continued (so a template that opened `<think>` is
visible to the format reward); extra dataset columns arrive as keyword lists. metrics.jsonl gets, per step: reward
mean/std (total and per function), accuracy, completion length mean/max, clip fraction, KL, entropy and
time/step split into time/generation, time/scoring (rewards + reference log-probs) and time/update.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import openseek
from openseek.engine import stop_token_ids
from openseek import report as reporting
from openseek.rewards import (
    REWARDS,
    RewardError,
    accuracy_reward,
    countdown_reward,
    format_reward,
    load_reward,
    reward_name,
    score,
)
from openseek.tasks import TEMPLATES, format_prompt, get_task
from openseek.tasks.math_file import DatasetError, jsonl_objects, parse_row
from openseek.train.pretrain import load_tokenizer
from openseek.train.trainer import (
    Trainer,
    TrainConfig,
    add_train_arguments,
    apply_recipe,
    init_distributed,
    train_config_from_args,
)

PROMPT_FIELDS = ("prompt", "question", "problem")

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ADVANTAGES = ("std", "mean")
STD_EPS = 1e-4

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


def completion_logprobs(model, input_ids, padding_mask, prompt_len: int, temperature: float = 1.0,
                        entropy: bool = True):
    """Log-probs of the completion tokens (columns prompt_len:) under the model at the sampling temperature, and
    the per-token entropy (detached; None without `entropy`). Rows are [left-padded prompt | right-padded
    completion]; a batch without padding takes the plain causal path."""
    if bool(padding_mask.all()):
        padding_mask = None
    logits = model(input_ids, padding_mask=padding_mask)[:, prompt_len - 1 : -1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp_all.exp() * logp_all).sum(-1)


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
    template: str = "r1-zero"  # r1-zero | chat | plain

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
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
    metrics: dict[str, float] = field(default_factory=dict)  # rewards, lengths, timings (Rollouts.pop_metrics)


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
        metrics = {"tokens": float(batch.padding_mask.sum())}  # rollout statistics travel via pop_metrics
        metrics["clip_fraction"] = masked_mean(clipped.float(), mask)
        metrics["entropy"] = masked_mean(entropy, mask)
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Data: prompts, rewards, and the rollout batch source


def load_prompt_file(path) -> list[dict]:
    """Rows of a JSONL prompt file: the prompt from `prompt`, `question` or `problem`; every other column is kept
    and passed to the reward functions. Rows with a gold `answer` (or a MATH `solution`) get it normalised the way
    `openseek eval` reads benchmark files (GSM8K's `#### 42`, a solution's last \\boxed{})."""
    rows = []
    for where, line_no, row in jsonl_objects(path):
        field_name = next((f for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
        if field_name is None:
            raise DatasetError(
                f"{where}: no usable prompt column: expected a non-empty string in one of "
                f"{', '.join(PROMPT_FIELDS)}; the row has columns: {', '.join(row) or 'none'}"
            )
        if "answer" in row or "solution" in row:
            row = parse_row({**row, "prompt": row[field_name]}, where, line_no)
        rows.append({**row, "prompt": row[field_name]})
    return rows


def encode_prompt(tokenizer, question: str, template: str) -> tuple[str, list[int]]:
    """The text the model continues and its ids. The chat template writes its own BOS; the others get the
    tokenizer's usual special tokens."""
    text = format_prompt(question, template, tokenizer)
    return text, tokenizer.encode(text, add_special_tokens=template != "chat")


def score_completions(reward_fns, weights, completions, prompts, columns) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-function rewards [K, N], weighted total [N]). Each function is called through `rewards.score`:
    a wrong length, None or a non-number raises `RewardError` naming the function."""
    per_fn = torch.tensor([score(fn, completions, prompts, columns) for fn in reward_fns], dtype=torch.float32)
    total = (torch.tensor(weights, dtype=torch.float32)[:, None] * per_fn).sum(0)
    return per_fn, total


class Rollouts:
    """GRPO's batch source for the Trainer. Each rollout: P prompts, G completions each from the Engine running
    the policy module itself (no weight copy), rewards, group advantages, reference log-probs when β > 0. The
    same rollout batch is handed out μ times (μ updates per rollout, ratios against the rollout log-probs).

    Under torchrun each rank takes its own slice of the P prompts of a step. The position (prompt order, rollout
    count) is saved in checkpoints; a run resumed in the middle of a rollout's μ updates starts the next rollout.
    """

    # shown on the Trainer's progress bar next to the loss
    progress_metrics = {"reward": "reward", "acc": "accuracy", "len": "completion_length/mean", "kl": "kl",
                        "gen_s": "time/generation", "update_s": "time/update"}

    def __init__(self, model, tokenizer, rows: list[dict], reward_fns: list, cfg: GRPOConfig,
                 weights: list[float] | None = None, ref_model=None, accuracy_fn=None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        from openseek.engine import Engine

        if not rows:
            raise ValueError("GRPO needs at least one prompt row")
        if not reward_fns:
            raise ValueError("GRPO needs at least one reward function")
        weights = [1.0] * len(reward_fns) if weights is None else list(weights)
        if len(weights) != len(reward_fns):
            raise ValueError(f"--reward-weights has {len(weights)} values for {len(reward_fns)} reward functions")
        if cfg.beta != 0 and ref_model is None:
            raise ValueError("beta != 0 needs a frozen reference model")
        if cfg.prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {world_size} "
                             "processes (each generates its own share)")
        self.model, self.tokenizer, self.rows, self.cfg = model, tokenizer, rows, cfg
        self.reward_fns, self.weights, self.ref_model, self.accuracy_fn = reward_fns, weights, ref_model, accuracy_fn
        self.names = unique_names(reward_fns)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.engine = Engine(model, max_batch_size=max(64, cfg.prompts_per_step * cfg.group_size))
        self.stop_token_ids = stop_token_ids(model.cfg, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.position = {"epoch": 0, "index": 0, "rollouts": 0}
        self.current: RolloutBatch | None = None
        self.uses_left = 0
        self.pending: dict[str, float] = {}  # rollout metrics for the next pop_metrics
        self.step_start: float | None = None
        self.data_time = 0.0

    # ---- the Trainer's batch-source protocol ----

    def state_dict(self) -> dict:
        return {"position": dict(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state["position"])
        self.current, self.uses_left = None, 0

    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        t0 = time.perf_counter()
        if self.step_start is None:
            self.step_start = t0
        if self.uses_left == 0:
            self.current = self.rollout()
            self.uses_left = self.cfg.updates_per_rollout
            self.pending = dict(self.current.metrics)
        self.uses_left -= 1
        self.data_time += time.perf_counter() - t0
        return self.current

    def pop_metrics(self) -> dict[str, float]:
        """Rollout statistics and the step's time split; called by the Trainer right after the optimizer step."""
        out = {"time/generation": 0.0, **self.pending}
        if self.step_start is not None:  # the split adds up: scoring is the rest of the rollout (rewards, reference)
            step = time.perf_counter() - self.step_start
            out["time/step"] = step
            out["time/scoring"] = self.data_time - out["time/generation"]
            out["time/update"] = step - self.data_time
        self.pending, self.step_start, self.data_time = {}, None, 0.0
        return out

    # ---- prompts ----

    def next_rows(self, n: int) -> list[dict]:
        """This rank's share of the next n * world_size prompt rows of a seeded shuffle, epoch after epoch."""
        out = []
        while len(out) < n * self.world_size:
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:{self.position['epoch']}").shuffle(order)
            take = order[self.position["index"] : self.position["index"] + n * self.world_size - len(out)]
            out += [self.rows[i] for i in take]
            self.position["index"] += len(take)
            if self.position["index"] >= len(self.rows):
                self.position["epoch"] += 1
                self.position["index"] = 0
        return out[self.rank * n : (self.rank + 1) * n]

    # ---- one rollout ----

    def generate_groups(self, rows: list[dict], seed: int):
        """G completions for each row from the Engine, scored. Returns (groups, seconds spent generating)."""
        cfg, tok, G = self.cfg, self.tokenizer, self.cfg.group_size
        texts, ids = zip(*(encode_prompt(tok, row["prompt"], cfg.template) for row in rows))
        t0 = time.perf_counter()
        outputs = self.engine.generate(
            list(ids), cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=G,
            stop_token_ids=self.stop_token_ids, seed=seed, logprobs=True,
        )
        t1 = time.perf_counter()
        completions = [c for group in outputs for c in group]
        answers = [tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        prompts = [t for t in texts for _ in range(G)]
        columns = {k: [row.get(k) for row in rows for _ in range(G)]
                   for k in dict.fromkeys(k for row in rows for k in row) if k != "prompt"}
        per_fn, total = score_completions(self.reward_fns, self.weights, answers, prompts, columns)
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        total = total + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        groups = [
            dict(prompt_ids=ids[p], completions=completions[p * G : (p + 1) * G], rewards=total[p * G : (p + 1) * G],
                 per_fn=per_fn[:, p * G : (p + 1) * G], lengths=lengths[p * G : (p + 1) * G])
            for p in range(len(rows))
        ]
        return groups, t1 - t0

    def rollout(self) -> RolloutBatch:
        cfg = self.cfg
        P = cfg.prompts_per_step // self.world_size
        kept, spare, gen_time, rounds = [], [], 0.0, 0
        while len(kept) < P:
            seed = hash_seed(self.seed, self.rank, self.position["rollouts"], rounds)
            groups, seconds = self.generate_groups(self.next_rows(P - len(kept) if rounds else P), seed)
            gen_time, rounds = gen_time + seconds, rounds + 1
            for g in groups:
                useful = not cfg.dynamic_sampling or bool(informative_groups(g["rewards"][None])[0])
                (kept if useful else spare).append(g)
            if not cfg.dynamic_sampling or rounds > cfg.max_refill_rounds:
                break
        dropped = len(spare)
        kept = (kept + spare)[:P]  # out of refill rounds: groups without signal fill the batch (advantage 0)
        self.position["rollouts"] += 1

        batch = self.collate(kept)
        if self.ref_model is not None:
            self.ref_model.to(self.model.device)
            with torch.no_grad():
                batch.ref_logprobs, _ = completion_logprobs(
                    self.ref_model, batch.input_ids, batch.padding_mask, batch.prompt_len, cfg.temperature, False
                )

        rewards = torch.stack([g["rewards"] for g in kept])
        per_fn = torch.cat([g["per_fn"] for g in kept], dim=1)
        lengths = torch.cat([g["lengths"] for g in kept]).float()
        m = {"reward": rewards.mean().item(), "reward_std": rewards.std(dim=1).mean().item()}
        for name, fn, values in zip(self.names, self.reward_fns, per_fn):
            m[f"rewards/{name}/mean"] = values.mean().item()
            m[f"rewards/{name}/std"] = values.std().item()
            if fn is self.accuracy_fn:
                m["accuracy"] = values.mean().item()
        m["completion_length/mean"] = lengths.mean().item()
        m["completion_length/max"] = lengths.max().item()
        truncated = sum(c.finish_reason == "length" for g in kept for c in g["completions"])
        m["completion_length/truncated"] = truncated / len(lengths)
        m["groups_without_signal"] = float((~informative_groups(rewards)).sum())
        if cfg.dynamic_sampling:
            m["dynamic_sampling/dropped_groups"] = float(dropped)
            m["dynamic_sampling/rounds"] = float(rounds)
        m["time/generation"] = gen_time
        batch.metrics = m
        return batch

    def collate(self, groups: list[dict]) -> RolloutBatch:
        """[left-padded prompt | right-padded completion] rows, advantages per group."""
        rows = [(g["prompt_ids"], c) for g in groups for c in g["completions"]]
        prompt_len = max(len(p) for p, _ in rows)
        L = max(1, max(len(c.token_ids) for _, c in rows))
        N = len(rows)
        input_ids = torch.full((N, prompt_len + L), self.pad_id, dtype=torch.long)
        padding = torch.zeros(N, prompt_len + L, dtype=torch.bool)
        logprobs = torch.zeros(N, L)
        for i, (prompt, c) in enumerate(rows):
            n = len(c.token_ids)
            input_ids[i, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt)
            input_ids[i, prompt_len : prompt_len + n] = torch.tensor(c.token_ids, dtype=torch.long)
            padding[i, prompt_len - len(prompt) : prompt_len + n] = True
            logprobs[i, :n] = torch.tensor(c.logprobs)
        advantages = group_advantages(torch.stack([g["rewards"] for g in groups]), self.cfg.advantage).flatten()
        device = self.model.device
        return RolloutBatch(
            input_ids.to(device), padding.to(device), prompt_len, padding[:, prompt_len:].to(device),
            logprobs.to(device), advantages.to(device),
        )


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def unique_names(fns) -> list[str]:
    """Metric names of the reward functions, numbered when two share a name."""
    names = [getattr(fn, "__name__", None) or reward_name(fn) for fn in fns]
    return [f"{n}_{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ---------------------------------------------------------------------------------------------------------------
# Python API and `openseek grpo`


def resolve_rewards(specs: list[str] | None, task=None, rows=None) -> tuple[list, object]:
    """(reward functions, the one whose mean is `accuracy`). Defaults: the task's checker (or math-verify on an
    `answer` column) plus R1's format reward. `accuracy` names the task's own checker when training on a task."""
    checker = task.reward if task is not None else (
        accuracy_reward if rows and all("answer" in r for r in rows) else None)
    if not specs:
        if checker is None:
            raise RewardError("no --reward given and the dataset has no `answer` column to check: pass --reward "
                              f"NAME (one of {', '.join(sorted(REWARDS))}) or --reward file.py:function")
        return [checker, format_reward], checker
    fns = [checker if spec == "accuracy" and checker is not None else load_reward(spec) for spec in specs]
    return fns, next((f for f in fns if f is checker or f in (accuracy_reward, countdown_reward)), None)


def train(model, tokenizer, rows: list[dict], reward_fns: list, grpo: GRPOConfig, train_cfg: TrainConfig,
          weights: list[float] | None = None, accuracy_fn=None) -> dict:
    """Run GRPO with the shared Trainer: this module's objective, rollouts from the Engine on `model` itself.
    Returns the trainer's report; `run_dir` gets metrics.jsonl, checkpoints, report.md and the reward plots."""
    if train_cfg.grad_accum != 1:
        raise ValueError(f"grad_accum={train_cfg.grad_accum}: GRPO takes one rollout batch per optimizer step; "
                         "set the batch with --prompts-per-step and --group-size instead")
    model.mtp.requires_grad_(False)  # GRPO never trains the MTP module; frozen, it stays out of the optimizer
    ref_model = None
    if grpo.beta != 0:  # the frozen reference: the starting weights (a resumed run keeps the original reference)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    rank, world_size = init_distributed()
    rollouts = Rollouts(model, tokenizer, rows, reward_fns, grpo, weights, ref_model, accuracy_fn,
                        seed=train_cfg.seed, rank=rank, world_size=world_size)
    trainer = Trainer(model, train_cfg, GRPOObjective(grpo), rollouts, tokenizer,
                      flops_per_token=reporting.flops_per_token(model.cfg, grpo.max_new_tokens))
    report = trainer.train()
    if report is not None:
        plot_rollouts(train_cfg.run_dir)
    return report


PLOTS = (("reward", "reward"), ("accuracy", "accuracy"), ("completion_length/mean", "completion length"))


def plot_rollouts(run_dir) -> Path | None:
    """rollouts.png: reward, accuracy and completion length over steps; linked from report.md."""
    run_dir = Path(run_dir)
    metrics = reporting.read_metrics(run_dir / "metrics.jsonl")
    panels = [(key, label) for key, label in PLOTS if any(key in m for m in metrics)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        rows = [m for m in metrics if key in m]
        ax.plot([m["step"] for m in rows], [m[key] for m in rows], linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "rollouts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report = run_dir / "report.md"
    if report.exists() and path.name not in report.read_text():
        with report.open("a") as f:
            f.write(f"\n![reward, accuracy and completion length]({path.name})\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="JSON file of defaults for these flags (see recipes/)")
    parser.add_argument("--model", help="model directory (HF format, with its tokenizer) to reinforce")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--dataset", help="JSONL prompts: `prompt`, `question` or `problem`, maybe `answer`; other "
                                          "columns are passed to the reward functions")
    parser.add_argument("--task", help="built-in task instead of a dataset: arithmetic, countdown "
                                       "(options after a colon: arithmetic:digits=4,ops=+-)")
    parser.add_argument("--task-size", type=int, default=5000, help="prompts generated from --task")
    parser.add_argument("--reward", action="append", help="reward: format, accuracy, countdown or file.py:function "
                                                          "(repeatable; default: the task's checker + format)")
    parser.add_argument("--reward-weights", type=float, nargs="+", help="one weight per --reward (default 1 each)")
    parser.add_argument("--template", default="r1-zero", choices=TEMPLATES,
                        help="prompt template: R1-Zero's, the model's chat template, or the bare prompt")
    g = parser.add_argument_group("GRPO")
    g.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    g.add_argument("--prompts-per-step", type=int, default=4, help="P: prompts per rollout batch")
    g.add_argument("--max-new-tokens", type=int, default=256, help="L: completion length limit")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient to the frozen start (0: no reference)")
    g.add_argument("--loss-type", default="grpo", choices=LOSS_TYPES,
                   help="grpo: sequence mean then mean; dapo: token mean; dr_grpo: token sum / (N·L)")
    g.add_argument("--advantage", choices=ADVANTAGES,
                   help="std: (r-mean)/std (GRPO, DAPO); mean: r-mean (Dr. GRPO). Default: mean for dr_grpo, else std")
    g.add_argument("--epsilon", "--epsilon-low", dest="epsilon_low", type=float, default=0.2, help="ε_low")
    g.add_argument("--epsilon-high", type=float, help="ε_high (DAPO clip-higher: 0.28; default: ε_low)")
    g.add_argument("--updates-per-rollout", "--mu", dest="updates_per_rollout", type=int, default=1,
                   help="μ: policy updates per rollout batch")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: drop groups whose rewards are all equal and refill with new prompts")
    g.add_argument("--max-refill-rounds", type=int, default=4)
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="DAPO soft overlong punishment over the last N tokens before --max-new-tokens (0: off)")
    g.add_argument("--overlong-penalty", type=float, default=1.0, help="the punishment at --max-new-tokens")
    add_train_arguments(parser)
    parser.add_argument("--output-dir", dest="run_dir", default=argparse.SUPPRESS, help="same as --run-dir")
    parser.set_defaults(run_dir="runs/grpo", lr=1e-6, steps=200, schedule="constant", weight_decay=0.0,
                        min_lr_ratio=1.0)


def grpo_config_from_args(args) -> GRPOConfig:
    advantage = args.advantage or ("mean" if args.loss_type == "dr_grpo" else "std")
    return GRPOConfig(
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, beta=args.beta, epsilon_low=args.epsilon_low,
        epsilon_high=args.epsilon_low if args.epsilon_high is None else args.epsilon_high,
        loss_type=args.loss_type, advantage=advantage, updates_per_rollout=args.updates_per_rollout,
        dynamic_sampling=args.dynamic_sampling, max_refill_rounds=args.max_refill_rounds,
        overlong_buffer=args.overlong_buffer, overlong_penalty=args.overlong_penalty, template=args.template,
    )


def load_rows(args) -> tuple[list[dict], object]:
    """(prompt rows, task or None) from --dataset or --task."""
    if bool(args.dataset) == bool(args.task):
        raise ValueError("pass exactly one of --dataset FILE.jsonl or --task NAME")
    if args.task:
        task = get_task(args.task)
        return task.generate(args.task_size, seed=args.seed), task
    return load_prompt_file(args.dataset), None


def main(args: argparse.Namespace) -> int:
    apply_recipe(args, add_arguments)
    grpo = grpo_config_from_args(args)  # refuses bad settings (e.g. --group-size 1) before loading anything
    if not args.model:
        raise ValueError("no model: pass --model DIR (an HF-format model directory)")
    rows, task = load_rows(args)
    reward_fns, accuracy_fn = resolve_rewards(args.reward, task, rows)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = openseek.load(args.model, dtype=torch.float32)
    report = train(model, tokenizer, rows, reward_fns, grpo, train_config_from_args(args), args.reward_weights,
                   accuracy_fn)
    if report:
        print(f"done: {report['steps']} steps; report: {Path(args.run_dir) / 'report.md'}")
    return 0
