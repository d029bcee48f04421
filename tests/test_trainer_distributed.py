"""The trainer as users run it: the CLI in subprocesses, killed with SIGKILL and resumed, and under torchrun with
two gloo processes (DDP and FSDP2) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import TINY_DEEPSEEK, read_metrics, successor_documents, tiny_tokenizer, write_corpus
from openseek.train.trainer import list_checkpoints

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus, a tokenizer directory and a tiny DeepSeek-V3 config (MLA, MoE, MTP) for CLI runs."""
    root = tmp_path_factory.mktemp("cli")
    docs = successor_documents(200)
    write_corpus(root / "corpus.jsonl", docs)
    tiny_tokenizer(docs).save(root / "tok")
    (root / "model.json").write_text(json.dumps(TINY_DEEPSEEK))
    return root


def pretrain_command(root: Path, run_dir: Path, steps: int, batch_size: int, *extra: str) -> list[str]:
    return [
        "pretrain", "--model", str(root / "model.json"), "--tokenizer", str(root / "tok"),
        "--data", str(root / "corpus.jsonl"), "--seq-len", "16", "--batch-size", str(batch_size),
        "--steps", str(steps), "--lr", "3e-3", "--warmup-steps", "2", "--mtp-weight", "0.3",
        "--balance-alpha", "1e-3", "--balance-gamma", "1e-2", "--run-dir", str(run_dir), "--no-progress",
        "--threads", "1", "--precision", "float32", *extra,
    ]


def run(args: list[str], torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "openseek.cli"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                  "-m", "openseek.cli"]
    result = subprocess.run(prefix + args, env=ENV, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def test_sigkill_mid_run_then_resume_is_bitwise_exact(workspace, tmp_path):
    steps = 24
    straight = tmp_path / "straight"
    run(pretrain_command(workspace, straight, steps, 2, "--checkpoint-every", "4"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "openseek.cli",
                             *pretrain_command(workspace, killed, steps, 2, "--checkpoint-every", "4")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(killed)
    assert done and done[-1].name != f"step_{steps:08d}", "the run was not killed mid-way"
    for checkpoint in done:  # every checkpoint a killed run leaves is complete and loads
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()
        json.loads((checkpoint / "trainer_state.json").read_text())
    (killed / "checkpoints" / ".tmp-step_00000099").mkdir()  # what a save cut short by the kill looks like

    result = run(pretrain_command(workspace, killed, steps, 2, "--checkpoint-every", "4", "--resume"))
    assert f"resumed from {done[-1]}" in result.stderr
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["loss"] for m in read_metrics(killed)] == [m["loss"] for m in read_metrics(straight)]


@pytest.fixture(scope="module")
def one_process(workspace):
    """The reference: one process, batch 4."""
    run(pretrain_command(workspace, workspace / "one", 4, 4))
    return workspace / "one"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(workspace, one_process, tmp_path, parallel):
    one, two = one_process, tmp_path / "two"
    run(pretrain_command(workspace, two, 4, 2, "--parallel", parallel), torchrun=2)
    losses_one = [m["loss"] for m in read_metrics(one)]
    losses_two = [m["loss"] for m in read_metrics(two)]
    assert len(losses_two) == 4 and losses_one == pytest.approx(losses_two, abs=1e-5, rel=0)
    for key in ("expert_load_max_mean", "tokens", "loss/mtp", "loss/balance"):  # loads are reduced over ranks
        assert [m[key] for m in read_metrics(one)] == pytest.approx([m[key] for m in read_metrics(two)], abs=1e-5)
    a, b = final_weights(one), final_weights(two)
    for name in a:  # AdamW's normalised step magnifies reduction-order noise where a gradient is near zero
        assert torch.allclose(a[name], b[name], atol=1e-4, rtol=0), name
    report = json.loads((two / "report.json").read_text())
    assert report["devices"] == 2 and report["status"] == "completed"


def test_grpo_on_two_processes_matches_one(tmp_path):
    """Each rank rolls out its share of the step's prompts (a prompt's samples seeded by its place in the global
    list), advantages per group, gradients all-reduced: 2 gloo processes reproduce one with the same global batch."""
    from helpers_grpo import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    reward = f"{Path(__file__).parent / 'helpers_grpo.py'}:digit_share"

    def grpo(run_dir, processes):
        run(["grpo", "--model", str(model_dir), "--task", "arithmetic", "--task-size", "64", "--reward", reward,
             "--template", "plain", "--max-new-tokens", "12", "--group-size", "4", "--prompts-per-step", "4",
             "--steps", "3", "--lr", "3e-3", "--beta", "0.04", "--output-dir", str(run_dir), "--no-progress",
             "--threads", "1", "--precision", "float32"], torchrun=processes)
        return read_metrics(run_dir)

    one, two = grpo(tmp_path / "one", 0), grpo(tmp_path / "two", 2)
    # per-token means (kl, entropy, clip_fraction) over all processes' tokens, not a mean of per-process means
    for key in ("reward", "completion_length/mean", "loss", "kl", "entropy", "clip_fraction", "tokens"):
        assert [m[key] for m in one] == pytest.approx([m[key] for m in two], abs=1e-5, rel=0), key
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4, rtol=0), name
