"""benchmarks/gpu_check.py, the check prepared for a lent GPU, runs end to end on the CPU at toy sizes: every stage
passes and the results file says so; a stage that fails is recorded, the others still run, and the exit code says
it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["tests", "decode", "train", "demo", "grpo_step"]


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_every_stage_passes_on_the_cpu_at_toy_sizes(tmp_path):
    run = gpu_check(tmp_path, "--device", "cpu", "--tiny")
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = results["stages"]
    assert {name: r["status"] for name, r in stages.items()} == dict.fromkeys(STAGES, "passed"), (
        {name: r.get("failures") for name, r in stages.items()}, run.stdout[-3000:])
    assert run.returncode == 0 and results["failed"] == []
    tests = stages["tests"]["tests"]  # collected by the `cuda` mark, skipped here with the reason
    names = {t["test"].rsplit("::", 1)[-1] for t in tests}
    parity = {f"test_bf16_logits_match_transformers_on_cuda[{kind}]" for kind in ("qwen2", "llama", "deepseek_v3")}
    assert parity <= names
    assert "test_engine_greedy_equals_transformers_generate_on_cuda[qwen2-compile+cuda_graphs]" in names
    assert "test_int8_weights_on_cuda[qwen2]" in names
    assert all(t["outcome"] == "skipped" and "needs a CUDA GPU" in t["detail"] for t in tests)
    runs = {(r["mode"], r["batch"]): r for r in stages["decode"]["runs"]}
    assert set(runs) == {("eager", 1), ("eager", 32)} and "CUDA graphs capture CUDA work only" in stages["decode"][
        "skipped"]
    for r in runs.values():
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_measured"] and r["fraction_of_nominal"] is None
        assert r["bytes_per_step"] > stages["decode"]["weight_bytes_per_step"]  # the weights and the cache
    train = stages["train"]
    assert train["tokens_per_s"] > 0 and train["mfu"].startswith("n/a") and train["flops_per_token"] > 6 * train[
        "params"]
    assert stages["demo"]["report"]["device"] == "cpu" and "pretrain" in stages["demo"]["report"]["stage_seconds"]
    assert stages["grpo_step"]["step"]["time/wall"] > 0
    summary = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | passed |" in summary for name in STAGES) and summary.rstrip().endswith("none")


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    run = gpu_check(tmp_path, "--device", "cuda", "--tiny", "--stages", "decode", "train")  # no GPU here
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert run.returncode == 1 and results["failed"] == ["decode", "train"]
    for stage in results["stages"].values():
        assert stage["failures"] == ["ValueError: --device cuda: this machine has no CUDA device "
                                     "(torch.cuda.is_available() is False); use --device cpu or auto"]
    assert "2 of 2 stages failed (decode, train)" in run.stdout
