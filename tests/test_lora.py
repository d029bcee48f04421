"""LoRA in PEFT's format: parity both ways against PEFT (a peer, never imported by openseek) on tiny random qwen2,
llama and deepseek_v3 checkpoints, merged weights against transformers, the Engine on an adapted model, and bad
input named before anything trains."""

from __future__ import annotations

import json

import pytest
import torch

import openseek
from openseek.cli import main as cli
from openseek.engine import Engine
from openseek.lora import AdapterError, LoRAConfig, adapters_disabled, apply_lora, lora_modules, save_adapter
from helpers_train import successor_documents, tiny_tokenizer

peft = pytest.importorskip("peft")
FAMILIES = ["qwen2", "llama", "deepseek_v3"]
# What PEFT adapts in each family: every linear layer of the blocks for GQA; for DeepSeek-V3 MLA's projections
# only, because PEFT (0.21, transformers 5) turns gate/up/down_proj targets into the fused routed experts and drops
# the dense and shared-expert MLPs. openseek's shared-expert adapters are checked against transformers by merging.
TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def peft_adapter(hf_model, directory, targets, rank=4, alpha=8, **config):
    """A PEFT adapter with random, non-zero A and B (init_lora_weights=False), saved by PEFT."""
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config)
    model = peft.get_peft_model(hf_model, lora)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_peft_adapter_loads_with_peft_parity(hf_model_dir, tmp_path, kind):
    base_dir, hf_model = hf_model_dir(kind)
    peft_model = peft_adapter(hf_model, tmp_path / "adapter", TARGETS[kind])
    x = ids(hf_model.config.vocab_size)
    with torch.no_grad():
        want = peft_model(x).logits
        model = openseek.load(base_dir, dtype=torch.float32, adapter=tmp_path / "adapter")
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(lora_modules(model)) == sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    with torch.no_grad(), adapters_disabled(model), peft_model.disable_adapter():  # both compute the base
        torch.testing.assert_close(model(x), peft_model(x).logits, atol=1e-5, rtol=0)


def chats_file(path):
    docs = successor_documents(24, seed=5)
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "continue: " + " ".join(d.split()[:2])},
        {"role": "assistant", "content": " ".join(d.split()[2:6])},
    ]}) + "\n" for d in docs))
    return path


def base_with_tokenizer(hf_model_dir, kind):
    """A tiny random transformers checkpoint of `kind` with a tokenizer, so `openseek sft` can train on it."""
    tokenizer = tiny_tokenizer(successor_documents(100))
    directory, hf_model = hf_model_dir(kind, vocab_size=tokenizer.vocab_size)
    tokenizer.save(directory)
    return directory, hf_model


@pytest.mark.parametrize("kind", FAMILIES)
def test_an_sft_adapter_loads_in_peft_and_merges_with_transformers_parity(hf_model_dir, tmp_path, kind):
    import transformers

    base_dir, hf_model = base_with_tokenizer(hf_model_dir, kind)
    run = tmp_path / "run"
    assert cli(["sft", "--model", str(base_dir), "--data", str(chats_file(tmp_path / "chats.jsonl")),
                "--lora-rank", "8", "--lora-targets", ",".join(TARGETS[kind]), "--steps", "3", "--lr", "1e-2",
                "--batch-size", "4", "--max-len", "48", "--run-dir", str(run), "--no-progress"]) == 0
    checkpoint = run / "checkpoints" / "step_00000003"
    adapter = checkpoint / "adapter"
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not copied
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(TARGETS[kind])
    assert config["base_model_name_or_path"] == str(base_dir.resolve())

    x = ids(hf_model.config.vocab_size)
    with torch.no_grad():
        model = openseek.load(base_dir, dtype=torch.float32, adapter=adapter)
        assert all(m.lora_B.weight.abs().max() > 0 for m in lora_modules(model).values())  # it trained
        got = model(x)
        want = peft.PeftModel.from_pretrained(hf_model, adapter).eval()(x).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    merged = tmp_path / "merged"
    assert cli(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(merged)]) == 0
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        torch.testing.assert_close(reference(x).logits, got, atol=1e-5, rtol=0)
    assert (merged / "tokenizer.json").is_file()


def test_deepseek_shared_experts_and_mla_adapt_merge_and_decode(hf_model_dir, tmp_path):
    """all-linear on DeepSeek-V3: MLA's projections, the dense MLP and the shared experts (never the routed ones,
    never MTP). The merged model matches transformers, and the Engine's decode (MLA absorbed through the adapted
    kv_b_proj) matches the plain forward."""
    import transformers

    base_dir, hf_model = hf_model_dir("deepseek_v3")
    model = openseek.load(base_dir, dtype=torch.float32)
    adapted = apply_lora(model, LoRAConfig(rank=4))
    assert "model.layers.1.mlp.shared_experts.gate_proj" in adapted and "model.layers.0.mlp.down_proj" in adapted
    assert "model.layers.1.self_attn.kv_b_proj" in adapted and not any("experts." in n and "shared" not in n
                                                                       for n in adapted)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    assert [p for p in model.parameters() if p.requires_grad] == [
        p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS["deepseek_v3"] + ["gate_proj", "up_proj", "down_proj"])

    x = ids(hf_model.config.vocab_size)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(openseek.load(base_dir, adapter=tmp_path / "adapter")(x), want, atol=0, rtol=0)
        assert cli(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--output",
                    str(tmp_path / "merged")]) == 0
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged.eval()(x).logits, want, atol=1e-5, rtol=0)

        prompt = x[0, :5].tolist()
        [[completion]] = Engine(model).generate([prompt], 6, temperature=0, stop_token_ids=[], logprobs=True)
        full = torch.tensor([prompt + completion.token_ids])
        logp = torch.log_softmax(model(full)[0, len(prompt) - 1: -1], dim=-1)
        forward = logp.gather(-1, full[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), forward, atol=1e-5, rtol=0)


def test_an_adapter_for_other_shapes_is_refused_naming_tensor_and_shapes(hf_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir, hf_model = hf_model_dir("qwen2")
    peft_adapter(hf_model, tmp_path / "adapter", ["q_proj", "down_proj"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[name] = torch.zeros(4, 96)  # as if made for a base with intermediate_size 96
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match=rf"{name} \(in adapter_model.safetensors\): shape \[4, 96\], but "
                                           r"model.layers.1.mlp.down_proj is a \[64, 128\] linear layer and r=4: "
                                           r"expected \[4, 128\]"):
        openseek.load(base_dir, adapter=tmp_path / "adapter")
    tensors[name] = torch.zeros(4, 128)
    tensors["base_model.model.model.layers.7.mlp.down_proj.lora_A.weight"] = torch.zeros(4, 128)
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match=r"this qwen2 model has no linear layer model.layers.7.mlp.down_proj"):
        openseek.load(base_dir, adapter=tmp_path / "adapter")


def test_routed_experts_are_refused(hf_model_dir, tmp_path):
    """LoRA on the routed experts' stacked weights is not implemented: asked for by name, or in a PEFT adapter
    (PEFT targets them through target_parameters), it is refused, saying so."""
    base_dir, hf_model = hf_model_dir("deepseek_v3")
    model = openseek.load(base_dir, dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"LoRA target 'experts' matches no linear layer of this deepseek_v3 model "
                                           r"\(routed experts are stacked .* not implemented.*: .*kv_b_proj"):
        apply_lora(model, LoRAConfig(rank=4, targets="q_a_proj,experts"))
    assert not lora_modules(model)  # nothing was swapped
    peft_adapter(hf_model, tmp_path / "adapter", ["o_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(AdapterError, match=r"target_parameters=.*not supported"):
        openseek.load(base_dir, adapter=tmp_path / "adapter")


def test_serve_loads_an_adapter_also_on_a_quantised_base(hf_model_dir, tmp_path):
    import argparse

    from openseek.serve import app
    from openseek.serve.server import load_engine

    base_dir, hf_model = base_with_tokenizer(hf_model_dir, "qwen2")
    peft_model = peft_adapter(hf_model, tmp_path / "adapter", ["q_proj", "v_proj"])
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    assert app.adapter_flags(parser.parse_args(["--model", str(base_dir), "--adapter", "A"]).adapter, "m") == (
        "A", {})
    engine, _ = load_engine(str(base_dir), adapter=str(tmp_path / "adapter"))
    x = ids(hf_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(engine.model(x), peft_model(x).logits, atol=1e-5, rtol=0)
    engine, _ = load_engine(str(base_dir), dtype="bfloat16", quantize="int8", adapter=str(tmp_path / "adapter"))
    assert len(lora_modules(engine.model)) == 4
    [[completion]] = engine.generate([x[0].tolist()], 4, temperature=0, stop_token_ids=[])
    assert len(completion.token_ids) == 4
