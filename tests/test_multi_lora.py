"""Several LoRA adapters in one batch (multi_lora.py): two adapters made and saved by PEFT (a peer, never imported
by openseek) on a tiny random qwen2, served beside the base by one Engine and one `openseek serve`. Every row must
compute exactly what serving its adapter alone computes: the same logits (against PEFT too), the same greedy tokens
and log-probs, whatever else shares its batch."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest
import torch

import openseek
from conftest import build_hf_model
from helpers_serve import LiveServer
from helpers_train import successor_documents, tiny_tokenizer
from openseek.engine import Engine
from openseek.lora import AdapterError, LoRAConfig, apply_lora, save_adapter
from openseek.multi_lora import adapter_set, load_adapters

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# adapter name -> (targets, rank, alpha, use_rslora, seed): different ranks, targets and scalings, so padding to
# the largest rank and layers one adapter leaves alone are exercised
ADAPTERS = {"alpha": (ALL, 4, 8, False, 1), "beta": (["q_proj", "v_proj", "down_proj"], 8, 4, True, 2)}
MODELS = ["base", "alpha", "beta"]
PROMPTS = [[3 + i, 17 + 2 * i, 5 + i, 40 + i, 9][: 3 + i % 3] for i in range(8)]  # 8 prompts x 3 models = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The base directory (with a tokenizer, for serving), the adapters' directories and their PEFT models."""
    root = tmp_path_factory.mktemp("multi")
    tokenizer = tiny_tokenizer(successor_documents(100))
    base = root / "base"
    build_hf_model("qwen2", vocab_size=tokenizer.vocab_size).save_pretrained(base)
    tokenizer.save(base)
    dirs, peft_models = {}, {}
    for name, (targets, rank, alpha, rslora, seed) in ADAPTERS.items():
        hf_model = build_hf_model("qwen2", vocab_size=tokenizer.vocab_size)  # PEFT wraps it in place: a fresh copy
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                 use_rslora=rslora)
        peft_models[name] = peft.get_peft_model(hf_model, config).eval()
        peft_models[name].save_pretrained(root / name)
        dirs[name] = root / name
    return base, dirs, peft_models


@pytest.fixture(scope="module")
def engines(checkpoints):
    """One Engine serving base + both adapters, and one Engine per model serving it alone (the adapter loaded on
    top of the base as lora.py does: the reference)."""
    base, dirs, _ = checkpoints
    model = openseek.load(base, dtype=torch.float32)
    load_adapters(model, dirs)
    alone = {"base": openseek.load(base, dtype=torch.float32)}
    alone |= {name: openseek.load(base, dtype=torch.float32, adapter=d) for name, d in dirs.items()}
    multi = Engine(model, max_batch_size=32)
    references = {name: Engine(m, max_batch_size=32) for name, m in alone.items()}
    yield multi, references
    for engine in [multi, *references.values()]:
        engine.close()


def test_each_row_computes_its_own_adapters_logits(checkpoints, engines):
    _, _, peft_models = checkpoints
    multi, alone = engines
    x = torch.randint(0, multi.cfg.vocab_size, (6, 10), generator=torch.Generator().manual_seed(0))
    rows = [0, 1, 2, 2, 0, 1]  # base, alpha, beta, ...
    adapter_set(multi.model).select(rows)
    with torch.no_grad():
        mixed = multi.model(x)
        for i, adapter in enumerate(rows):
            name = MODELS[adapter]
            want = alone[name].model(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], want, atol=1e-5, rtol=0)
            if name != "base":
                torch.testing.assert_close(mixed[i : i + 1], peft_models[name](x[i : i + 1]).logits, atol=1e-5,
                                           rtol=0)
    assert not torch.allclose(mixed[1], mixed[2], atol=1e-3) and not torch.allclose(mixed[0], mixed[1], atol=1e-3)
    adapter_set(multi.model).select([0] * 6)


def _alone(alone, name, prompt):
    return alone[name].submit(prompt, 8, temperature=0, stop_token_ids=[], logprobs=True, top_logprobs=3).result()


def test_24_concurrent_requests_over_three_models_match_each_served_alone(engines):
    multi, alone = engines
    requests = [(prompt, name) for prompt in PROMPTS for name in MODELS]
    handles = [multi.submit(p, 8, temperature=0, stop_token_ids=[], logprobs=True, top_logprobs=3,
                            adapter=MODELS.index(name)) for p, name in requests]
    results = [h.result(timeout=120) for h in handles]
    for (prompt, name), got in zip(requests, results):
        want = _alone(alone, name, prompt)
        assert got.token_ids == want.token_ids, (prompt, name)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
        for got_top, want_top in zip(got.top_logprobs, want.top_logprobs):
            assert [t for t, _ in got_top] == [t for t, _ in want_top]
            torch.testing.assert_close(torch.tensor([v for _, v in got_top]), torch.tensor([v for _, v in want_top]),
                                       atol=1e-5, rtol=0)
    outputs = {name: {tuple(r.token_ids) for (_, n), r in zip(requests, results) if n == name} for name in MODELS}
    assert outputs["base"] != outputs["alpha"] != outputs["beta"]  # the adapters do change the answers


def test_the_prefix_cache_serves_each_adapter_its_own_keys(engines):
    multi, alone = engines
    prompt = [60, 61, 62, 63, 64, 65, 66]  # no earlier prompt starts with 60
    cache = multi.prefix_cache
    for name, hit in (("alpha", False), ("beta", False), ("alpha", True), ("base", False)):
        before = cache.hit_tokens
        got = multi.submit(prompt, 8, temperature=0, stop_token_ids=[], logprobs=True,
                           adapter=MODELS.index(name)).result(timeout=60)
        assert (cache.hit_tokens > before) == hit, name
        want = _alone(alone, name, prompt)
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


def test_one_server_serves_base_and_adapters_in_one_batch(checkpoints, engines):
    """24 concurrent /v1/completions requests over the three models: each answer (text and log-probs) is the one
    its model gives served alone."""
    base, dirs, _ = checkpoints
    _, alone = engines
    flags = [f for name, d in dirs.items() for f in ("--adapter", f"{name}={d}")]
    live = LiveServer(base, *flags, "--max-sequences", "32", "--max-batch-size", "32")
    try:
        listed = httpx.get(live.url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]
        assert httpx.get(live.url + "/v1/models/beta").json()["parent"] == "tiny"
        served = {"base": "tiny", "alpha": "alpha", "beta": "beta"}
        requests = [(prompt, name) for prompt in PROMPTS for name in MODELS]

        def ask(request):
            prompt, name = request
            body = {"model": served[name], "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                    "ignore_eos": True}
            return httpx.post(live.url + "/v1/completions", json=body, timeout=120).json()

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(ask, requests))
        tokenizer = openseek.tokenizer.Tokenizer.from_dir(base)
        for (prompt, name), answer in zip(requests, answers):
            assert answer["model"] == served[name]
            want = _alone(alone, name, prompt)
            choice = answer["choices"][0]
            assert choice["text"] == tokenizer.decode(want.token_ids)
            torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(want.logprobs),
                                       atol=1e-5, rtol=0)
        unknown = httpx.post(live.url + "/v1/completions", json={"model": "gamma", "prompt": "hi"})
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert error["param"] == "model" and "`gamma`" in error["message"] and "`alpha`" in error["message"]
    finally:
        live.stop()


def test_adapter_flags_name_each_adapter():
    from openseek.serve.app import adapter_flags

    assert adapter_flags(["out/adapter"], "tiny") == ("out/adapter", {})  # the one adapter on top, as before
    assert adapter_flags(["a=x", "b=y"], "tiny") == (None, {"a": "x", "b": "y"})
    assert adapter_flags([], "tiny") == (None, {})
    for values, message in ((["x", "y"], "name each adapter"), (["a=x", "a=y"], "'a' is taken already"),
                            (["tiny=x"], "the base model"), (["=x"], "--adapter NAME=DIR")):
        with pytest.raises(ValueError, match=message):
            adapter_flags(values, "tiny")


def test_what_cannot_differ_per_row_is_refused(hf_model_dir, tmp_path, checkpoints):
    base, dirs, _ = checkpoints
    directory, _ = hf_model_dir("deepseek_v3")
    model = openseek.load(directory, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=2, targets=["kv_b_proj", "o_proj"]))
    save_adapter(model, tmp_path / "mla")
    with pytest.raises(AdapterError, match="adapts kv_b_proj"):
        load_adapters(openseek.load(directory, dtype=torch.float32), {"mla": tmp_path / "mla"})
    with pytest.raises(AdapterError, match="already carries adapters"):
        load_adapters(openseek.load(base, adapter=dirs["alpha"]), {"beta": dirs["beta"]})
    model = openseek.load(base, dtype=torch.float32)
    load_adapters(model, dirs)
    with pytest.raises(ValueError, match="compile: a model with several LoRA adapters"):
        Engine(model, compile=True)
    engine = Engine(model)
    with pytest.raises(ValueError, match=r"adapter=3: this model has adapters 1..2 \(alpha, beta\)"):
        engine.submit([1, 2], 4, adapter=3)
    with pytest.raises(ValueError, match="no adapters to choose between"):
        Engine(openseek.load(base)).submit([1, 2], 4, adapter=1)
    assert json.loads((dirs["beta"] / "adapter_config.json").read_text())["use_rslora"] is True
