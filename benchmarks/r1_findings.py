"""R1's two findings in miniature (issue 38): RL that lengthens reasoning, and distillation that beats RL for a
smaller student. Every seed runs, on the `reflection` demo task (openseek/demo_tasks.py: 3-digit additions, held
out the harder ones with two carries or more; a corpus where answering without working is common and checking the
result is rare):

1. the teacher: `openseek demo --task reflection`'s pipeline — pretrain → held-out eval → GRPO with R1's
   rule-based rewards (no length reward) logging every completion → held-out eval. From its completions, per GRPO
   step: mean length of right and of wrong answers apart, the share with a check step and with a correction.
2. the student (half the teacher's layers and width), pretrained the same way on the same corpus, evaluated.
3. distillation: rejection sampling from the RL'd teacher on the RL problems (`openseek sample`'s `sample`: k
   completions each, the correct and well-formed ones kept), then `openseek sft` of the pretrained student on them.
4. RL on the student: the same GRPO from the same pretrained student, on the same problems, for the wall time that
   step 3 took (`TrainConfig.max_seconds`).
5. held-out greedy accuracy of the three students: pretrained, distilled, RL'd.

    python benchmarks/r1_findings.py --out runs/r1_findings              # the full experiment (3 seeds)
    python benchmarks/r1_findings.py --out /tmp/r1 --quick --seeds 0     # toy size, the test's

DIR/summary.json: the figures of every seed and their means with standard errors over seeds (length_growth_correct
and length_growth_incorrect are last-10 / first-10 GRPO-step mean lengths), each stage's seconds, the wall time;
DIR/reasoning.png: seed 0's curves (length beside accuracy, as R1's Figure 3); DIR/distillation.png: the students.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openseek  # noqa: E402
from openseek import demo as demo_module  # noqa: E402
from openseek.cli import main as openseek_main  # noqa: E402
from openseek.demo_tasks import growth, has_check, plot_reasoning, reasoning_curve, window_mean  # noqa: E402
from openseek.rewards import format_reward  # noqa: E402
from openseek.tokenizer import Tokenizer  # noqa: E402
from openseek.train.sample import sample  # noqa: E402
from openseek.train.trainer import list_checkpoints  # noqa: E402

# The full experiment, then the toy one of the test: flags of `openseek demo` for the teacher and the student, and
# the distillation's own settings.
FULL = dict(
    demo=dict(corpus_size=60_000, heldout=500),
    teacher="small", student="half", sample_k=4, sft_steps=150, sft_batch=32, sft_lr=2e-3,
)
QUICK = dict(
    demo=dict(corpus_size=3000, pretrain_steps=120, batch_size=32, grpo_steps=20, grpo_rounds=1, prompts_per_step=4,
              group_size=4, grpo_prompts=60, heldout=16, max_new_tokens=80),
    teacher="tiny", student="half", sample_k=2, sft_steps=4, sft_batch=8, sft_lr=1e-3,
)


def demo_args(run_dir: Path, size: str, seed: int, threads: int | None, overrides: dict) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_module.add_arguments(parser)
    args = parser.parse_args(["--task", "reflection", "--run-dir", str(run_dir), "--size", size, "--seed", str(seed)])
    args.threads = threads
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def heldout_accuracy(demo, model_dir: Path, out: Path) -> float:
    return demo.evaluate(model_dir, out, n=1)["metrics"]["greedy_accuracy"]


def run_seed(root: Path, seed: int, settings: dict, threads: int | None) -> dict:
    """One seed of the whole experiment; the figures and each stage's seconds."""
    times = {}

    def timed(name, work):
        started = time.perf_counter()
        result = work()
        times[name] = time.perf_counter() - started
        return result

    teacher = demo_module.Demo(demo_args(root / "teacher", settings["teacher"], seed, threads, settings["demo"]))
    run = teacher.run
    run.mkdir(parents=True, exist_ok=True)
    timed("teacher_data", teacher.make_data)
    timed("teacher_pretrain", teacher.pretrain)
    base = timed("teacher_eval_base", lambda: heldout_accuracy(
        teacher, list_checkpoints(run / "pretrain")[-1], run / "eval_base"))
    timed("teacher_grpo", teacher.grpo)
    rl_model = list_checkpoints(run / "grpo")[-1]
    rl = timed("teacher_eval_rl", lambda: heldout_accuracy(teacher, rl_model, run / "eval_rl"))
    curve = teacher.chart_reasoning()  # teacher/reasoning.jsonl and .png
    checked = reasoning_curve(run / "grpo" / "completions.jsonl", keep=has_check)
    heldout_curve = [(0, base)] + [(p["step"], p["greedy_accuracy"])
                                   for p in json.loads((run / "rl_curve.json").read_text())]

    # the student: the same corpus and tokenizer, half the layers and width
    student = demo_module.Demo(demo_args(root / "student", settings["student"], seed, threads, settings["demo"]))
    student.run.mkdir(parents=True, exist_ok=True)
    for part in ("data", "tokenizer"):
        shutil.copytree(run / part, student.run / part)
    timed("student_pretrain", student.pretrain)
    pretrained = list_checkpoints(student.run / "pretrain")[-1]
    student_base = timed("student_eval_base", lambda: heldout_accuracy(student, pretrained, student.run / "eval_base"))

    # distillation: rejection sampling from the RL'd teacher, then SFT of the pretrained student
    rows = teacher.problems(teacher.args.grpo_prompts, seed=seed + 1, split="train", role="rl")
    traces = root / "distill" / "traces.jsonl"

    def rejection_sample():
        model = openseek.load(rl_model, device=teacher.device)
        return sample(model, Tokenizer.from_dir(rl_model), rows, [teacher.task.reward, format_reward], traces,
                      k=settings["sample_k"], max_new_tokens=teacher.args.max_new_tokens, temperature=1.0,
                      top_p=1.0, template="plain", keep_per_prompt=1, batch_prompts=64, seed=seed, progress=False,
                      threads=threads)

    counts = timed("distill_sample", rejection_sample)
    sft_dir = root / "distill" / "sft"
    timed("distill_sft", lambda: openseek_main([
        "sft", "--model", str(pretrained), "--data", str(traces), "--run-dir", str(sft_dir),
        "--steps", str(settings["sft_steps"]), "--batch-size", str(settings["sft_batch"]),
        "--lr", str(settings["sft_lr"]), "--warmup-steps", "10", "--max-len", "256", "--epochs", "100",
        "--seed", str(seed), "--no-progress", *(["--threads", str(threads)] if threads else [])]))
    distilled = timed("distilled_eval", lambda: heldout_accuracy(
        student, list_checkpoints(sft_dir)[-1], root / "distill" / "eval"))
    budget = times["distill_sample"] + times["distill_sft"]

    # RL on the student for the same wall time
    rl_dir = root / "student_rl"
    timed("student_grpo", lambda: student.reinforce(pretrained, rl_dir, steps=10_000, checkpoint_every=0,
                                                    max_seconds=budget))
    student_rl_steps = json.loads((rl_dir / "report.json").read_text())["steps"]
    student_rl = timed("student_rl_eval", lambda: heldout_accuracy(
        student, list_checkpoints(rl_dir)[-1], rl_dir / "eval"))

    return {
        "seed": seed, "curve": curve, "heldout_curve": heldout_curve,
        "teacher_base_accuracy": base, "teacher_rl_accuracy": rl, "accuracy_gain_points": 100 * (rl - base),
        "length_growth_correct": growth(curve, "length_correct"),
        "length_growth_incorrect": growth(curve, "length_incorrect"),
        "check_share_first10": window_mean(curve, "check_share", slice(0, 10)),
        "check_share_last10": window_mean(curve, "check_share", slice(-10, None)),
        "correction_share_first10": window_mean(curve, "correction_share", slice(0, 10)),
        "correction_share_last10": window_mean(curve, "correction_share", slice(-10, None)),
        "length_correct_first10": window_mean(curve, "length_correct", slice(0, 10)),
        "length_correct_last10": window_mean(curve, "length_correct", slice(-10, None)),
        "length_incorrect_first10": window_mean(curve, "length_incorrect", slice(0, 10)),
        "length_incorrect_last10": window_mean(curve, "length_incorrect", slice(-10, None)),
        # the Dr. GRPO check within one habit (completions with a check step), where no change of habit moves it
        "checked_length_growth_correct": growth(checked, "length_correct"),
        "checked_length_growth_incorrect": growth(checked, "length_incorrect"),
        "student_base_accuracy": student_base, "student_distilled_accuracy": distilled,
        "student_rl_accuracy": student_rl, "distilled_minus_rl_points": 100 * (distilled - student_rl),
        "distill_traces": counts["accepted"], "distill_seconds": budget, "student_rl_steps": student_rl_steps,
        "teacher_parameters": json.loads((run / "pretrain" / "report.json").read_text())["parameters"],
        "student_parameters": json.loads((student.run / "pretrain" / "report.json").read_text())["parameters"],
        "stage_seconds": times,
    }


def mean_and_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """The mean over seeds and its standard error (sample standard deviation / √n; None with one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def with_errors(figures: dict[str, list]) -> dict:
    """{name: mean over seeds, name_se: its standard error} for each figure."""
    out = {}
    for name, values in figures.items():
        out[name], out[f"{name}_se"] = mean_and_se(values)
    return out


FIGURES = ("teacher_base_accuracy", "teacher_rl_accuracy", "accuracy_gain_points", "length_growth_correct",
           "length_growth_incorrect", "length_correct_first10", "length_correct_last10", "length_incorrect_first10",
           "length_incorrect_last10", "check_share_first10", "check_share_last10", "correction_share_first10",
           "correction_share_last10", "checked_length_growth_correct", "checked_length_growth_incorrect",
           "student_base_accuracy", "student_distilled_accuracy", "student_rl_accuracy",
           "distilled_minus_rl_points", "distill_traces", "distill_seconds", "student_rl_steps")


def plot_students(summary: dict, path: Path) -> None:
    """Held-out accuracy of the three students (mean over seeds, ± one standard error) beside the teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("student\npretrained", "student_base_accuracy"), ("student\n+ GRPO", "student_rl_accuracy"),
            ("student\ndistilled", "student_distilled_accuracy"), ("teacher\n+ GRPO", "teacher_rl_accuracy")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([label for label, _ in bars], [100 * summary[key] for _, key in bars],
           yerr=[100 * (summary[f"{key}_se"] or 0) for _, key in bars], capsize=4,
           color=["#999999", "#d62728", "#2ca02c", "#1f77b4"])
    ax.set(ylabel="held-out greedy accuracy (%)", ylim=(0, 100),
           title=f"equal wall time for GRPO and distillation ({len(summary['seeds'])} seeds, ± s.e.)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for every run and summary.json (replaced)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="toy sizes (the test's): checks the pipeline, not R1")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every stage (fixed: reproducible)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    seeds = []
    for seed in args.seeds:
        seeds.append(run_seed(out / f"seed{seed}", seed, settings, args.threads))
        print(json.dumps({k: seeds[-1][k] for k in FIGURES}, indent=1), flush=True)
    wall = time.perf_counter() - started
    plot_reasoning(seeds[0]["curve"], seeds[0]["heldout_curve"], out / "reasoning.png")
    stage_names = list(seeds[0]["stage_seconds"])
    summary = {
        "command": " ".join(sys.argv), "seeds": args.seeds, "quick": args.quick, "threads": args.threads,
        "wall_seconds": wall,
        "stage_seconds": with_errors({name: [s["stage_seconds"][name] for s in seeds] for name in stage_names}),
        **with_errors({key: [s[key] for s in seeds] for key in FIGURES}),
        "per_seed": [{k: v for k, v in s.items() if k not in ("curve", "heldout_curve")} for s in seeds],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_students(summary, out / "distillation.png")
    print(f"wrote {out / 'summary.json'}, {out / 'reasoning.png'} and {out / 'distillation.png'} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
