"""GRPO end to end on a tiny model: the reward rises, every metric is logged, the Engine's log-probs are the
trainer's, μ updates reuse one rollout, β loads a reference only when non-zero, resume is exact, bad input is named."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import openseek
from openseek.cli import main as cli
from openseek.engine.engine import stop_token_ids
from openseek.rewards import RewardError
from openseek.tasks import get_task
from openseek.tasks.math_file import DatasetError
from openseek.tokenizer import Tokenizer
from openseek.train.grpo import GRPOConfig
from openseek.train.logprobs import completion_logprobs
from openseek.train.rollout import encode_prompt, load_prompt_file
from openseek.train.config import TrainConfig
from helpers_grpo import REWARD, digit_share, grpo_args, metrics_of, rollout_once, tiny_model_dir



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("grpo") / "model")




pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def test_short_run_raises_the_mean_reward(model_dir, tmp_path):
    """20 steps of P=4 × G=8 on arithmetic prompts with a reward a random model can move (the digit share)."""
    run = tmp_path / "run"
    assert cli(grpo_args(model_dir, run, "--group-size", "8", "--prompts-per-step", "4", "--steps", "20",
                         "--lr", "3e-3")) == 0
    metrics = metrics_of(run)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    first = sum(m["reward"] for m in metrics[:5]) / 5
    last = sum(m["reward"] for m in metrics[-5:]) / 5
    assert last > first + 0.1, (first, last)
    for key in ("reward", "reward_std", "rewards/digit_share/mean", "rewards/digit_share/std",
                "completion_length/mean", "completion_length/max", "clip_fraction", "entropy", "loss",
                "time/step", "time/generation", "time/scoring", "time/update", "time/refresh", "time/wall"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    m = metrics[-1]
    assert m["time/generation"] > 0 and m["time/update"] > 0
    assert m["time/generation"] + m["time/scoring"] + m["time/update"] + m["time/refresh"] == pytest.approx(
        m["time/step"], rel=1e-6)
    assert all(m["time/wall"] >= m["time/step"] for m in metrics)  # the whole step, between one log and the next
    assert all(m["clip_fraction"] == 0.0 for m in metrics)  # μ = 1: the ratio to the rollout is 1
    # Rollouts and loss see the same weights in the same precision: their log-probs agree to float32 rounding.
    assert all(0 <= m["rollout/logprob_abs_diff_mean"] <= m["rollout/logprob_abs_diff_max"] <= 1e-5 for m in metrics)
    assert "kl" not in m  # β = 0
    assert (run / "report.md").is_file() and (run / "rollouts.png").is_file()
    assert "rollouts.png" in (run / "report.md").read_text()
    checkpoint = run / "checkpoints" / "step_00000020"
    assert openseek.load(checkpoint).cfg.vocab_size == openseek.load(model_dir).cfg.vocab_size


def test_grad_accum_splits_each_rollout_from_the_command_line(model_dir, tmp_path):
    run = tmp_path / "run"
    assert cli(grpo_args(model_dir, run, "--group-size", "4", "--prompts-per-step", "2", "--steps", "2",
                         "--grad-accum", "2", "--beta", "0.04")) == 0
    metrics = metrics_of(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["tokens"] > 0 and math.isfinite(m["loss"]) and m["kl"] >= 0 for m in metrics)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[0]["clip_fraction"] == 0.0
    with pytest.raises(ValueError, match="grad_accum=16 is more micro-batches than the 8 completions"):
        cli(grpo_args(model_dir, tmp_path / "too_many", "--group-size", "4", "--prompts-per-step", "2",
                      "--steps", "1", "--grad-accum", "16"))


def test_engine_logprobs_are_the_trainers(model_dir):
    """The ratio's denominator comes from the Engine; on the first update it must be the policy's own log-prob."""
    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(8, seed=0)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=12, temperature=0.7)
    batch, _ = rollout_once(model, tokenizer, rows, [digit_share], cfg)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, batch.input_ids, batch.padding_mask, batch.prompt_len, 0.7)
    mask = batch.completion_mask
    assert mask.sum() > 8
    torch.testing.assert_close(logprobs[mask], batch.rollout_logprobs[mask], atol=2e-5, rtol=0)


def test_mu_updates_reuse_one_rollout_and_beta_loads_a_reference(model_dir, tmp_path, monkeypatch):
    from openseek.train import grpo as grpo_module

    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(50, seed=0)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=12, updates_per_rollout=2, beta=0.1)
    run = tmp_path / "run"
    grpo_module.train(model, tokenizer, rows, [digit_share], cfg,
                      TrainConfig(run_dir=str(run), steps=4, lr=1e-2, progress=False, schedule="constant",
                                  precision="float32"))
    metrics = metrics_of(run)
    generated = [m["time/generation"] > 0 for m in metrics]
    assert generated == [True, False, True, False]  # one rollout per μ = 2 updates
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert metrics[1]["kl"] > 1e-5  # after an update the policy has moved away from it
    assert metrics[1]["clip_fraction"] > 0  # second update on the same rollout: ratios leave [1-ε, 1+ε]

    copied = []
    original = grpo_module.copy.deepcopy

    def spy(obj, *args, **kwargs):
        copied.append(type(obj).__name__)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(grpo_module.copy, "deepcopy", spy)
    cfg0 = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=8, beta=0.0)
    grpo_module.train(model, tokenizer, rows, [digit_share], cfg0,
                      TrainConfig(run_dir=str(tmp_path / "b0"), steps=1, progress=False, precision="float32"))
    assert "Model" not in copied  # β = 0 loads no reference model
    assert "kl" not in metrics_of(tmp_path / "b0")[0]


def test_dynamic_sampling_drops_groups_without_signal(model_dir):
    """Rows with an even `a` get the same reward for every completion: their groups are dropped and refilled."""
    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(64, seed=0)

    def half_flat(completions, prompts, a, **_):
        return [0.5 if x % 2 == 0 else s for x, s in zip(a, digit_share(completions, prompts))]

    cfg = GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=8, dynamic_sampling=True)
    batch, m = rollout_once(model, tokenizer, rows, [half_flat], cfg)
    assert m["dynamic_sampling/dropped_groups"] > 0 and m["dynamic_sampling/rounds"] >= 2
    assert m["groups_without_signal"] == 0
    assert batch.advantages.view(4, 4).abs().sum(1).gt(0).all()  # every kept group carries a gradient


def test_overlong_shaping_enters_the_reward(model_dir):
    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(8, seed=0)

    def zero(completions, prompts, **_):
        return [0.0] * len(completions)

    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=10, overlong_buffer=4, overlong_penalty=2.0)
    batch, m = rollout_once(model, tokenizer, rows, [zero], cfg)
    lengths = batch.completion_mask.sum(1).tolist()
    eos = set(stop_token_ids(model.cfg, tokenizer))
    last = [int(batch.input_ids[i, batch.prompt_len + n - 1]) for i, n in enumerate(lengths)]
    cut = [n == 10 and token not in eos for n, token in zip(lengths, last)]  # a completion may stop on its 10th
    assert sum(cut) >= 4  # a random model rarely stops within 10 tokens
    assert m["completion_length/truncated"] == pytest.approx(sum(cut) / len(lengths))
    # the ramp: 0 up to 10 - 4 tokens, then linearly down to -2 at max_new_tokens
    want = sum(-2.0 * min(max((n - 6) / 4, 0.0), 1.0) for n in lengths) / len(lengths)
    assert m["reward"] == pytest.approx(want) and m["reward"] < -1.0


def test_resume_is_exact(model_dir, tmp_path):
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    common = ["--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "8", "--lr", "1e-2",
              "--beta", "0.05"]
    assert cli(grpo_args(model_dir, straight, *common, "--steps", "4")) == 0
    assert cli(grpo_args(model_dir, halted, *common, "--steps", "2")) == 0
    assert cli(grpo_args(model_dir, halted, *common, "--steps", "4", "--resume")) == 0
    a = openseek.load(straight / "checkpoints" / "step_00000004").state_dict()
    b = openseek.load(halted / "checkpoints" / "step_00000004").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    rewards = lambda run: [m["reward"] for m in metrics_of(run)]  # noqa: E731
    assert rewards(straight) == rewards(halted)


def test_prompt_templates(model_dir):
    tokenizer = Tokenizer.from_dir(model_dir)
    text, ids = encode_prompt(tokenizer, "What is 2 + 2?", "r1-zero")
    assert text.startswith("A conversation between User and Assistant.")
    assert text.endswith("User: What is 2 + 2?. Assistant:")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == text
    text, ids = encode_prompt(tokenizer, "What is 2 + 2?", "chat")
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert text.endswith("<think>\n")  # R1's chat template opens the think block: the format reward knows it
    assert ids.count(tokenizer.bos_token_id) == 1


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, why", [
    (lambda c, p, **_: [1.0] * (len(c) - 1), "returned 31 rewards for 32 completions"),
    (lambda c, p, **_: None, "returned NoneType"),
    (lambda c, p, **_: ["good"] * len(c), "returned 'good' (str) at position 0"),
])
def test_bad_reward_output_names_the_function(model_dir, bad, why):
    model = openseek.load(model_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = get_task("arithmetic").generate(8, seed=0)
    bad.__qualname__ = "my_reward"
    with pytest.raises(RewardError, match=re.escape(f"reward function my_reward {why}")):
        rollout_once(model, tokenizer, rows, [digit_share, bad], GRPOConfig(prompts_per_step=4, max_new_tokens=4))


def test_dataset_without_a_prompt_column_lists_its_columns(tmp_path, model_dir):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"text": "hello", "label": 3}) + "\n")
    with pytest.raises(DatasetError, match=r"data.jsonl line 2: no usable prompt column.*has columns: text, label"):
        load_prompt_file(path)
    with pytest.raises(DatasetError, match="has columns: text, label"):
        cli(["grpo", "--model", str(model_dir), "--dataset", str(path), "--reward", REWARD])


def test_dataset_rows_keep_their_columns_and_gold_answers(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "Two apples and one more?", "answer": "2 + 1 = 3\n#### 3",
                                "level": 1}) + "\n" + json.dumps({"problem": "Say hi", "style": "short"}) + "\n")
    rows = load_prompt_file(path)
    assert rows[0]["prompt"] == "Two apples and one more?" and rows[0]["answer"] == "3" and rows[0]["level"] == 1
    assert rows[1] == {"problem": "Say hi", "style": "short", "prompt": "Say hi"}


def test_group_size_one_is_refused_on_the_command_line(model_dir, tmp_path):
    with pytest.raises(ValueError, match="--group-size 1 cannot be used with std-normalised advantages: the "
                                         "standard deviation of a group of one completion is undefined"):
        cli(grpo_args(model_dir, tmp_path / "r", "--group-size", "1"))
    assert not (tmp_path / "r").exists()


def test_math_dataset_defaults_to_accuracy_and_format(model_dir, tmp_path):
    """A GSM8K-style file: the default rewards are math-verify accuracy on `answer` plus R1's format reward, and
    `accuracy` is logged."""
    from openseek.rewards import accuracy_reward, format_reward
    from openseek.train.rollout import resolve_rewards

    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i}\n#### {2 * i}"})
                            + "\n" for i in range(4)))
    rows = load_prompt_file(path)
    fns, accuracy_fn = resolve_rewards(None, None, rows)
    assert fns == [accuracy_reward, format_reward] and accuracy_fn is accuracy_reward
    model = openseek.load(model_dir, dtype=torch.float32)
    _, m = rollout_once(model, Tokenizer.from_dir(model_dir), rows, fns,
                        GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=4), accuracy_fn=accuracy_fn)
    assert m["accuracy"] == m["rewards/accuracy_reward/mean"] == 0.0  # a random model answers nothing
    assert m["rewards/format_reward/mean"] == 0.0


def test_a_raising_reward_scores_zero_and_training_goes_on(model_dir, caplog):
    model = openseek.load(model_dir, dtype=torch.float32)
    rows = get_task("arithmetic").generate(8, seed=0)

    def broken(completions, prompts, **_):
        raise RuntimeError("verifier crashed")

    _, m = rollout_once(model, Tokenizer.from_dir(model_dir), rows, [digit_share, broken],
                        GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=4))
    assert m["rewards/broken/mean"] == 0.0 and m["rewards/digit_share/mean"] > 0
    assert "verifier crashed" in caplog.text


def test_reward_weights_combine_the_functions(model_dir):
    model = openseek.load(model_dir, dtype=torch.float32)
    rows = get_task("arithmetic").generate(8, seed=0)

    def one(completions, prompts, **_):
        return [1.0] * len(completions)

    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=6)
    _, m = rollout_once(model, Tokenizer.from_dir(model_dir), rows, [digit_share, one], cfg, weights=[2.0, 0.5])
    assert m["reward"] == pytest.approx(2.0 * m["rewards/digit_share/mean"] + 0.5)
    with pytest.raises(ValueError, match="--reward-weights has 1 values for 2 reward functions"):
        rollout_once(model, Tokenizer.from_dir(model_dir), rows, [digit_share, one], cfg, weights=[1.0])


def test_fast_rollouts_from_a_bf16_int8_view_are_corrected_and_learn(model_dir, tmp_path):
    """The Engine samples a bf16 + int8 view of the policy, refreshed after every update; the ratio's old log-probs
    are the trainer's own and token_tis (the default with a view) reweights the sampled tokens."""
    run = tmp_path / "run"
    assert cli(grpo_args(model_dir, run, "--group-size", "8", "--prompts-per-step", "4", "--steps", "20",
                         "--lr", "3e-3", "--rollout-dtype", "bfloat16", "--rollout-quantize", "int8")) == 0
    metrics = metrics_of(run)
    assert all(0.0 < m["rollout/logprob_abs_diff_max"] for m in metrics)  # the view differs from the policy
    assert all(m["rollout/is_truncated_fraction"] <= 0.05 for m in metrics)
    assert all(abs(m["rollout/is_ratio_mean"] - 1) < 0.1 for m in metrics)
    first = sum(m["reward"] for m in metrics[:5]) / 5
    last = sum(m["reward"] for m in metrics[-5:]) / 5
    assert last > first + 0.1, (first, last)


def test_the_rollout_view_follows_the_policy():
    import copy

    from openseek.config import ModelConfig
    from openseek.model import Model
    from openseek.train.rollout import refresh_view, rollout_view

    torch.manual_seed(0)
    policy = Model(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[1]))
    view = rollout_view(policy, torch.float32)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(view(ids), policy(ids), rtol=0, atol=0)
    before = copy.deepcopy(view.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1)
    refresh_view(view, policy)
    torch.testing.assert_close(view(ids), policy(ids), rtol=0, atol=0)
    assert not torch.equal(before["layers.0.self_attn.q_proj.weight"], view.layers[0].self_attn.q_proj.weight)


def test_an_int8_view_of_a_moe_policy_follows_it():
    """An int8 rollout view of a DeepSeek-style policy: MLA's q_a/kv_a fused, the routed experts int8 stacks — after
    the policy changes, `refresh_view` re-quantises both, and the view's logits stay those of the policy within int8's
    rounding."""
    from openseek.config import ModelConfig
    from openseek.kernels import ops
    from openseek.model import Model
    from openseek.quantize import GroupedInt8
    from openseek.train.rollout import refresh_view, rollout_view

    if not ops.has("quantized"):
        pytest.skip("no int8 kernel at this kernel level: the view keeps its experts in bf16")
    torch.manual_seed(0)
    policy = Model(ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                               n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                               first_k_dense_replace=1, eos_token_id=[1]))
    policy.init_weights()
    view = rollout_view(policy, torch.bfloat16, "int8")
    assert isinstance(view.layers[1].mlp.experts.gate_up_proj, GroupedInt8)
    assert view.layers[1].self_attn.q_kv_a_proj is not None
    ids = torch.randint(0, 64, (2, 9))

    def gap():
        with torch.no_grad():
            want = policy(ids)
            return float((view(ids).float() - want).norm() / want.norm())

    assert gap() < 0.05
    stack = view.layers[1].mlp.experts.gate_up_proj.weight.clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(-1.0)
    refresh_view(view, policy)
    assert not torch.equal(stack, view.layers[1].mlp.experts.gate_up_proj.weight) and gap() < 0.05


def test_an_int8_view_fuses_qkv_and_gate_up_and_gives_bitwise_the_same_logits(monkeypatch):
    """q/k/v and gate/up are one int8 matmul each in an int8 rollout view: per-row scales, activations quantised once
    per row either way, so the logits equal the unfused view's bit for bit, before and after a refresh."""
    from openseek.train import rollout
    from openseek.config import ModelConfig
    from openseek.kernels import ops
    from openseek.model import Model

    if not ops.has("quantized"):
        pytest.skip("no int8 kernel at this kernel level: the view stays unfused")
    torch.manual_seed(0)
    policy = Model(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[1]))
    fused = rollout.rollout_view(policy, torch.bfloat16, "int8")
    monkeypatch.setattr(rollout, "fuse_projections", lambda model: None)
    separate = rollout.rollout_view(policy, torch.bfloat16, "int8")
    assert fused.layers[0].self_attn.qkv_proj.out_features == 128 and not hasattr(fused.layers[0].self_attn, "q_proj")
    assert fused.layers[1].mlp.gate_up_proj.out_features == 256 and separate.layers[1].mlp.gate_up_proj is None
    ids = torch.randint(0, 64, (3, 9))
    with torch.inference_mode():
        assert torch.equal(fused(ids), separate(ids))
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1)
    rollout.refresh_view(fused, policy)
    rollout.refresh_view(separate, policy)
    with torch.inference_mode():
        assert torch.equal(fused(ids), separate(ids))


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_rollout_quantize_auto_is_int8_exactly_for_a_bf16_view_on_a_cpu_with_the_kernel(precision, tmp_path):
    from openseek.config import ModelConfig
    from openseek.device import native_bf16
    from openseek.kernels import ops
    from openseek.model import Model
    from openseek.quantize import Int8Linear
    from openseek.train.rollout import rollout_policy
    from openseek.train.config import TrainConfig
    from openseek.train.trainer import Trainer

    model = Model(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[1]))
    cfg = TrainConfig(run_dir=str(tmp_path), device="cpu", progress=False, precision=precision)
    if precision == "bf16" and not native_bf16(torch.device("cpu")):  # an AVX2 CPU: bf16 would be emulated
        with pytest.raises(ValueError, match="--precision bf16: this cpu has no native bf16 matmuls"):
            Trainer(model, cfg)
        return
    trainer = Trainer(model, cfg)
    view = rollout_policy(trainer, GRPOConfig())  # rollout_dtype and rollout_quantize: auto
    if precision == "float32":
        assert view is trainer.model  # the trained weights themselves: nothing to quantise
        return
    int8 = [n for n, m in view.named_modules() if isinstance(m, Int8Linear)]
    if not ops.has("quantized"):  # no int8 kernel: PyTorch's int8 matmul would be no faster than bf16
        assert int8 == []
    else:
        assert {"layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"} <= set(int8)
    explicit = rollout_policy(trainer, GRPOConfig(rollout_quantize="none"))
    assert not any(isinstance(m, Int8Linear) for m in explicit.modules())
