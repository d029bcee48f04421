"""The one training loop. Pretraining, SFT and GRPO differ only by the objective and the batches they pass in.

Contract
--------
    trainer = Trainer(model, TrainConfig(...), objective, batches, tokenizer=tok, flops_per_token=None)
    report = trainer.train()

- `objective(model, batch) -> (loss, metrics)`: `loss` is a scalar tensor to minimise (the mean over the
  micro-batch); `metrics` is a dict of floats for this micro-batch. The trainer averages each metric over the
  micro-batches of a step and over the ranks, and writes it to `metrics.jsonl` under its own name; the key
  `tokens` is summed instead (it feeds tokens/s and the report's FLOPs). `model` is the model being trained (on
  several processes, the same module sharded or replicated): call `model(...)` and `model.mtp_logits(...)` on it.
  Under bf16 autocast on GPU, compute the loss in float32.
- `batches`: an iterator; the trainer calls `next(batches)` `grad_accum` times per optimizer step, one
  micro-batch each (batches that are tensors or dicts of tensors are moved to the device; anything else is passed
  as it is). StopIteration ends the run cleanly: a checkpoint, the report, status "data exhausted". Optional
  methods it uses when present:
    `state_dict()` / `load_state_dict(state)`: the exact data position, JSON-serialisable, saved in checkpoints
      (without them, resuming replays and discards the batches already consumed);
    `pop_metrics() -> dict[str, float]`: the batch source's own figures (timings, rollout stats), called once per
      step on rank 0 and written as they are; `progress_metrics` ({short name: metric key}) adds some of them to
      the progress bar. The trainer itself records `time/data_s`: time spent in `next()`.
- Data parallelism is the batch source's job to split: `rank, world_size = init_distributed()` gives this
  process's place, and each rank yields its own slice of every global batch (see `openseek.data.Batches`).

What the trainer owns: device placement, DDP (replicas; one gradient all-reduce per step) or FSDP2
(`fully_shard` per block) under `torchrun` — one process takes the same path with nothing to reduce — fused
AdamW (or Muon for hidden matrices), warmup + cosine or WSD learning rate, gradient accumulation and clipping,
bf16 autocast and `torch.compile` on GPU, DeepSeek's auxiliary-loss-free balancing (after each step every router's
correction bias moves by γ toward balanced load), metrics.jsonl, a progress bar, atomic checkpoints with exact
resume, stopping on a non-finite loss, and the final report with cost.

Checkpoints: `run_dir/checkpoints/step_XXXXXXXX/` is an HF model directory (config, safetensors, tokenizer) plus
`trainer_state.json` (step, data position, Python RNG), `optimizer.pt` and `rng.pt` (torch RNG of every rank), both
read back with `torch.load(weights_only=True)`. Each is written in a temporary directory and renamed into place,
so a killed run always leaves complete checkpoints; the last `keep_checkpoints` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import openseek
from openseek import report as reporting
from openseek.model import Model
from openseek.model.moe import MoE

CHECKPOINTS = "checkpoints"


class _DataExhausted(Exception):
    """The batch source raised StopIteration (StopIteration itself must not cross frames)."""


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, bad resume state); the message names the step."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    steps: int = 1000
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr × this
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay over decay_fraction) | constant
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on embeddings, head and vectors)
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like lr
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    balance_gamma: float = 0.0  # auxiliary-loss-free balancing: router bias update per step (0 = off)
    parallel: str = "ddp"  # ddp | fsdp, when launched with torchrun on more than one process
    device: str = "auto"  # auto = this rank's GPU when there is one, else cpu
    bf16: bool = True  # autocast to bfloat16 on GPU (parameters and optimizer stay float32)
    compile: bool = False  # torch.compile each block (GPU only)
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    price_per_device_hour: float = 2.0
    peak_flops: float | None = None  # per device, for MFU; None = looked up from the GPU's name

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule={self.schedule!r}: expected cosine, wsd or constant")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected adamw or muon")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}: expected ddp or fsdp")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps={self.steps} and grad_accum={self.grad_accum} must be at least 1")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD down to the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start + 1) / max(1, cfg.steps - decay_start)
    return cfg.lr + (floor - cfg.lr) * min(progress, 1.0)


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); joins the torchrun process group on first call (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())


class Trainer:
    def __init__(self, model: Model, cfg: TrainConfig, objective, batches, tokenizer=None,
                 flops_per_token: float | None = None):
        self.cfg, self.objective, self.batches, self.tokenizer = cfg, objective, batches, tokenizer
        self.rank, self.world_size = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = model.cfg
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.step, self.tokens, self.elapsed, self.batches_consumed = 0, 0, 0.0, 0
        self.report = None  # written at the end of train() on rank 0
        self._saved_step = None
        self.moe = moe_layers(model)
        self.flops_per_token = flops_per_token or reporting.flops_per_token(model.cfg, seq_len=0)

        resume_from = self._latest_checkpoint() if cfg.resume else None
        if resume_from is not None:
            loaded = openseek.load(resume_from, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            del loaded
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        model.to(self.device)
        self.model = self._parallelize(model)
        self.optimizers = self._build_optimizers()
        if resume_from is not None:
            self._load_trainer_state(resume_from)

    # ---- setup ---------------------------------------------------------------------------------------------

    def _parallelize(self, model: Model) -> Model:
        """Apply FSDP2 or replicate for DDP (from outside: the model knows nothing of it); compile blocks on GPU."""
        if self.cfg.compile and self.device.type == "cuda":
            for block in [*model.layers, *model.mtp]:
                block.compile()
        if self.world_size == 1:
            return model
        if self.cfg.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            # MTP layers use their norms and projection outside their own forward, so they stay in the root
            # unit, which is gathered for forward and for mtp_logits alike.
            fully_shard(model, mesh=mesh)
            register_fsdp_forward_method(model, "mtp_logits")
            return model
        for tensor in [*model.parameters(), *model.buffers()]:  # every replica starts from rank 0's weights
            dist.broadcast(tensor.data, src=0)
        return model

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW (fused kernel, CPU and GPU): matrices decay, vectors (norms, biases) do not. With Muon, the hidden
        matrices (experts included, one matrix per expert) go to Muon and the rest stays with AdamW."""
        cfg = self.cfg
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        muon = []
        if cfg.optimizer == "muon":
            if self.world_size > 1 and cfg.parallel == "fsdp":
                raise ValueError("optimizer=muon orthogonalises whole matrices; use --parallel ddp, not fsdp")
            muon = [p for n, p in named if p.dim() >= 2 and "embed_tokens" not in n and "lm_head" not in n]
        rest = [p for _, p in named if not any(p is m for m in muon)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)]
        if muon:
            optimizers.append(Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["peak_lr"] = group["lr"]
        return optimizers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _gradient_sync(self, last_micro_step: bool):
        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last_micro_step)

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
            for partial in (self.run_dir / CHECKPOINTS).glob(".tmp-*"):  # saves cut short by a killed run
                shutil.rmtree(partial)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_main and cfg.progress))
        self._mfu = []
        started = time.perf_counter() - self.elapsed
        status = "interrupted"
        try:
            while self.step < cfg.steps:
                try:
                    metrics = self._train_step()
                except _DataExhausted:  # a finite source ran dry: keep what was learned, report, stop
                    for optimizer in self.optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    if self._saved_step != self.step:
                        self.save_checkpoint()
                    status = f"data exhausted after step {self.step}"
                    break
                self.elapsed = time.perf_counter() - started
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self._log(metrics)
                bar.update(1)
                postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
                for name, key in getattr(self.batches, "progress_metrics", {}).items():  # the source's own figures
                    if key in metrics:
                        postfix[name] = f"{metrics[key]:.3g}"
                bar.set_postfix(postfix)
                if self.step == cfg.steps or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save_checkpoint()
            else:
                status = "completed"
        except TrainingError as e:
            status = f"stopped: {e}"
            raise
        finally:
            bar.close()
            if self.is_main:
                self._write_report(status)
        return self.report

    def _train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = learning_rate(cfg, step)
        for optimizer in self.optimizers:  # each group follows the schedule from its own peak
            for group in optimizer.param_groups:
                group["lr"] = lr * group["peak_lr"] / cfg.lr
        t0 = time.perf_counter()
        sums, data_s, tokens = defaultdict(float), 0.0, 0
        loads = [torch.zeros(m.gate.weight.shape[0], device=self.device) for m in self.moe]
        for micro in range(cfg.grad_accum):
            t_data = time.perf_counter()
            try:
                batch = next(self.batches)
            except StopIteration:
                raise _DataExhausted from None
            self.batches_consumed += 1
            data_s += time.perf_counter() - t_data
            self._gradient_sync(micro == cfg.grad_accum - 1)
            with self._autocast():
                loss, metrics = self.objective(self.model, _to_device(batch, self.device))
            (loss / cfg.grad_accum).backward()
            sums["loss"] += loss.detach().float().item()
            for k, v in metrics.items():
                if k == "tokens":
                    tokens += int(v)
                else:
                    sums[k] += float(v)
            for load, layer in zip(loads, self.moe):
                if layer.last_ids is not None:
                    load += torch.bincount(layer.last_ids.flatten(), minlength=load.numel()).to(load.dtype)
        means = {k: v / cfg.grad_accum for k, v in sums.items()}
        if self.world_size > 1:
            means, tokens = self._reduce_metrics(means, tokens)
            self._average_gradients()
            for load in loads:
                dist.all_reduce(load)
        if not math.isfinite(means["loss"]):
            raise TrainingError(self._stop_message(f"loss is {means['loss']}"))
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise TrainingError(self._stop_message(f"gradient norm is {grad_norm}"))
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        imbalance = self._balance_experts(loads)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        self.step += 1
        self.tokens += tokens
        out = {"step": self.step, **means, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens / step_s, "time/step_s": step_s, "time/data_s": data_s}
        if imbalance is not None:
            out["expert_load_max_mean"] = imbalance
        peak = self._peak_flops()
        if peak:
            out["mfu"] = self.flops_per_token * tokens / step_s / (peak * self.world_size)
            self._mfu.append(out["mfu"])
        if self.is_main and hasattr(self.batches, "pop_metrics"):
            out.update(self.batches.pop_metrics())
        return out

    def _stop_message(self, what: str) -> str:
        kept = list_checkpoints(self.run_dir)
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
        return f"non-finite training: at step {self.step + 1} the {what}; the run stopped before updating; {last}"

    def _reduce_metrics(self, means: dict, tokens: int) -> tuple[dict, int]:
        keys = sorted(means)
        packed = torch.tensor([means[k] for k in keys] + [float(tokens)], dtype=torch.float64)
        dist.all_reduce(packed)
        values = packed.tolist()
        return {k: v / self.world_size for k, v in zip(keys, values)}, int(values[-1])

    def _average_gradients(self) -> None:
        """DDP: every replica gets the mean gradient, with one flat all-reduce (FSDP2 reduces on its own)."""
        if self.cfg.parallel == "fsdp":
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def _balance_experts(self, loads: list[torch.Tensor]) -> float | None:
        """Auxiliary-loss-free balancing: bias += γ·sign(mean load − load); returns the mean max/mean load."""
        if not self.moe or not any(load.sum() > 0 for load in loads):
            return None
        ratios = []
        for layer, load in zip(self.moe, loads):
            if load.sum() == 0:  # not run this step (an MTP layer without MTP loss)
                continue
            mean = load.mean()
            ratios.append((load.max() / mean).item())
            if self.cfg.balance_gamma:
                bias = layer.gate.e_score_correction_bias
                bias += self.cfg.balance_gamma * torch.sign(mean - load).to(bias.dtype)
        return sum(ratios) / len(ratios)

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self.cfg.peak_flops or reporting.peak_flops(torch.cuda.get_device_name(self.device))

    # ---- metrics and report --------------------------------------------------------------------------------

    def _log(self, metrics: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so the log matches the state."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    def _write_report(self, status: str) -> None:
        total, active = reporting.parameter_counts(self.model_cfg)
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        summary = {
            "status": status, "steps": self.step, "tokens": self.tokens, "parameters": total,
            "active_parameters": active, "flops_per_token": self.flops_per_token, "wall_time_s": self.elapsed,
            "devices": self.world_size, "device": device, "command": _command_line(),
            "mfu": sum(self._mfu) / len(self._mfu) if self._mfu else None,
            "config": dataclasses.asdict(self.cfg),
        }
        self.report = reporting.write_report(self.run_dir, summary, self.cfg.price_per_device_hour)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.run_dir)
        return found[-1] if found else None

    def _full_state(self):
        """(model state dict, optimizer state dict) gathered whole on rank 0's CPU (None elsewhere under FSDP)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sharded = self.world_size > 1 and self.cfg.parallel == "fsdp"
        model_state = get_model_state_dict(self.model, options=options) if sharded else None
        optim_state = get_optimizer_state_dict(self.model, self.optimizers, options=options)
        return model_state, optim_state

    def save_checkpoint(self) -> Path | None:
        """Write step_XXXXXXXX atomically (temp dir, then rename) and keep the last `keep_checkpoints`."""
        model_state, optim_state = self._full_state()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        rngs = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        final = self.run_dir / CHECKPOINTS / f"step_{self.step:08d}"
        self._saved_step = self.step
        if self.is_main:
            tmp = final.with_name(f".tmp-{final.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if model_state is not None:  # FSDP: a plain CPU model holds the gathered weights for saving
                with torch.device("meta"):
                    plain = Model(self.model_cfg)
                plain.to_empty(device="cpu")
                plain.tie_weights()
                plain.load_state_dict(model_state)
                openseek.save(plain, tmp)
            else:
                openseek.save(self.model, tmp)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({f"rank{r}": state for r, state in enumerate(rngs)}, tmp / "rng.pt")
            state = {
                "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                "batches_consumed": self.batches_consumed, "world_size": self.world_size,
                "data": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
                "python_rng": _jsonable(random.getstate()), "config": dataclasses.asdict(self.cfg),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        if self.world_size > 1:
            dist.barrier()
        return final

    def _load_trainer_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = json.loads((directory / "trainer_state.json").read_text())
        if state["world_size"] != self.world_size and state.get("data") is None:
            raise TrainingError(f"{directory}: saved with {state['world_size']} processes, resumed with "
                                f"{self.world_size}, and the batch source has no state_dict to re-split the data")
        sharded = self.world_size > 1 and self.cfg.parallel == "fsdp"
        optim_state = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False) if sharded else None
        set_optimizer_state_dict(self.model, self.optimizers, optim_state, options=options)
        rngs = torch.load(directory / "rng.pt", weights_only=True)
        rng = rngs.get(f"rank{self.rank}", rngs["rank0"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(_tuples(state["python_rng"]))
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.batches_consumed = state["batches_consumed"]
        if state.get("data") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])
        else:  # no saved position: replay the batches already consumed
            for _ in range(self.batches_consumed):
                next(self.batches)
        if self.is_main:
            print(f"resumed from {directory} at step {self.step}", file=sys.stderr)


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum whose update is orthogonalised (Newton–Schulz) before it is applied.

    For weight matrices only; 3-D expert stacks [E, out, in] are handled one matrix per expert. The step is scaled by
    sqrt(max(1, out/in)) so tall and wide matrices move alike; weight decay is decoupled, as in AdamW.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalise(p.grad.lerp(buffer, group["momentum"]))
                rows, cols = p.shape[-2:]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ (batched over leading dims): a quintic Newton–Schulz iteration tuned to push
    every singular value towards 1 quickly (it lands in about [0.7, 1.2], which is all Muon needs)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.transpose(-2, -1)


def _command_line() -> str:
    """The command as the user typed it (`openseek pretrain ...`), for the report."""
    program = Path(sys.argv[0]).name
    if program in ("openseek", "cli.py", "__main__.py"):
        return " ".join(["openseek", *sys.argv[1:]])
    return " ".join(sys.argv)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---- command-line glue shared by `openseek pretrain` and `openseek sft` ------------------------------------------


def add_train_arguments(parser) -> None:
    """One flag per TrainConfig field (--run-dir, --steps, --lr, ...). Unset flags parse as None, so a recipe can
    fill them; `apply_recipe` then puts the dataclass defaults in whatever is still unset."""
    import argparse

    group = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        help_ = f"(default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=float, nargs=len(default), default=None, help=help_)
        else:
            kind = {int: int, float: float, str: str}.get(type(default), float)
            group.add_argument(flag, type=kind, default=None, help=help_)


def train_config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in values.items() if v is not None}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)


def apply_recipe(args, add_arguments, defaults: dict | None = None) -> dict | None:
    """Settle every flag: given on the command line > `--recipe file.json` > `defaults` and TrainConfig's.

    A recipe is a flat JSON object of flag names (underscores or dashes) plus an optional "model" object: the
    transformers config of a model trained from scratch, which is returned (or None). A flag counts as unset when
    it parsed as None (or, for flags declared with a concrete default, when it still equals that default).
    """
    import argparse

    model = None
    if getattr(args, "recipe", None):
        path = Path(args.recipe)
        try:
            recipe = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: recipe not found (see recipes/ for examples)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        reference = argparse.ArgumentParser()
        add_arguments(reference)
        model = recipe.pop("model", None)
        recipe.pop("description", None)
        for key, value in recipe.items():
            name = key.replace("-", "_")
            if not hasattr(args, name):
                raise ValueError(f"{path}: unknown setting {key!r}")
            current = getattr(args, name)
            if current is None or current == reference.get_default(name):
                setattr(args, name, value)
    fallback = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | (defaults or {})
    for name, value in fallback.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return model
