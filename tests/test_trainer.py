"""The one Trainer: learning, exact resume, balancing, non-finite stops, checkpoints, reports, schedules, losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

import openseek
from helpers_train import (
    TINY_DEEPSEEK,
    TINY_QWEN,
    pretrain_setup,
    read_metrics,
    successor_documents,
    unigram_entropy,
    write_corpus,
)
from openseek import data
from openseek.tokenizer import Tokenizer
from openseek.train.pretrain import NextTokenLoss, cross_entropy_sum
from openseek.train.routing import Routing, sequence_balance_loss
from openseek.train.config import TrainConfig, learning_rate
from openseek.train.trainer import Trainer, TrainingError, list_checkpoints
from openseek.train.muon import orthogonalise


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def _config(tmp_path, name="run", **overrides):
    base = dict(run_dir=str(tmp_path / name), steps=8, lr=3e-3, warmup_steps=2, progress=False, seed=0, threads="1",
                precision="float32")
    return TrainConfig(**(base | overrides))


@torch.no_grad()
def _eval_loss(model, tokenizer, docs, seq_len=64):
    rows = data.PackedRows(data.Records([docs]), tokenizer, seq_len, epochs=1)
    batch = data.collate_packed([next(rows) for _ in range(8)])
    labelled = (batch["labels"] != data.IGNORE).sum().item()
    loss = cross_entropy_sum(model(batch["input_ids"]), batch["labels"]).item() / labelled
    return loss, unigram_entropy(batch["labels"].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_on_the_kernel_equals_pytorchs_cross_entropy(dtype):
    """The pretraining loss (summed over labelled tokens, ignored labels skipped) and its gradient into the logits, on
    our log-prob kernel where it runs, against F.cross_entropy in float64."""
    from openseek import data

    torch.manual_seed(0)
    B, T, V = 3, 9, 301
    logits = (3 * torch.randn(B, T, V)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[0, -3:] = data.IGNORE
    labels[2, 0] = data.IGNORE
    labels[1, :2] = torch.tensor([0, V - 1])
    loss = cross_entropy_sum(logits, labels)
    loss.backward()
    wanted = logits.detach().double().requires_grad_()
    want = torch.nn.functional.cross_entropy(wanted.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE,
                                             reduction="sum")
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-5)
    rounding = 1e-6 if dtype is torch.float32 else 8e-3  # the gradient is rounded once to the logits' dtype
    torch.testing.assert_close(logits.grad.double(), wanted.grad, rtol=rounding, atol=rounding)
    assert not logits.grad[0, -3:].any() and not logits.grad[2, 0].any()  # ignored tokens get no gradient


def test_pretraining_drives_loss_far_below_unigram_entropy(tmp_path):
    """A tiny DeepSeek-V3 (MLA, MoE, MTP) learns the successor corpus: held-out loss << unigram entropy."""
    model, batches, tokenizer, _ = pretrain_setup(tmp_path, seq_len=64, batch_size=4)
    cfg = _config(tmp_path, steps=40, lr=1e-2, warmup_steps=4, balance_gamma=1e-3)
    report = Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss(mtp_weight=0.3, mtp_depths=1))
    held_out = write_corpus(tmp_path / "held_out.jsonl", successor_documents(100, seed=99))
    loss, entropy = _eval_loss(model, tokenizer, held_out)
    assert entropy > 3.0
    print(f"held-out loss {loss:.3f} vs unigram entropy {entropy:.3f}")
    assert loss < 0.3 * entropy, (loss, entropy)
    metrics = read_metrics(cfg.run_dir)
    assert len(metrics) == 40 and metrics[-1]["loss/mtp"] < metrics[0]["loss/mtp"]
    assert report["status"] == "completed" and report["tokens"] == 40 * 4 * 64


def _train(tmp_path, name, steps, stop_at=None, resume=False, **overrides):
    """Train a fresh tiny MoE model (same seed every time); `stop_at` simulates a crash before that step."""
    model, batches, tokenizer, _ = pretrain_setup(tmp_path / name, seq_len=16, batch_size=2)
    calls = {"n": 0}

    class Crashing(NextTokenLoss):
        def __call__(self, model, batch, counts=None):
            calls["n"] += 1
            if stop_at is not None and calls["n"] > (stop_at - 1) * 2:
                raise KeyboardInterrupt
            return super().__call__(model, batch, counts)

    cfg = _config(tmp_path, name, steps=steps, grad_accum=2, balance_gamma=1e-2, checkpoint_every=2,
                  resume=resume, **overrides)
    trainer = Trainer(model, cfg, tokenizer)
    objective = Crashing(mtp_weight=0.5, balance_alpha=1e-2, mtp_depths=model.cfg.num_nextn_predict_layers)
    if stop_at is None:
        trainer.fit(batches, objective)
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(batches, objective)
    return model


def test_resume_is_bitwise_exact(tmp_path):
    straight = _train(tmp_path, "straight", 8)
    _train(tmp_path, "resumed", 8, stop_at=6)  # steps 1-5 done, checkpoints at 2 and 4
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_00000002", "step_00000004"]
    resumed = _train(tmp_path, "resumed", 8, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(n.endswith("e_score_correction_bias") and t.abs().sum() > 0 for n, t in resumed.state_dict().items())
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed")]
    assert steps == list(range(1, 9))  # the lines of step 5 written before the crash were dropped on resume
    assert read_metrics(tmp_path / "resumed")[-1]["loss"] == read_metrics(tmp_path / "straight")[-1]["loss"]


def test_muon_option_trains_and_resumes_exactly(tmp_path):
    straight = _train(tmp_path, "straight", 6, optimizer="muon")
    _train(tmp_path, "resumed", 6, stop_at=4, optimizer="muon")
    resumed = _train(tmp_path, "resumed", 6, resume=True, optimizer="muon")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [m["loss"] for m in read_metrics(tmp_path / "straight")]
    assert losses[-1] < losses[0]
    g = torch.randn(3, 24, 40)  # batched, wide and tall alike: singular values pushed close to 1
    for matrix in (g, g.transpose(1, 2)):
        s = torch.linalg.svdvals(orthogonalise(matrix))
        assert s.min() > 0.5 and s.max() < 1.3


def test_checkpoints_are_self_contained_and_rotated(tmp_path):
    model, batches, tokenizer, _ = pretrain_setup(tmp_path, seq_len=16, batch_size=2)
    cfg = _config(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=2)
    Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss())
    kept = list_checkpoints(cfg.run_dir)
    assert [p.name for p in kept] == ["step_00000004", "step_00000006"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    last = kept[-1]
    loaded = openseek.load(last)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    tok = Tokenizer.from_dir(last)
    assert json.loads((last / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert tok.encode("w1 w2") == tokenizer.encode("w1 w2")
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["record"] > 0
    assert torch.load(last / "optimizer.pt", weights_only=True)["state"]


def test_report_cost_and_plot(tmp_path):
    model, batches, tokenizer, _ = pretrain_setup(tmp_path, model_cfg=TINY_QWEN, seq_len=16, batch_size=2)
    cfg = _config(tmp_path, steps=3, price_per_device_hour=3.5)
    report = Trainer(model, cfg, tokenizer, flops_per_token=1000.0).fit(batches, NextTokenLoss())
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["tokens"] == 3 * 2 * 16 and saved["total_flops"] == 1000.0 * 96
    assert saved["device_hours"] == pytest.approx(saved["wall_time_s"] / 3600)
    assert saved["cost"] == pytest.approx(saved["device_hours"] * 3.5)
    assert saved["final_loss"] == read_metrics(cfg.run_dir)[-1]["loss"] == report["final_loss"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "![loss](loss.png)" in (tmp_path / "run" / "report.md").read_text()
    m = read_metrics(cfg.run_dir)[-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time/data", "time/update", "time/step", "data/epoch"} <= set(m)


def test_aux_loss_free_balancing_lowers_imbalance(tmp_path):
    def imbalance(gamma):
        model, batches, tokenizer, _ = pretrain_setup(tmp_path / str(gamma), seq_len=32, batch_size=4)
        cfg = _config(tmp_path, f"g{gamma}", steps=30, balance_gamma=gamma)
        Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss())
        last = [m["expert_load_max_mean"] for m in read_metrics(cfg.run_dir)[-10:]]
        return sum(last) / len(last)

    off, on = imbalance(0.0), imbalance(5e-3)
    print(f"expert load max/mean over the last 10 steps: γ=0 {off:.3f}, γ=5e-3 {on:.3f}")
    assert on < 0.8 * off, (on, off)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, batches, tokenizer, _ = pretrain_setup(tmp_path, seq_len=16, batch_size=2)
    calls = {"n": 0}

    class Exploding(NextTokenLoss):
        def __call__(self, model, batch, counts=None):
            calls["n"] += 1
            loss, metrics = super().__call__(model, batch, counts)
            return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    cfg = _config(tmp_path, steps=10, checkpoint_every=2)
    trainer = Trainer(model, cfg, tokenizer)
    with pytest.raises(TrainingError, match=r"at step 5 the loss is nan.*step_00000004"):
        trainer.fit(batches, Exploding())
    good = list_checkpoints(cfg.run_dir)[-1]
    assert good.name == "step_00000004"
    loaded = openseek.load(good)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # the bad step changed nothing
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"].startswith("stopped: non-finite training: at step 5") and report["steps"] == 4


def test_learning_rate_schedules():
    cosine = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [learning_rate(cosine, s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert learning_rate(cosine, 10) == pytest.approx(0.1)
    assert learning_rate(cosine, 6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    wsd = TrainConfig(steps=10, lr=1.0, warmup_steps=1, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [learning_rate(wsd, s) for s in range(10)] == [1.0] * 8 + [0.5, 0.0]
    with pytest.raises(ValueError, match="schedule='linear'"):
        TrainConfig(schedule="linear")


def test_mtp_loss_targets_and_sequence_balance_loss():
    torch.manual_seed(0)
    cfg = openseek.ModelConfig.from_hf(dict(TINY_DEEPSEEK, vocab_size=50, num_nextn_predict_layers=2))
    model = openseek.Model(cfg)
    tokens = torch.randint(0, 50, (2, 13))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    loss, metrics = NextTokenLoss(mtp_weight=0.5, mtp_depths=2)(model, batch)
    logits, hidden = model(batch["input_ids"], return_hidden=True)
    mtp = model.mtp_logits(hidden, batch["input_ids"])
    # depth k at position i predicts token i + k + 1
    expected = [torch.nn.functional.cross_entropy(lg.flatten(0, 1), tokens[:, k + 1:].flatten())
                for k, lg in enumerate(mtp, 1)]
    assert metrics["loss/mtp"] == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(metrics["loss/lm"] + 0.5 * metrics["loss/mtp"], rel=1e-6)

    # Balanced routing scores 1 per layer; everything on the same experts scores E/K x their score share.
    E, K, T, layers = 8, 2, 4, 3
    balanced = [Routing(None, torch.full((T, E), 0.5), torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]))] * layers
    assert sequence_balance_loss(balanced, 1).item() == pytest.approx(layers * 1.0)
    collapsed = [Routing(None, torch.full((T, E), 0.5), torch.tensor([[0, 1]] * T))] * layers
    assert sequence_balance_loss(collapsed, 1).item() == pytest.approx(layers * (E / K) * (2 / E))


def test_mtp_loss_on_the_first_rows_only():
    """`mtp_rows`: the main loss over every row, the MTP loss (term and count) over the first rows alone."""
    torch.manual_seed(0)
    model = openseek.Model(openseek.ModelConfig.from_hf(dict(TINY_DEEPSEEK, vocab_size=50, num_nextn_predict_layers=1)))
    tokens = torch.randint(0, 50, (4, 13))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    batch["labels"][3, 7:] = data.IGNORE
    first = {k: v[:2] for k, v in batch.items()}
    loss, metrics = NextTokenLoss(mtp_weight=0.3, mtp_depths=1, mtp_rows=2)(model, batch)
    lm_all, _ = NextTokenLoss()(model, batch)
    both_first, first_metrics = NextTokenLoss(mtp_weight=0.3, mtp_depths=1)(model, first)
    lm_first, _ = NextTokenLoss()(model, first)
    assert loss.item() == pytest.approx((lm_all + both_first - lm_first).item(), rel=1e-6)
    assert metrics["loss/mtp"] == pytest.approx(first_metrics["loss/mtp"], rel=1e-6)
    assert NextTokenLoss(mtp_weight=0.3, mtp_depths=1, mtp_rows=2).counts(batch) == {"lm": 43.0, "mtp1": 22.0}
    with pytest.raises(ValueError, match="mtp_rows=0"):
        NextTokenLoss(mtp_weight=0.3, mtp_depths=1, mtp_rows=0)


def test_bf16_autocast_path_runs_moe_in_bf16():
    """The trainer's GPU path wraps the objective in bf16 autocast; grouped expert matmuls must follow it (they are
    not autocast-aware by themselves) and the result stay close to float32. Checked with CPU autocast."""
    torch.manual_seed(0)
    model = openseek.Model(openseek.ModelConfig.from_hf(dict(TINY_DEEPSEEK, vocab_size=64)))
    tokens = torch.randint(0, 64, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    reference, _ = NextTokenLoss(mtp_weight=0.3, mtp_depths=1)(model, batch)
    experts = model.layers[1].mlp.experts
    x, ids, weights = torch.randn(5, 64), torch.tensor([[0, 1]] * 5), torch.ones(5, 2)
    routed_fp32 = experts(x, ids, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = NextTokenLoss(mtp_weight=0.3, mtp_depths=1)(model, batch)
        routed = experts(x, ids, weights)
    loss.backward()
    assert routed.dtype == torch.float32  # combined back into the float32 residual stream
    assert not torch.equal(routed, routed_fp32)  # ...after matmuls in bf16
    assert torch.allclose(routed, routed_fp32, atol=2e-2 * routed_fp32.abs().max().item())
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in experts.parameters())


def test_a_wall_time_budget_stops_the_run_at_the_first_step_past_it(tmp_path):
    """`max_seconds`: the first step always ends past a budget of a nanosecond, so the run stops after it, completed
    and checkpointed."""
    model, batches, tokenizer, _ = pretrain_setup(tmp_path / "budget", seq_len=16, batch_size=2)
    cfg = _config(tmp_path, "budget", steps=50, max_seconds=1e-9)
    report = Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss())
    assert report["steps"] == 1 and report["status"] == "completed"
    assert [p.name for p in list_checkpoints(tmp_path / "budget")] == ["step_00000001"]
    with pytest.raises(ValueError, match="max_seconds=-1"):
        _config(tmp_path, max_seconds=-1)
