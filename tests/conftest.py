"""Shared fixtures: tiny random models built and saved with transformers (the peer), in temporary directories."""

from __future__ import annotations

import os

import pytest
import torch

import openseek.device
import openseek.kernels
from openseek.kernels import ops

if os.environ.get("OPENSEEK_TEST_AS_AVX2") == "1":
    # This process sees the CPU as an AVX2-only one (AMD Zen 2/3, Intel Core without AVX-512): no AVX-512 or AMX
    # flags, so only the avx2 level's kernels and no native bf16, as `make test` finds there. Tests that start
    # another Python process see the real CPU.
    AVX2_VIEW = frozenset(f for f in openseek.device.cpu_flags() if not f.startswith(("avx512", "amx")))
    openseek.device.cpu_flags = openseek.kernels.cpu_flags = lambda: AVX2_VIEW

def pytest_configure(config):
    config.addinivalue_line("markers", "kernels(*families): the kernel families ('dense', 'quantized') that a test "
                                       "taking the `level` fixture calls")


@pytest.fixture(params=ops.executable_levels())
def level(request):
    """Runs the test once per kernel level this CPU executes (the id names it: `test_x[avx2]`), inside
    `ops.use_level`, so that one machine tests every level's kernels. Skipped, with the reason, where
    OPENSEEK_KERNELS rules the level out (`0`, or another level's name: the run then stands for a machine of that
    level) or where the level lacks a family the test's `kernels` mark names (its extension is not in this build or
    did not build)."""
    name = request.param
    setting = os.environ.get("OPENSEEK_KERNELS", "auto").strip().lower()
    if setting in ops.OFF:
        pytest.skip("OPENSEEK_KERNELS=0: PyTorch's kernels only")
    if setting not in ops.AUTO and setting != name:
        pytest.skip(f"OPENSEEK_KERNELS={setting}: the {setting} level only")
    marker = request.node.get_closest_marker("kernels")
    with ops.use_level(name):
        for family in marker.args if marker else ():
            if not ops.has(family):
                pytest.skip(f"{name}: no {family} kernels here ({getattr(ops.LEVELS[name], family)} is not part of "
                            f"this build or did not build)")
        yield name


TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def hf_config(kind: str, **overrides):
    """A tiny transformers config of the given family; every DeepSeek variant the parity tests need."""
    import transformers

    if kind == "qwen2":
        cfg = dict(TINY, intermediate_size=128, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
        return transformers.Qwen2Config(**(cfg | overrides))
    if kind == "llama":
        cfg = dict(
            TINY, intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=32),
        )
        return transformers.LlamaConfig(**(cfg | overrides))
    if kind.startswith("deepseek_v3"):
        cfg = dict(
            TINY, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        )
        if kind == "deepseek_v3_yarn":
            cfg["rope_parameters"] = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32,
                                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                                          original_max_position_embeddings=64)
        if kind == "deepseek_v3_lite":
            cfg.update(q_lora_rank=None)
        if kind == "deepseek_v3_wide":  # latent and rope widths our absorbed-decode kernel takes (multiples of 16)
            cfg.update(kv_lora_rank=32, qk_rope_head_dim=16)
        return transformers.DeepseekV3Config(**(cfg | overrides))
    raise ValueError(kind)


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers model in float32; DeepSeek routers get a non-zero correction bias."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
        for name, p in model.named_parameters():  # bigger than the init so the logits are not all ~0
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def saved_hf_models(tmp_path_factory):
    """kind -> (directory of a saved random transformers model, that model in float32), built once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            hf = build_hf_model(kind)
            directory = tmp_path_factory.mktemp(kind)
            hf.save_pretrained(directory)
            built[kind] = directory, hf
        return built[kind]

    return get


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: save a random transformers model of a family and return (directory, model)."""

    def make(kind: str, **overrides):
        model = build_hf_model(kind, **overrides)
        directory = tmp_path / kind
        model.save_pretrained(directory)
        return directory, model

    return make


@pytest.fixture
def one_thread():
    """Tiny models run their many small ops faster on one thread, and far more steadily on a busy machine; the
    previous count is restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
