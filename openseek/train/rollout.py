"""Rollouts: prompts in, scored completions out, sampled by the Engine from the trained policy or a view of it.

GRPO (`grpo.py`) and rejection sampling (`sample.py`) share the first part: prompt rows from a dataset or a task,
the seeded prompt stream, the reward functions, `generate_and_score`, and the choice of what the Engine samples with
(`rollout_policy`: the trained module itself, or a bf16/int8 `rollout_view` of it refreshed after each update).
GRPO's `roll_out` then shapes the rewards (DAPO's overlong punishment, dynamic sampling), takes group advantages
and lays the rollout out as one `RolloutBatch` for the objective."""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from openseek.engine import Completion, stop_token_ids
from openseek.kernels import ops
from openseek.model import allocate, meta_model
from openseek.quantize import (
    FUSED,
    GroupedInt8,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    fuse_projections,
    quantize_modules,
)
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
from openseek.tasks import format_prompt, get_task
from openseek.tasks.math_file import DatasetError, jsonl_objects, parse_row
from openseek.train.trainer import Trainer

ADVANTAGES = ("std", "mean", "rloo", "reinforce_pp")
ADVANTAGE_ALIASES = {"group_std": "std", "group_mean": "mean"}
STD_EPS = 1e-4
PROMPT_FIELDS = ("prompt", "question", "problem")


def load_rows(args) -> tuple[list[dict], object]:
    """(prompt rows, task or None) from --dataset or --task."""
    if bool(args.dataset) == bool(args.task):
        raise ValueError("pass exactly one of --dataset FILE.jsonl or --task NAME")
    if args.task:
        task = get_task(args.task)
        return task.generate(args.task_size, seed=args.seed), task
    return load_prompt_file(args.dataset), None


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


class PromptStream:
    """Prompt rows in a seeded shuffle, epoch after epoch; under torchrun each rank takes its own slice of every
    draw. Its position is saved in checkpoints (`Trainer.track_data`), so a resumed run continues the order."""

    def __init__(self, rows: list[dict], seed: int = 0, rank: int = 0, world_size: int = 1):
        if not rows:
            raise ValueError("GRPO needs at least one prompt row")
        self.rows, self.seed, self.rank, self.world_size = rows, seed, rank, world_size
        self.position = {"epoch": 0, "index": 0, "rollouts": 0}

    def state_dict(self) -> dict:
        return {"position": dict(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state["position"])

    def take(self, n: int) -> list[dict]:
        """This rank's share of the next n × world_size rows."""
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


class Rewards:
    """The reward functions with their weights and metric names; `accuracy_fn` is the one logged as `accuracy`."""

    def __init__(self, fns: list, weights: list[float] | None = None, accuracy_fn=None):
        if not fns:
            raise ValueError("GRPO needs at least one reward function")
        weights = [1.0] * len(fns) if weights is None else list(weights)
        if len(weights) != len(fns):
            raise ValueError(f"--reward-weights has {len(weights)} values for {len(fns)} reward functions")
        self.fns, self.weights, self.accuracy_fn = fns, weights, accuracy_fn
        self.names = unique_names(fns)

    def total(self, per_fn: torch.Tensor) -> torch.Tensor:
        """[K, N] per-function rewards -> [N] weighted total."""
        return (torch.tensor(self.weights, dtype=torch.float32)[:, None] * per_fn).sum(0)

    def metrics(self, per_fn: torch.Tensor) -> dict[str, float]:
        out = {}
        for name, fn, values in zip(self.names, self.fns, per_fn):
            out[f"rewards/{name}/mean"] = values.mean().item()
            out[f"rewards/{name}/std"] = values.std().item()
            if fn is self.accuracy_fn:
                out["accuracy"] = values.mean().item()
        return out


@dataclass
class ScoredCompletions:
    """n completions of each prompt row, decoded and scored by every reward function."""

    prompt_texts: list[str]  # [P] the text each prompt's completions continue
    prompt_ids: list[list[int]]  # [P]
    completions: list[list[Completion]]  # [P][n] token ids, log-probs, finish reasons
    texts: list[str]  # [P * n] decoded completions, prompt-major
    per_fn: torch.Tensor  # [K, P * n] rewards of each function
    generation_s: float  # time spent in the Engine


def generate_and_score(engine, tokenizer, rows: list[dict], reward_fns: list, *, n: int, template: str,
                       max_new_tokens: int, temperature: float, top_p: float, seed: int | list[int],
                       logprobs: bool = False) -> ScoredCompletions:
    """Generate → decode → score, shared by GRPO and rejection sampling. Rewards see each completion's text and the
    prompt text it continued (so a template that opened `<think>` is visible to the format reward); extra row
    columns arrive as keyword lists. Each function is called through `rewards.score`, which names a function that
    returns the wrong length, None or a non-number."""
    texts, ids = zip(*(encode_prompt(tokenizer, row["prompt"], template) for row in rows))
    started = time.perf_counter()
    completions = engine.generate(
        list(ids), max_new_tokens, temperature=temperature, top_p=top_p, n=n,
        stop_token_ids=stop_token_ids(engine.cfg, tokenizer), seed=seed, logprobs=logprobs,
    )
    generation_s = time.perf_counter() - started
    decoded = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for group in completions for c in group]
    prompts = [t for t in texts for _ in range(n)]
    columns = {k: [row.get(k) for row in rows for _ in range(n)]
               for k in dict.fromkeys(k for row in rows for k in row) if k != "prompt"}
    per_fn = torch.tensor([score(fn, decoded, prompts, columns) for fn in reward_fns], dtype=torch.float32)
    return ScoredCompletions(list(texts), list(ids), completions, decoded, per_fn, generation_s)


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


def unique_names(fns) -> list[str]:
    """Metric names of the reward functions, numbered when two share a name."""
    names = [getattr(fn, "__name__", None) or reward_name(fn) for fn in fns]
    return [f"{n}_{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def rollout_policy(trainer: Trainer, grpo):
    """What the Engine samples with: the trained module itself, or a view of it in another precision, refreshed
    after every rollout's updates. `--rollout-dtype auto` samples in the precision the trainer computes in: a bf16
    view when the loss runs under bf16 autocast (the same rounded weights, read once instead of cast at every op of
    every decode step — and a bf16 residual stream, whose mismatch the rollout correction absorbs; learning parity:
    benchmarks/RESULTS.md, "GRPO: fast rollouts by default, and their learning parity"), else the module itself —
    with LoRA always the module itself, adapters active, since a view would be a second full copy of the weights
    LoRA is there to avoid."""
    if grpo.rollout_dtype == "auto":
        bf16_view = trainer.precision == "bf16" and trainer.cfg.lora_rank is None
        dtype = torch.bfloat16 if bf16_view else trainer.model.dtype
    else:
        dtype = getattr(torch, grpo.rollout_dtype)
    quantize = grpo.rollout_quantize
    if quantize == "auto":
        quantize = "int8" if int8_rollouts_pay(trainer, dtype) else "none"
    if dtype == trainer.model.dtype and quantize == "none":
        return trainer.model
    if trainer.world_size > 1 and trainer.cfg.parallel == "fsdp":
        raise ValueError("--rollout-dtype/--rollout-quantize read whole weights; with --parallel fsdp roll out in the "
                         "trainer's precision (or use --parallel ddp)")
    return rollout_view(trainer.model, dtype, quantize)


def int8_rollouts_pay(trainer: Trainer, view_dtype: torch.dtype) -> bool:
    """`--rollout-quantize auto`: int8 weights for a bf16 rollout view where our int8 kernel runs (ops.has): a decode
    step at 16 rows reads every weight, and the int8 kernel reads half the bytes of bf16 matmuls. Never on GPUs (bf16
    there is the fast path) nor with a full-precision view. Measured, with learning parity: benchmarks/RESULTS.md,
    "Round 8 — int8 rollouts by default, with their learning parity"."""
    if view_dtype != torch.bfloat16 or trainer.device.type != "cpu":
        return False
    return ops.has("quantized")


def rollout_view(policy: nn.Module, dtype: torch.dtype, quantize: str = "none", group_size: int = 32) -> nn.Module:
    """A copy of `policy` for sampling only, in `dtype` and maybe quantised (GRPO's fast rollouts): built on the
    meta device like `load`, then filled from the policy's weights by `refresh_view`, in place, after each update.
    A LoRA-wrapped policy is read through its merged weights, so the view samples what is being trained."""
    view = meta_model(policy.cfg, dtype)
    quantize_modules(view, quantize, group_size, policy.device)
    if quantize == "int8":
        fuse_projections(view)
    refresh_view(allocate(view, policy.device), policy)
    return view.eval().requires_grad_(False)


@torch.no_grad()
def refresh_view(view: nn.Module, policy: nn.Module) -> None:
    """Copy (or re-quantise) every weight of `policy` into `view`, module by module, without allocating a model."""
    for name, module in view.named_modules():
        if isinstance(module, Int8Embedding):
            continue  # its rows are the tied head's, refreshed with it
        if isinstance(module, GroupedInt8):  # the policy's stacked expert parameter (named like a fused projection)
            module.load_weight(policy.get_parameter(name))
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:  # the parts' weights (and biases) stacked, in order
            parts = [policy.get_submodule(parent).get_submodule(part) for part in FUSED[leaf]]
            module.load_weight(torch.cat([part.weight for part in parts]))
            if module.bias is not None:
                module.bias.copy_(torch.cat([part.bias for part in parts]))
            continue
        source = policy.get_submodule(name) if name else policy
        if isinstance(module, (Int8Linear, Int4Linear)):
            tied = name == "lm_head" and isinstance(view.embed_tokens, Int8Embedding)
            module.load_weight((policy.embed_tokens if tied else source).weight)
            if module.bias is not None:
                module.bias.copy_(source.bias)
            continue
        if isinstance(module, nn.Linear):
            module.weight.copy_(source.weight)
            if module.bias is not None:
                module.bias.copy_(source.bias)
            continue
        for leaf, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name == "rotary":
                continue  # computed, not trained
            tensor.copy_(getattr(source, leaf))


# ---------------------------------------------------------------------------------------------------------------
# One GRPO rollout: prompts -> completions -> rewards (with DAPO's shaping) -> group advantages -> one batch


def group_advantages(rewards: torch.Tensor, advantage: str = "std") -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]:
    std (group_std, GRPO): (r - group mean) / (group std + 1e-4);   mean (group_mean, Dr. GRPO): r - group mean;
    rloo: r minus the mean of the other G - 1 rewards = G / (G - 1) · (r - group mean);
    reinforce_pp (REINFORCE++-baseline): (r - group mean) / (std of those over the whole batch + 1e-4)."""
    advantage = ADVANTAGE_ALIASES.get(advantage, advantage)
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES + tuple(ADVANTAGE_ALIASES)}, got {advantage!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if advantage == "mean":
        return centred
    if advantage == "rloo":
        G = rewards.shape[1]
        return centred * G / (G - 1)
    if advantage == "reinforce_pp":
        return centred / (centred.std() + STD_EPS) if centred.numel() > 1 else centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)


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
    # [N, L] the trained policy's own log-probs at rollout time, for the ratio when a rollout correction is on:
    # taken from the first update's forward (no extra pass) and reused by the μ - 1 updates after it
    old_logprobs: torch.Tensor | None = None

    def split(self, parts: int) -> list[RolloutBatch]:
        """`parts` micro-batches of consecutive rows (gradient accumulation); sizes differ by at most one row."""
        rows = self.input_ids.shape[0]
        if parts > rows:
            raise ValueError(f"grad_accum={parts} is more micro-batches than the {rows} completions of a rollout")
        pieces = [torch.tensor_split(t, parts) if t is not None else [None] * parts
                  for t in (self.input_ids, self.padding_mask, self.completion_mask, self.rollout_logprobs,
                            self.advantages, self.ref_logprobs, self.old_logprobs)]
        return [RolloutBatch(ids, pad, self.prompt_len, mask, logp, adv, ref, old)
                for ids, pad, mask, logp, adv, ref, old in zip(*pieces)]


def roll_out(engine, tokenizer, prompts: PromptStream, rewards: Rewards, cfg, seed: int,
             pad_id: int, record: list | None = None) -> tuple[RolloutBatch, dict[str, float]]:
    """One rollout: P prompts (this rank's share), G completions each with their log-probs, rewards with DAPO's
    overlong shaping, dynamic sampling's refills, group advantages. Returns the batch on the model's device and the
    rollout's metrics (rewards, lengths, `time/generation`). Given a `record` list, appends one dict per completion
    of the batch (prompt, completion, tokens, each reward function's value): what `--log-completions` writes."""
    P, G = cfg.prompts_per_step // prompts.world_size, cfg.group_size
    kept, spare, generation_s, rounds = [], [], 0.0, 0
    while len(kept) < P:
        rows = prompts.take(refill_size(P, len(kept), len(kept) + len(spare)))
        # One seed per prompt from its place in the step's global prompt list: a prompt's samples are the same
        # whichever process draws them (2 processes reproduce 1).
        seeds = [hash_seed(seed, rounds, prompts.rank * len(rows) + i) for i in range(len(rows))]
        scored = generate_and_score(
            engine, tokenizer, rows, rewards.fns, n=G, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seed=seeds, logprobs=True)
        generation_s, rounds = generation_s + scored.generation_s, rounds + 1
        lengths = torch.tensor([len(c.token_ids) for group in scored.completions for c in group])
        total = rewards.total(scored.per_fn)
        total = total + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        for p, group in enumerate(scored.completions):
            g = dict(prompt_ids=scored.prompt_ids[p], completions=group, rewards=total[p * G : (p + 1) * G],
                     per_fn=scored.per_fn[:, p * G : (p + 1) * G], lengths=lengths[p * G : (p + 1) * G],
                     prompt=scored.prompt_texts[p], texts=scored.texts[p * G : (p + 1) * G])
            useful = not cfg.dynamic_sampling or bool(informative_groups(g["rewards"][None])[0])
            (kept if useful else spare).append(g)
        if not cfg.dynamic_sampling or rounds > cfg.max_refill_rounds:
            break
    dropped = len(spare)
    kept = (kept + spare)[:P]  # out of refill rounds: groups without signal fill the batch (advantage 0)
    prompts.position["rollouts"] += 1
    if record is not None:
        record.extend({"prompt": g["prompt"], "completion": text, "tokens": int(n),
                       "rewards": dict(zip(rewards.names, values))}
                      for g in kept for text, n, values in zip(g["texts"], g["lengths"], g["per_fn"].T.tolist()))

    rewards_pg = torch.stack([g["rewards"] for g in kept])
    lengths = torch.cat([g["lengths"] for g in kept]).float()
    m = {"reward": rewards_pg.mean().item(), "reward_std": rewards_pg.std(dim=1).mean().item(),
         **rewards.metrics(torch.cat([g["per_fn"] for g in kept], dim=1)),
         "completion_length/mean": lengths.mean().item(), "completion_length/max": lengths.max().item(),
         "completion_length/truncated": sum(c.finish_reason == "length" for g in kept for c in g["completions"])
         / len(lengths),
         "groups_without_signal": float((~informative_groups(rewards_pg)).sum())}
    if cfg.dynamic_sampling:
        m["dynamic_sampling/dropped_groups"] = float(dropped)
        m["dynamic_sampling/rounds"] = float(rounds)
    m["time/generation"] = generation_s
    return collate(kept, cfg.advantage, pad_id, engine.model.device), m


def refill_size(prompts_per_step: int, kept: int, drawn: int) -> int:
    """How many prompts dynamic sampling's next generation round draws: the whole step's at first; then enough to
    fill the missing groups at the share of groups kept so far, at most a whole step's. Drawing only the missing
    count took up to five rounds a step in the demo, each costing about a full round's time (a decode step of a
    small model costs the same for 24 rows as for 128); surplus informative groups are discarded, as DAPO does."""
    if drawn == 0 or kept == 0:
        return prompts_per_step
    return min(prompts_per_step, math.ceil((prompts_per_step - kept) * drawn / kept))


def collate(groups: list[dict], advantage: str, pad_id: int, device) -> RolloutBatch:
    """[left-padded prompt | right-padded completion] rows, advantages per group."""
    rows = [(g["prompt_ids"], c) for g in groups for c in g["completions"]]
    prompt_len = max(len(p) for p, _ in rows)
    L = max(1, max(len(c.token_ids) for _, c in rows))
    N = len(rows)
    input_ids = torch.full((N, prompt_len + L), pad_id, dtype=torch.long)
    padding = torch.zeros(N, prompt_len + L, dtype=torch.bool)
    logprobs = torch.zeros(N, L)
    for i, (prompt, c) in enumerate(rows):
        n = len(c.token_ids)
        input_ids[i, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt)
        input_ids[i, prompt_len : prompt_len + n] = torch.tensor(c.token_ids, dtype=torch.long)
        padding[i, prompt_len - len(prompt) : prompt_len + n] = True
        logprobs[i, :n] = torch.tensor(c.logprobs)
    advantages = group_advantages(torch.stack([g["rewards"] for g in groups]), advantage).flatten()
    return RolloutBatch(input_ids.to(device), padding.to(device), prompt_len, padding[:, prompt_len:].to(device),
                        logprobs.to(device), advantages.to(device))
