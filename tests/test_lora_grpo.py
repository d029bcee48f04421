"""GRPO with LoRA: the reward rises with only adapters training, the reference policy is the base itself (adapters
disabled, no copy), resume is exact, and bad LoRA settings are refused before anything trains."""

from __future__ import annotations

import json

import pytest
import torch

import openseek
from openseek.cli import main as cli
from openseek.lora import AdapterError
from openseek.tasks import get_task
from openseek.tokenizer import Tokenizer
from openseek.train.grpo import GRPOConfig
from openseek.train.logprobs import completion_logprobs
from openseek.train.config import TrainConfig
from helpers_grpo import digit_share, grpo_args, metrics_of, tiny_model_dir



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("grpo_lora") / "model")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)




def test_short_lora_run_raises_the_mean_reward(model_dir, tmp_path):
    """As the full-parameter test (20 steps of P=4 × G=8 on the digit share), with rank-8 adapters only, on every
    projection and the head (a random tiny model's blocks barely move its output; its head does)."""
    run = tmp_path / "run"
    assert cli(grpo_args(model_dir, run, "--group-size", "8", "--prompts-per-step", "4", "--steps", "20",
                         "--lr", "1e-2", "--lora-rank", "8", "--lora-targets",
                         "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")) == 0
    metrics = metrics_of(run)
    first = sum(m["reward"] for m in metrics[:5]) / 5
    last = sum(m["reward"] for m in metrics[-5:]) / 5
    assert last > first + 0.1, (first, last)
    # The Engine rolled out with the adapters the loss sees: the same log-probs.
    assert all(m["rollout/logprob_abs_diff_max"] <= 1e-5 for m in metrics)
    report = json.loads((run / "report.json").read_text())
    assert 0 < report["trainable_parameters"] < report["parameters"] / 4  # rank 8 of width 64: a fifth
    checkpoint = run / "checkpoints" / "step_00000020"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert openseek.load(model_dir, adapter=checkpoint / "adapter").cfg.vocab_size > 0


def test_the_reference_is_the_base_with_adapters_disabled(model_dir, tmp_path, monkeypatch):
    from openseek.train import grpo as grpo_module

    calls = []
    original = grpo_module.completion_logprobs

    def spy(model, input_ids, padding_mask, prompt_len, temperature=1.0, entropy=True):
        out = original(model, input_ids, padding_mask, prompt_len, temperature, entropy)
        if not entropy:  # the reference's call
            calls.append((input_ids.clone(), padding_mask.clone(), prompt_len, out[0].clone()))
        return out

    copied = []
    deepcopy = grpo_module.copy.deepcopy
    monkeypatch.setattr(grpo_module, "completion_logprobs", spy)
    monkeypatch.setattr(grpo_module.copy, "deepcopy", lambda obj, *a, **k: copied.append(obj) or deepcopy(obj, *a, **k))
    model = openseek.load(model_dir, dtype=torch.float32)
    rows = get_task("arithmetic").generate(50, seed=0)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=12, beta=0.1, updates_per_rollout=2)
    run = tmp_path / "run"
    grpo_module.train(model, Tokenizer.from_dir(model_dir), rows, [digit_share], cfg,
                      TrainConfig(run_dir=str(run), steps=4, lr=3e-2, progress=False, lora_rank=4,
                                  precision="float32"))
    assert not any(isinstance(obj, openseek.Model) for obj in copied)  # no second copy of the weights
    metrics = metrics_of(run)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: the policy is the base
    assert metrics[1]["kl"] > 1e-5 and metrics[3]["kl"] > 1e-5  # the adapters moved the policy away from it
    base = openseek.load(model_dir, dtype=torch.float32)
    assert len(calls) == 2
    for input_ids, padding_mask, prompt_len, ref in calls:  # the second rollout's reference, after 2 updates, too
        with torch.no_grad():
            want, _ = completion_logprobs(base, input_ids, padding_mask, prompt_len, cfg.temperature)
        torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)


def test_lora_resume_is_exact(model_dir, tmp_path):
    """Adapters, their optimizer state, the data position and the RNG (LoRA dropout draws from it) come back."""
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    common = ["--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "8", "--lr", "1e-2",
              "--beta", "0.05", "--lora-rank", "4", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj,down_proj"]
    assert cli(grpo_args(model_dir, straight, *common, "--steps", "4")) == 0
    assert cli(grpo_args(model_dir, halted, *common, "--steps", "2")) == 0
    assert cli(grpo_args(model_dir, halted, *common, "--steps", "4", "--resume")) == 0
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints" / "step_00000004" / "adapter" / "adapter_model.safetensors")
    b = load_file(halted / "checkpoints" / "step_00000004" / "adapter" / "adapter_model.safetensors")
    assert len(a) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert [m["loss"] for m in metrics_of(straight)] == [m["loss"] for m in metrics_of(halted)]


@pytest.mark.parametrize("flags, error, match", [
    (["--lora-rank", "0"], ValueError, r"lora_rank=0: a LoRA rank must be a whole number of at least 1"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,qkv_proj"], AdapterError,
     (r"LoRA target 'qkv_proj' matches no linear layer of this qwen2 model; the layers that can be adapted are: "
      r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], ValueError, r"lora_dropout=1.5"),
])
def test_bad_lora_settings_are_refused_before_training(model_dir, tmp_path, flags, error, match):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "1 + 1"},
                                              {"role": "assistant", "content": "2"}]}) + "\n")
    for command in ("grpo", "sft"):
        run = tmp_path / command
        args = grpo_args(model_dir, run, "--steps", "1", *flags) if command == "grpo" else [
            "sft", "--model", str(model_dir), "--data", str(chats), "--run-dir", str(run), "--steps", "1", *flags]
        with pytest.raises(error, match=match):
            cli(args)
        assert not (run / "metrics.jsonl").exists()


def test_a_bf16_base_trains_float32_adapters(model_dir, tmp_path):
    """--lora-base-dtype bfloat16: the frozen base is held in bf16, the adapters stay float32, and a run goes
    through."""
    from openseek.train import grpo as grpo_module

    model = openseek.load(model_dir, dtype=torch.bfloat16)
    rows = get_task("arithmetic").generate(20, seed=0)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=8, beta=0.05)
    grpo_module.train(model, Tokenizer.from_dir(model_dir), rows, [digit_share], cfg,
                      TrainConfig(run_dir=str(tmp_path / "run"), steps=2, lr=1e-2, progress=False, lora_rank=4,
                                  lora_base_dtype="bfloat16"))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    assert all(m["loss"] == m["loss"] for m in metrics_of(tmp_path / "run"))  # finite, not NaN
