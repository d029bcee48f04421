"""Run reports: what a run cost and what it did — FLOPs, wall time, device-hours, money, and a loss plot.

Every training run ends with `report.md` and `report.json` in its run directory (also when it stops on a
non-finite loss), next to `metrics.jsonl` and `loss.png`. Other stages call `write_report` the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from openseek.config import ModelConfig

# Dense bf16 peak FLOP/s per device, for MFU; override with --peak-flops for anything not listed.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, MTP modules included, without the input embedding (a lookup)."""
    import torch

    from openseek.model import Model
    from openseek.model.moe import MoE

    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Model(cfg)
    total = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    if cfg.tie_word_embeddings:
        total += cfg.vocab_size * cfg.hidden_size  # the shared matrix still multiplies as the head
    moe_layers = sum(isinstance(m, MoE) for m in model.modules())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - inactive


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × active parameters, plus attention's scores and values (forward 2 FLOPs per
    multiply-add over T/2 keys on average under the causal mask, backward twice the forward)."""
    _, active = parameter_counts(cfg)
    value_dim = cfg.v_head_dim if cfg.uses_mla else cfg.head_dim
    forward_per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + value_dim) * seq_len
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return 6.0 * active + 3.0 * layers * forward_per_layer


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: list[dict], path) -> Path | None:
    rows = [m for m in metrics if isinstance(m.get("loss"), (int, float)) and math.isfinite(m["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(run_dir, summary: dict, price_per_device_hour: float) -> dict:
    """Add cost figures to `summary`, plot the loss, and write report.json + report.md. Returns the report."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    report = dict(summary)
    report["total_flops"] = report.get("flops_per_token", 0.0) * report.get("tokens", 0)
    report["device_hours"] = report.get("wall_time_s", 0.0) * report.get("devices", 1) / 3600
    report["price_per_device_hour"] = price_per_device_hour
    report["cost"] = report["device_hours"] * price_per_device_hour
    if metrics:
        report["final_loss"] = metrics[-1].get("loss")
    plot = plot_loss(metrics, run_dir / "loss.png")
    report["loss_plot"] = plot.name if plot else None
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [f"# Run report: {run_dir.name}", ""]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    rows = [
        ("status", report.get("status")),
        ("steps", report.get("steps")),
        ("tokens", f"{report.get('tokens', 0):,}"),
        ("final loss", _fmt(report.get("final_loss"))),
        ("parameters, total / active per token (input embedding excluded)",
         f"{report.get('parameters', 0):,} / {report.get('active_parameters', 0):,}"),
        ("FLOPs per token", f"{report.get('flops_per_token', 0):.4g}"),
        ("total FLOPs", f"{report['total_flops']:.4g}"),
        ("wall time", f"{report.get('wall_time_s', 0):.1f} s"),
        ("devices", f"{report.get('devices', 1)} × {report.get('device', '?')}"),
        ("precision", report.get("precision", "float32")),
        ("device-hours", f"{report['device_hours']:.4f}"),
        ("estimated cost", f"{report['cost']:.4f} at {price_per_device_hour} per device-hour"),
    ]
    if report.get("mfu") is not None:
        rows.append(("MFU (mean)", f"{report['mfu']:.1%}"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if plot:
        lines += [f"![loss]({plot.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return report


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else value


PLOTS = (("reward", "reward"), ("accuracy", "accuracy"), ("completion_length/mean", "completion length"))


def plot_rollouts(run_dir) -> Path | None:
    """rollouts.png: reward, accuracy and completion length over steps; linked from report.md."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
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
