"""The CUDA paths against transformers on a GPU: bf16 logits, the Engine's greedy decoding (eager, compiled, as CUDA
graphs) and int8 weights. Marked `cuda` (`pytest -m cuda` runs only these; benchmarks/gpu_check.py does); on a
machine without a GPU every test here skips, naming the reason."""

from __future__ import annotations

import pytest
import torch

import openseek
from openseek.quantize import Int8Linear

from conftest import build_hf_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine"),
]

FAMILIES = ["qwen2", "llama", "deepseek_v3"]
PROMPTS = [[5, 17, 33, 2, 60, 71, 8], [40, 3], [11], [90, 12, 45, 45, 7, 1, 2, 3, 4, 5, 6, 70]]


def logits_on_cuda(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids.cuda())
    return getattr(out, "logits", out).float().cpu()


def greedy_of_transformers(hf, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_logits_match_transformers_on_cuda(saved_hf_models, kind):
    """bf16 weights on the GPU, ours against transformers' in bf16 there, within bf16 rounding (the CPU test's
    bound)."""
    directory, hf = saved_hf_models(kind)
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    hf_bf16 = build_hf_model(kind).to("cuda", torch.bfloat16)  # the same seed: the saved model's weights
    ours = openseek.load(directory, dtype=torch.bfloat16, device="cuda")
    assert ours.dtype == torch.bfloat16 and ours.device.type == "cuda"
    assert float((logits_on_cuda(ours, ids) - logits_on_cuda(hf_bf16, ids)).abs().max()) <= 0.05


@pytest.mark.parametrize("kind, mode", [(kind, mode) for kind in FAMILIES for mode in ("eager", "cuda_graphs")]
                         + [("qwen2", "compile+cuda_graphs")])
def test_engine_greedy_equals_transformers_generate_on_cuda(saved_hf_models, kind, mode):
    """float32 on the GPU: the Engine's greedy tokens are transformers' `generate`'s, with the decode step eager,
    replayed as CUDA graphs, and (qwen2) compiled then replayed; a second call replays the graphs the first captured."""
    directory, hf = saved_hf_models(kind)
    hf = hf.to("cuda")
    ours = openseek.load(directory, device="cuda")
    engine = openseek.Engine(ours, compile="compile" in mode, cuda_graphs="graphs" in mode)
    try:
        outs = engine.generate(PROMPTS, 10, temperature=0, stop_token_ids=[])
        expected = [greedy_of_transformers(hf, p, 10) for p in PROMPTS]
        assert [c[0].token_ids for c in outs] == expected
        if engine.cuda_graphs:
            graphs = dict(engine._generate_graphs.graphs)
            again = engine.generate(PROMPTS, 10, temperature=0, stop_token_ids=[])
            assert [c[0].token_ids for c in again] == expected
            assert engine._generate_graphs.graphs == graphs  # nothing captured anew
    finally:
        hf.to("cpu")


def test_cuda_graphs_serve_streaming_requests_as_generate_does(saved_hf_models):
    """The serving thread's batch has graphs of its own; streamed greedy tokens equal `generate`'s."""
    directory, _ = saved_hf_models("qwen2")
    ours = openseek.load(directory, device="cuda")
    engine = openseek.Engine(ours, max_batch_size=3, cuda_graphs=True)
    want = [c[0].token_ids for c in openseek.Engine(ours).generate(PROMPTS, 12, temperature=0, stop_token_ids=[])]
    try:
        got = [r.result(timeout=120).token_ids
               for r in [engine.submit(p, 12, temperature=0, stop_token_ids=[]) for p in PROMPTS]]
    finally:
        engine.close()
    assert got == want


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_int8_weights_on_cuda(saved_hf_models, kind):
    """int8 weight-only on the GPU: PyTorch's layout (`aten._weight_int8pack_mm`, not our CPU kernels' packing),
    logits within int8's error of transformers' float32, and the Engine decodes greedily as a full forward does."""
    directory, hf = saved_hf_models(kind)
    ours = openseek.load(directory, dtype=torch.bfloat16, device="cuda", quantize="int8")
    layers = [m for m in ours.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(layer.packed for layer in layers)
    assert all(layer.weight.device.type == "cuda" for layer in layers)
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = logits_on_cuda(ours, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 0.05  # the CPU test's bound for int8
    prompt = PROMPTS[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(ours(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    out = openseek.Engine(ours).generate([prompt], 6, temperature=0, stop_token_ids=[])[0][0]
    assert out.token_ids == seq[len(prompt):]


def test_int4_on_cuda_is_refused_naming_the_option(saved_hf_models):
    directory, _ = saved_hf_models("qwen2")
    with pytest.raises(ValueError, match="quantize='int4' has a kernel on the CPU only"):
        openseek.load(directory, dtype=torch.bfloat16, device="cuda", quantize="int4")
