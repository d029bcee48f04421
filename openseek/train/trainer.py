"""The Trainer toolkit: what every training stage shares. Pretraining and SFT call `fit`; GRPO writes its own loop
(`grpo.py`) out of the same pieces: `session`, `step`, `log`.

    trainer = Trainer(model, TrainConfig(...), tokenizer=tok, flops_per_token=None)
    report = trainer.fit(batches, objective)                     # pretrain, SFT

    with trainer.session():                                      # GRPO (and any loop of your own)
        while not trainer.done:
            metrics = trainer.step([micro_batch, ...], objective)  # one optimizer step
            trainer.log(metrics)                                  # metrics.jsonl, progress bar, checkpoint when due

The objective contract (`counts` and a loss over the step's global counts), checkpoints and the metrics it writes
are described in docs/training.md.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import openseek
from openseek import data
from openseek import report as reporting
from openseek.device import resolve_device, resolve_precision
from openseek.lora import apply_lora, load_adapter, save_adapter
from openseek.model import Model, allocate, meta_model
from openseek.model.moe import Router
from openseek.train.config import TrainConfig, learning_rate
from openseek.train.parallelize import build_optimizers, compile_blocks, parallelize
from openseek.threads import AdaptiveThreads, parse_threads
from openseek.train.routing import RoutingLog

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"  # a LoRA run's checkpoints hold the adapter (PEFT's format) instead of the model


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, bad resume state); the message names the step."""


class MeanOf(float):
    """An objective's metric that is a mean over units (completion tokens, ...): the micro-batch's own mean as a
    float, carrying its `total` and `count` so that the step reports the exact mean over all its micro-batches and
    processes (a mean of means weighs a short micro-batch's tokens more)."""

    def __new__(cls, total: float, count: float):
        value = super().__new__(cls, total / count if count else 0.0)
        value.total, value.count = float(total), float(count)
        return value


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); joins the torchrun process group on first call (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())


class Trainer:
    def __init__(self, model: Model, cfg: TrainConfig, tokenizer=None, flops_per_token: float | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = model.cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, model.cfg.hidden_size)
        self.threads = AdaptiveThreads(fixed=parse_threads(str(cfg.threads)))
        self.global_step, self.tokens, self.elapsed, self.batches_consumed = 0, 0, 0.0, 0
        self.report = None  # written when a session ends, on rank 0
        self.status = None  # set by a loop that stops early for a reason of its own (e.g. data exhausted)
        self._saved_step = None
        self._data = None  # the tracked data source, whose position checkpoints save
        self._resumed_data_state = None
        self._mfu: list[float] = []
        self._bar = None
        self.flops_per_token = flops_per_token or reporting.flops_per_token(model.cfg, seq_len=0)

        resume_from = self._latest_checkpoint() if cfg.resume else None
        if resume_from is None:  # a resumed run restores the RNG states its checkpoint saved
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        self.lora = cfg.lora()
        if self.lora is not None:  # after seeding: the adapters' random start is the run's own
            if self.world_size > 1 and cfg.parallel == "fsdp":
                raise ValueError("LoRA runs replicate the frozen base and the small adapters: use --parallel ddp")
            self._base_model_name_or_path = getattr(model, "name_or_path", None)
            # auto: the frozen base in bf16 when the update runs in bf16 — autocast multiplies bf16 copies of it
            # anyway, so float32 would only double its memory and make every decode step cast it again
            base_dtype = cfg.lora_base_dtype if cfg.lora_base_dtype != "auto" else (
                "bfloat16" if self.precision == "bf16" else "float32")
            _cast_base(model, getattr(torch, base_dtype))
            apply_lora(model, self.lora)
        if resume_from is not None and self.lora is not None:
            load_adapter(model, resume_from / ADAPTER)
        elif resume_from is not None:
            loaded = openseek.load(resume_from, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            del loaded
        model.to(self.device)
        if cfg.compile:
            compile_blocks(model, self.device)
        self.model = parallelize(model, cfg.parallel, self.device, self.world_size)
        self.optimizers = build_optimizers(self.model, cfg, self.world_size)
        if resume_from is not None:
            self._load_trainer_state(resume_from)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def done(self) -> bool:
        """`steps` reached, or the wall-time budget `max_seconds` spent (`elapsed` is updated as each step is logged)."""
        out_of_time = self.cfg.max_seconds > 0 and self.elapsed >= self.cfg.max_seconds
        return self.global_step >= self.cfg.steps or out_of_time

    def autocast(self):
        """The precision context of the loss: bf16 autocast (`--precision bf16`, or `auto` where the hardware runs
        bf16 natively: a GPU, a CPU with AVX-512 BF16 or AMX), else nothing. Weights and optimizer state stay float32.
        Whatever must see the model exactly as the loss does (GRPO's rollouts) runs inside it too."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def track_data(self, source) -> None:
        """Save `source.state_dict()` in every checkpoint; when resuming, restore its saved position now."""
        self._data = source
        if self._resumed_data_state is not None:
            source.load_state_dict(self._resumed_data_state)
            self._resumed_data_state = None

    # ---- one optimizer step --------------------------------------------------------------------------------

    def accumulate(self, micro_batches: list, objective) -> tuple[dict, dict, int]:
        """Forward and backward over the micro-batches of one step, each term normalised by the step's global
        count of its units. Leaves the gradients in `.grad`; returns this process's (metrics, expert loads per
        router, tokens)."""
        counts = defaultdict(float)
        for batch in micro_batches:
            for term, n in objective.counts(batch).items():
                counts[term] += float(n)
        if self.world_size > 1:
            terms = sorted(counts)
            packed = torch.tensor([counts[t] for t in terms], dtype=torch.float64, device=self.device)
            dist.all_reduce(packed)
            counts = dict(zip(terms, packed.tolist()))
        # Gradients are averaged over processes afterwards; scaling by world_size makes that average a sum.
        counts = {t: max(n, 1.0) / self.world_size for t, n in counts.items()}
        sums, maxima, tokens, loss_total, loads = defaultdict(float), {}, 0, 0.0, {}
        totals, units = defaultdict(float), defaultdict(float)  # MeanOf metrics
        for micro, batch in enumerate(micro_batches):
            self._gradient_sync(micro == len(micro_batches) - 1)
            with self.autocast(), RoutingLog(self.model) as routing:
                loss, metrics = objective(self.model, _to_device(batch, self.device), counts)
            loss.backward()
            loss_total += loss.detach().float().item()
            for router, load in routing.expert_loads().items():
                loads[router] = loads[router] + load if router in loads else load
            for k, v in metrics.items():
                if k == "tokens":
                    tokens += int(v)
                elif k.endswith("max"):
                    maxima[k] = max(maxima.get(k, -math.inf), float(v))
                elif isinstance(v, MeanOf):
                    totals[k], units[k] = totals[k] + v.total, units[k] + v.count
                else:
                    sums[k] += float(v)
        means = {k: v / len(micro_batches) for k, v in sums.items()}
        exact = {k: MeanOf(totals[k], units[k]) for k in totals}
        return {"loss": loss_total / self.world_size, **means, **exact, **maxima}, loads, tokens

    def step(self, micro_batches: list, objective) -> dict:
        """One optimizer step over `micro_batches` (a list; its length is the accumulation): accumulate, reduce
        across processes, clip, update every optimizer, balance the experts. Returns the step's metrics."""
        if not micro_batches:
            raise ValueError("Trainer.step needs at least one micro-batch")
        cfg = self.cfg
        lr = learning_rate(cfg, self.global_step)
        for optimizer in self.optimizers:  # each group follows the schedule from its own peak
            for group in optimizer.param_groups:
                group["lr"] = lr * group["peak_lr"] / cfg.lr
        started, threads = time.perf_counter(), self.threads.threads
        with self.threads.unit():
            metrics, loads, tokens = self.accumulate(micro_batches, objective)
            if self.world_size > 1:
                metrics, tokens = self._reduce_metrics(metrics, tokens)
                self._average_gradients()
                for load in loads.values():
                    dist.all_reduce(load)
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(self._stop_message(f"loss is {metrics['loss']}"))
            grad_norm = self._clip_gradients()
            if not math.isfinite(grad_norm):
                raise TrainingError(self._stop_message(f"gradient norm is {grad_norm}"))
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        imbalance = self._balance_experts(loads)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        self.global_step += 1
        self.tokens += tokens
        out = {"step": self.global_step, **{k: float(v) for k, v in metrics.items()}, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens / seconds, "time/update": seconds, "threads": threads}
        if imbalance is not None:
            out["expert_load_max_mean"] = imbalance
        peak = self._peak_flops()
        if peak:
            out["mfu"] = self.flops_per_token * tokens / seconds / (peak * self.world_size)
            self._mfu.append(out["mfu"])
        return out

    # ---- a run: session, log, fit --------------------------------------------------------------------------

    @contextmanager
    def session(self):
        """A run: prepares the run directory (dropping log lines and partial saves a killed run left after its
        last checkpoint), shows the progress bar, and always ends with the report (status: completed, stopped on
        a non-finite loss, interrupted, or the loop's own `trainer.status`)."""
        from tqdm import tqdm

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
            for partial in (self.run_dir / CHECKPOINTS).glob(".tmp-*"):
                shutil.rmtree(partial)
        self.model.train()
        self._bar = tqdm(total=self.cfg.steps, initial=self.global_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not (self.is_main and self.cfg.progress))
        started = time.perf_counter() - self.elapsed
        self._session_started = started
        status = "interrupted"
        try:
            yield self
            status = self.status or ("completed" if self.done else f"stopped after step {self.global_step}")
        except TrainingError as e:
            status = f"stopped: {e}"
            raise
        finally:
            self.elapsed = time.perf_counter() - started
            self._bar.close()
            if self.is_main:
                self._write_report(status)

    def log(self, metrics: dict, progress: dict[str, str] | None = None) -> None:
        """Record a finished step: metrics.jsonl (rank 0, every `log_every` steps), the progress bar (loss, lr and
        `progress` = {short name: metric key}), and a checkpoint when one is due."""
        cfg = self.cfg
        self.elapsed = time.perf_counter() - self._session_started
        if self.is_main and (self.global_step % cfg.log_every == 0 or self.done):
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
        for name, key in (progress or {}).items():
            if key in metrics:
                postfix[name] = f"{metrics[key]:.3g}"
        self._bar.update(1)
        self._bar.set_postfix(postfix)
        if self.done or (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0):
            self.save_checkpoint()

    def fit(self, batches, objective) -> dict:
        """Pretraining and SFT: `grad_accum` micro-batches from `batches` per step until `steps`. A finite source
        that runs dry ends the run cleanly (a checkpoint, the report, status "data exhausted"). A source with
        `state_dict`/`load_state_dict` resumes at its exact position; any other is replayed past the batches
        already consumed. A `data.Batches` source adds its counts (`data/epoch`, ...) to the metrics."""
        if hasattr(batches, "state_dict"):
            self.track_data(batches)
        elif self.batches_consumed:
            for _ in range(self.batches_consumed):
                next(batches)
        with self.session():
            while not self.done:
                started = time.perf_counter()
                micro_batches = []
                for batch in batches:
                    micro_batches.append(batch)
                    if len(micro_batches) == self.cfg.grad_accum:
                        break
                if len(micro_batches) < self.cfg.grad_accum:  # ran dry: keep what was learned, stop
                    if self._saved_step != self.global_step:
                        self.save_checkpoint()
                    self.status = f"data exhausted after step {self.global_step}"
                    break
                self.batches_consumed += len(micro_batches)
                data_s = time.perf_counter() - started
                metrics = self.step(micro_batches, objective)
                metrics.update({"time/data": data_s, "time/step": data_s + metrics["time/update"]})
                if isinstance(batches, data.Batches):
                    metrics.update(batches.counts())
                self.log(metrics)
        return self.report

    # ---- inside a step -------------------------------------------------------------------------------------

    def _gradient_sync(self, last_micro_step: bool):
        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last_micro_step)

    def _stop_message(self, what: str) -> str:
        kept = list_checkpoints(self.run_dir)
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
        return (f"non-finite training: at step {self.global_step + 1} the {what}; the run stopped before updating; "
                f"{last}")

    def _reduce_metrics(self, metrics: dict, tokens: int) -> tuple[dict, int]:
        """Across processes: the loss and tokens add up, keys ending in `max` take the largest, the rest are
        averaged."""
        keys = sorted(metrics)
        exact = [k for k in keys if isinstance(metrics[k], MeanOf)]
        packed = torch.tensor([float(metrics[k]) for k in keys] + [float(tokens)]
                              + [metrics[k].total for k in exact] + [metrics[k].count for k in exact],
                              dtype=torch.float64)
        summed = packed.clone()
        dist.all_reduce(summed)
        largest = packed.clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        out = {}
        for i, k in enumerate(keys):
            if k == "loss":
                out[k] = summed[i].item()
            elif k.endswith("max"):
                out[k] = largest[i].item()
            else:
                out[k] = summed[i].item() / self.world_size
        base = len(keys) + 1
        for j, k in enumerate(exact):  # the exact mean over every process's units
            out[k] = float(MeanOf(summed[base + j].item(), summed[base + len(exact) + j].item()))
        return out, int(summed[len(keys)].item())

    def reduce_metrics(self, metrics: dict) -> dict:
        """A loop's own per-process figures (GRPO's rewards, lengths, timings) over all processes: keys ending in
        `max` take the largest, the rest the mean. The same dict with one process."""
        if self.world_size == 1:
            return metrics
        return self._reduce_metrics({k: v for k, v in metrics.items() if k != "loss"}, 0)[0]

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
    def _balance_experts(self, loads: dict) -> float | None:
        """Auxiliary-loss-free balancing: bias += γ·sign(mean load − load); returns the mean max/mean load."""
        loads = {router: load for router, load in loads.items() if load.sum() > 0}
        if not loads:
            return None
        ratios = []
        for router, load in loads.items():
            mean = load.mean()
            ratios.append((load.max() / mean).item())
            if self.cfg.balance_gamma:
                bias = router.e_score_correction_bias
                bias += self.cfg.balance_gamma * torch.sign(mean - load).to(bias.dtype)
        return sum(ratios) / len(ratios)

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self.cfg.peak_flops or reporting.peak_flops(torch.cuda.get_device_name(self.device))

    # ---- metrics and report --------------------------------------------------------------------------------

    def _trim_metrics(self) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so the log matches the state."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.global_step]
            path.write_text("".join(line + "\n" for line in kept))

    def _write_report(self, status: str) -> None:
        total, active = reporting.parameter_counts(self.model_cfg)
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        summary = {
            "status": status, "steps": self.global_step, "tokens": self.tokens, "parameters": total,
            "active_parameters": active,
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "flops_per_token": self.flops_per_token, "wall_time_s": self.elapsed,
            "devices": self.world_size, "device": device, "precision": self.precision, "command": _command_line(),
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
        final = self.run_dir / CHECKPOINTS / f"step_{self.global_step:08d}"
        self._saved_step = self.global_step
        if self.is_main:
            tmp = final.with_name(f".tmp-{final.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if self.lora is not None:  # the base is frozen: the adapter is all a checkpoint needs
                save_adapter(self.model, tmp / ADAPTER, self._base_model_name_or_path)
            elif model_state is not None:  # FSDP: a plain CPU model holds the gathered weights for saving
                plain = allocate(meta_model(self.model_cfg), "cpu")
                plain.load_state_dict(model_state)
                openseek.save(plain, tmp)
            else:
                openseek.save(self.model, tmp)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({f"rank{r}": state for r, state in enumerate(rngs)}, tmp / "rng.pt")
            state = {
                "step": self.global_step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                "batches_consumed": self.batches_consumed, "world_size": self.world_size,
                "data": self._data.state_dict() if self._data is not None else None,
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
        self.global_step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.batches_consumed = state["batches_consumed"]
        self._resumed_data_state = state.get("data")  # restored by track_data
        if self.is_main:
            print(f"resumed from {directory} at step {self.global_step}", file=sys.stderr)


def _command_line() -> str:
    """The command as the user typed it (`openseek pretrain ...`), for the report."""
    program = Path(sys.argv[0]).name
    if program in ("openseek", "cli.py", "__main__.py"):
        return " ".join(["openseek", *sys.argv[1:]])
    return " ".join(sys.argv)


def _cast_base(model: Model, dtype: torch.dtype) -> None:
    """The frozen base of a LoRA run in `dtype`: parameters only (buffers such as the rotary frequencies keep their
    float32), and not the routers, whose decisions stay float32 as `openseek.load` keeps them."""
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in routers:
            p.data = p.data.to(dtype)


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
