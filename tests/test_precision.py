"""`--precision`: bf16 autocast where the hardware has it, float32 elsewhere, refused (not emulated) on demand
where it cannot run natively; bf16 training reaches float32's loss; the Engine runs inside the same autocast."""

from __future__ import annotations

import pytest
import torch

import openseek
from openseek import device as device_module
from openseek.device import resolve_precision
from openseek.train.pretrain import NextTokenLoss
from openseek.train.config import TrainConfig
from openseek.train.trainer import Trainer
from helpers_train import TINY_DEEPSEEK, pretrain_setup, read_metrics


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))


def test_auto_is_float32_where_bf16_would_be_emulated(cpu_without_bf16):
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="--precision bf16: this cpu has no native bf16 matmuls"):
        resolve_precision("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision='fp8': expected auto, float32 or bf16"):
        resolve_precision("fp8", torch.device("cpu"))


def test_auto_is_bf16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu"), hidden_size=512) == "bf16"
    assert resolve_precision("auto", torch.device("cpu"), hidden_size=96) == "float32"  # overhead-bound: casts cost
    assert resolve_precision("bf16", torch.device("cpu"), hidden_size=96) == "bf16"  # asked for: honoured
    assert resolve_precision("float32", torch.device("cpu")) == "float32"


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_BF16", True),
                                         ("AVX512_CORE_AMX", True)])
def test_a_onednn_cap_below_bf16_makes_bf16_emulated(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA=AVX2 (how this project runs as an AVX2-only CPU would) makes PyTorch's bf16 matmuls
    emulated even on a CPU with AVX-512 BF16, so `auto` must not choose them."""
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert device_module.native_bf16(torch.device("cpu")) is native
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "float32")


def test_bf16_pretraining_reaches_the_float32_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))  # run bf16 on any CPU
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    final = {}
    for precision in ("float32", "bf16"):
        model, batches, tokenizer, _ = pretrain_setup(tmp_path / precision, seq_len=32, batch_size=4)
        cfg = TrainConfig(run_dir=str(tmp_path / precision / "run"), steps=40, lr=1e-2, warmup_steps=4,
                          progress=False, threads="1", precision=precision, balance_gamma=1e-3)
        report = Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss(mtp_weight=0.3, mtp_depths=1))
        assert report["precision"] == precision
        final[precision] = sum(m["loss"] for m in read_metrics(cfg.run_dir)[-5:]) / 5
    assert final["float32"] < 1.5  # it learned (unigram entropy is ~3.4)
    assert abs(final["bf16"] - final["float32"]) <= 0.02 * final["float32"], final


def test_the_engine_generates_inside_bf16_autocast():
    """GRPO rolls out inside the loss's precision context: caches take the bf16 projections in their dtype."""
    torch.manual_seed(0)
    for cfg in (openseek.ModelConfig.from_hf(dict(TINY_DEEPSEEK, vocab_size=64)),
                openseek.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)):
        model = openseek.Model(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (out,), = openseek.Engine(model).generate([[1, 2, 3, 4]], 6, temperature=0, stop_token_ids=[],
                                                      logprobs=True)
            logits = model(torch.tensor([[1, 2, 3, 4, *out.token_ids[:-1]]]))[0, 3:].float()
        assert len(out.token_ids) == 6
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=0.05)
