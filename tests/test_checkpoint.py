"""HF-format checkpoints: round trips with transformers, shards, release-form configs, FP8, MTP, bad input."""

import functools
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import openseek
from openseek.checkpoint import CheckpointError, dequantize_fp8
from openseek.config import ConfigError
from test_model import logits_gap


@pytest.mark.parametrize("kind", ["qwen2", "llama", "deepseek_v3_yarn"])
def test_save_then_transformers_loads_the_same_model(hf_model_dir, tmp_path, kind):
    directory, hf_model = hf_model_dir(kind)
    ours = openseek.load(directory)
    openseek.save(ours, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert logits_gap(reloaded, ours) <= 1e-4
    assert logits_gap(reloaded, hf_model) <= 1e-4


def test_sharded_checkpoints_both_ways(hf_model_dir, tmp_path):
    directory, hf_model = hf_model_dir("deepseek_v3")
    sharded = tmp_path / "hf-sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ours = openseek.load(sharded)
    assert logits_gap(hf_model, ours) <= 1e-4

    openseek.save(ours, tmp_path / "ours-sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours-sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours-sharded", dtype=torch.float32)
    assert logits_gap(reloaded.eval(), ours) <= 1e-4
    # Saving again, unsharded, into the same directory leaves no stale shards behind.
    openseek.save(ours, tmp_path / "ours-sharded")
    assert sorted(p.name for p in (tmp_path / "ours-sharded").glob("*.safetensors")) == ["model.safetensors"]
    assert logits_gap(hf_model, openseek.load(tmp_path / "ours-sharded")) <= 1e-4


def test_release_form_config_with_extra_fields(hf_model_dir):
    """DeepSeek's published config.json: rope_theta + rope_scaling with `type`, plus fields we do not use."""
    directory, hf_model = hf_model_dir("deepseek_v3_yarn")
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    cfg.update(auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, ep_size=1, seq_aux=True,
               aux_loss_alpha=0.001, scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    path.write_text(json.dumps(cfg))
    ours = openseek.load(directory)
    assert ours.cfg.rope_scaling["rope_type"] == "yarn" and ours.cfg.rope_theta == 10000.0
    assert logits_gap(hf_model, ours) <= 1e-4


def quantize_blockwise(weight: torch.Tensor, block: int):
    """FP8 e4m3 per block×block tile, the way DeepSeek ships weights; returns (fp8 weight, scale_inv)."""
    rows, cols = weight.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale_inv = torch.empty(nr, nc)
    quant = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale_inv[i, j] = s
            quant[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return quant, scale_inv


def test_fp8_block_quantised_checkpoint_dequantises_on_load(hf_model_dir):
    directory, hf_model = hf_model_dir("deepseek_v3")
    block = 24  # tiles that do not divide the shapes: partial edge blocks are exercised
    tensors = load_file(directory / "model.safetensors")
    out, reference = {}, {}
    for name, tensor in tensors.items():
        quantisable = name.endswith("proj.weight") and tensor.dim() == 2
        if quantisable:
            q, s = quantize_blockwise(tensor, block)
            out[name], out[name.replace(".weight", ".weight_scale_inv")] = q, s
            # The reference dequantisation, element by element from the tile each element is in.
            rows, cols = torch.meshgrid(torch.arange(q.shape[0]), torch.arange(q.shape[1]), indexing="ij")
            reference[name] = q.float() * s[rows // block, cols // block]
        else:
            out[name] = tensor
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (directory / "config.json").write_text(json.dumps(cfg))
    assert len(reference) > 10

    ours = openseek.load(directory)
    with torch.no_grad():
        hf_model.load_state_dict(
            {k: v for k, v in reference.items() if ".experts." not in k}, strict=False
        )
        for name, weight in reference.items():  # transformers keeps experts fused in memory
            if ".experts." in name:
                prefix, rest = name.split(".experts.")
                e, proj = int(rest.split(".")[0]), rest.split(".")[1]
                experts = hf_model.get_submodule(prefix + ".experts")
                inter = experts.down_proj.shape[-1]
                if proj == "down_proj":
                    experts.down_proj[e] = weight
                else:
                    rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                    experts.gate_up_proj[e, rows] = weight
    assert ours.layers[0].self_attn.q_b_proj.weight.dtype == torch.float32
    assert torch.equal(ours.layers[0].self_attn.q_b_proj.weight, reference["model.layers.0.self_attn.q_b_proj.weight"])
    assert logits_gap(hf_model, ours) <= 1e-4


def test_dequantize_fp8_matches_hand_computed_tiles():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0, 10.0], [0.5, 1.0]])
    expected = torch.tensor([[2.0, 4.0, 30.0], [8.0, 10.0, 60.0], [3.5, 4.0, 9.0]])
    assert torch.equal(dequantize_fp8(weight, scale, (2, 2)), expected)


def tiny_mtp_model(**overrides):
    torch.manual_seed(0)
    cfg = openseek.ModelConfig(
        model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=16, n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
        eos_token_id=[1], **overrides,
    )
    return openseek.Model(cfg).eval()


def test_mtp_weights_live_at_layer_num_hidden_layers(tmp_path):
    model = tiny_mtp_model()
    openseek.save(model, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for suffix in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "self_attn.kv_b_proj.weight", "mlp.experts.3.down_proj.weight",
                   "mlp.gate.e_score_correction_bias"]:
        assert f"model.layers.2.{suffix}" in names
    loaded = openseek.load(tmp_path / "m")
    assert loaded.cfg.num_nextn_predict_layers == 1
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a = model.mtp_logits(model(ids, return_hidden=True)[1], ids)[0]
        b = loaded.mtp_logits(loaded(ids, return_hidden=True)[1], ids)[0]
    assert torch.equal(a, b)


def test_mtp_weights_are_optional(hf_model_dir):
    directory, _ = hf_model_dir("deepseek_v3")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # declared, as in the release config, but the weights were not shipped
    (directory / "config.json").write_text(json.dumps(cfg))
    assert openseek.load(directory).cfg.num_nextn_predict_layers == 0


# ---- bad input: every failure names the culprit, before any model is returned -----------------------------------


def rewrite_weights(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_paths_are_named(hf_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        openseek.load(tmp_path / "no-such-dir")
    directory, _ = hf_model_dir("qwen2")
    (directory / "model.safetensors").rename(directory / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        openseek.load(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        openseek.load(directory)


def test_missing_shard_is_named(hf_model_dir, tmp_path):
    _, hf_model = hf_model_dir("qwen2")
    hf_model.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        openseek.load(tmp_path / "s")


def test_pickle_checkpoints_are_refused_not_read(tmp_path, hf_model_dir):
    directory, _ = hf_model_dir("llama")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle files are never read"):
        openseek.load(directory)


def test_unknown_model_type_is_named(hf_model_dir):
    directory, _ = hf_model_dir("qwen2")
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'mamba'.*MambaForCausalLM"):
        openseek.load(directory)


def test_malformed_config_names_file_and_line(hf_model_dir):
    directory, _ = hf_model_dir("qwen2")
    (directory / "config.json").write_text('{\n  "model_type": "qwen2",\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json: line 3"):
        openseek.load(directory)


def test_missing_tensor_is_named_with_its_shape(hf_model_dir):
    directory, _ = hf_model_dir("deepseek_v3")
    rewrite_weights(directory, lambda t: t.pop("model.layers.1.self_attn.kv_a_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.kv_a_layernorm.weight: missing.*\[16\]"):
        openseek.load(directory)


def test_missing_expert_is_named(hf_model_dir):
    directory, _ = hf_model_dir("deepseek_v3")
    rewrite_weights(directory, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.*15 of 16"):
        openseek.load(directory)


def test_unexpected_tensor_is_named(hf_model_dir):
    directory, _ = hf_model_dir("qwen2")
    rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.extra.weight.*unexpected"):
        openseek.load(directory)


def test_wrong_shape_names_tensor_expected_and_found(hf_model_dir):
    directory, _ = hf_model_dir("llama")
    rewrite_weights(directory, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\[100, 64\], expected \[128, 64\]"):
        openseek.load(directory)


@pytest.mark.parametrize("seen_at_import", [True, False], ids=["set-before-import", "set-after-import"])
def test_hub_download_offline_says_so(monkeypatch, tmp_path, network_attempts, seen_at_import):
    """HF_HUB_OFFLINE counts even when set after huggingface_hub read it at import (a notebook, this test)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", seen_at_import)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as error:
        openseek.load("openseek-test/definitely-not-cached")
    assert str(error.value) == (
        "openseek-test/definitely-not-cached: not a local directory, and not in the local Hugging Face cache; "
        "HF_HUB_OFFLINE is set (offline), so it was not downloaded: unset HF_HUB_OFFLINE, or run "
        "`hf download openseek-test/definitely-not-cached` where the network is allowed"
    )
    assert network_attempts == []


def test_loading_never_holds_two_copies_of_the_weights(tmp_path):
    """Peak resident memory while loading stays well under twice the checkpoint size (tensors are mmapped and
    copied one at a time into the materialised model)."""
    import subprocess
    import sys
    import textwrap

    make = textwrap.dedent(f"""
        import torch, openseek
        cfg = openseek.ModelConfig(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
        openseek.save(openseek.Model(cfg), {str(tmp_path / "big")!r})
    """)
    subprocess.run([sys.executable, "-c", make], check=True)
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    measure = textwrap.dedent(f"""
        import resource, torch, openseek
        torch.ones(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = openseek.load({str(tmp_path / "big")!r})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    """)
    out = subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True, text=True).stdout
    peak = int(out.split()[-1])
    assert size > 200e6
    assert peak < 1.5 * size, f"loading {size / 1e6:.0f} MB raised peak RSS by {peak / 1e6:.0f} MB"


def test_generation_config_adds_its_eos_ids(hf_model_dir):
    directory, _ = hf_model_dir("qwen2")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["eos_token_id"] = 5
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    assert openseek.load(directory).cfg.eos_token_id == [5, 7]


# ---- paths and malformed files: nothing outside the model directory is read, nothing is fetched unasked ---------

NETWORK_EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname"}
_watching: list[list[str]] = []  # the network_attempts list of the test now running, while it holds the fixture


def _refuse_network(event, args):
    if _watching and event in NETWORK_EVENTS:
        _watching[-1].append(f"{event} {args!r}")
        raise ConnectionRefusedError(f"this test allows no network access ({event})")


@functools.cache
def _install_network_guard():
    sys.addaudithook(_refuse_network)  # an audit hook cannot be removed: installed once, it acts only while watched


@pytest.fixture
def network_attempts():
    """Every socket connect or send and every DNS lookup made during the test, each refused on the spot."""
    _install_network_guard()
    attempts: list[str] = []
    _watching.append(attempts)
    yield attempts
    _watching.remove(attempts)


def test_network_guard_sees_a_lookup(network_attempts):
    """The control: the guard the tests below rely on does catch a lookup and a connection."""
    with pytest.raises(ConnectionRefusedError):
        socket.getaddrinfo("127.0.0.1", 80)
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(("127.0.0.1", 9))
    assert [a.split()[0] for a in network_attempts] == ["socket.getaddrinfo", "socket.connect"]


@pytest.mark.parametrize("argument, reason", [
    ("models/mine", "models/ is a local directory, so this names a path in it and was not looked up on the Hugging "
                    "Face hub; to use the hub repo models/mine, run `hf download models/mine`"),
    ("runs/out", "runs/ is a local directory"),
    ("mine", "not a Hugging Face hub id either, which has the form owner/name"),
    ("./mine", "not a Hugging Face hub id either"),
    ("a/b/c", "not a Hugging Face hub id either"),
    (Path("owner/name"), "given as a path, so not looked up on the Hugging Face hub"),
])
def test_missing_local_path_is_named_and_never_looked_up_on_the_hub(tmp_path, monkeypatch, network_attempts,
                                                                   argument, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        openseek.load(argument)
    message = str(error.value)
    assert message.startswith(f"{argument}: no such model directory (looked for {Path.cwd() / argument}; ")
    assert reason in message
    assert network_attempts == []


def tiny_sharded_model(directory):
    """A one-layer llama saved as ten shards with their index (every tensor in a file of its own or nearly)."""
    torch.manual_seed(0)
    cfg = openseek.ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, eos_token_id=[1])
    model = openseek.Model(cfg).eval()
    openseek.save(model, directory, max_shard_bytes=2000)
    return model


def edit_index(directory, change):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "absolute", "sub/../../outside.safetensors", "link"])
def test_shard_names_outside_the_model_directory_are_refused(tmp_path, shard):
    directory = tmp_path / "m"
    tiny_sharded_model(directory)
    outside = tmp_path / "outside.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, outside)
    if shard == "absolute":
        shard = str(outside)
    elif shard == "link":  # a symlink in the directory that resolves outside it
        shard = "linked.safetensors"
        (directory / shard).symlink_to(outside)
    edit_index(directory, lambda weights: weights.update({"model.embed_tokens.weight": shard}))
    entry = f'model.safetensors.index.json: weight_map["model.embed_tokens.weight"] = "{shard}"'
    with pytest.raises(CheckpointError, match=re.escape(f"{entry} points outside the model directory")):
        openseek.load(directory)


def test_shard_symlinks_inside_the_directory_and_into_the_hub_cache_load(tmp_path, monkeypatch, network_attempts):
    """A huggingface_hub cache snapshot is symlinks into ../../blobs: loaded offline by hub id, from the cache."""
    import huggingface_hub.constants as constants

    saved = tmp_path / "saved"
    model = tiny_sharded_model(saved)
    repo = tmp_path / "hub" / "models--openseek-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, file in enumerate(sorted(saved.iterdir())):
        file.rename(repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    # and a shard reached through a second link that stays inside the snapshot
    (snapshot / "again.safetensors").symlink_to("model-00001-of-00010.safetensors")
    edit_index(snapshot, lambda weights: weights.update({"model.embed_tokens.weight": "again.safetensors"}))

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = openseek.load("openseek-test/tiny")
    assert network_attempts == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_malformed_index_entries_are_named(tmp_path):
    directory = tmp_path / "m"
    tiny_sharded_model(directory)
    edit_index(directory, lambda weights: weights.update({"model.norm.weight": "model-00001-of-00010.safetensors"}))
    with pytest.raises(CheckpointError, match=re.escape(
            "model.norm.weight: listed in model.safetensors.index.json as in "
            f"{directory / 'model-00001-of-00010.safetensors'}, which does not hold it")):
        openseek.load(directory)
    edit_index(directory, lambda weights: weights.update({"model.norm.weight": None}))
    with pytest.raises(CheckpointError, match=re.escape('weight_map["model.norm.weight"] = null: not a file name')):
        openseek.load(directory)
    (directory / "model.safetensors.index.json").write_text('{"weight_map": {\n  "model.norm.weight": oops}}')
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors.index.json: line 2: invalid JSON")):
        openseek.load(directory)


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file written by hand: 8-byte little-endian header length, the header, then the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("content, problem", [
    (b"\x10\x00\x00", "not a safetensors file (3 bytes, too short for a header)"),
    ((100).to_bytes(8, "little") + b'{"w": {"dtype"', "its header of 100 bytes runs past the end of the 22-byte file "
                                                       "(truncated file, or not a safetensors file)"),
    (safetensors_bytes(b"\x80not json"), "not a safetensors file (header is not JSON"),
    (safetensors_bytes([1, 2]), "not a safetensors file (header is a JSON list, not an object)"),
    (safetensors_bytes({"w": 5}), "tensor w: header entry is a JSON int, not an object"),
    (safetensors_bytes({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor w has unsupported dtype 'F33' (known: F64, F32,"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
     "tensor w: data_offsets None is not [start, end] in bytes"),
    (safetensors_bytes({"w": f32([-1, -2], [0, 8])}, bytes(8)), "tensor w: shape [-1, -2] is not a list of sizes >= 0"),
    (safetensors_bytes({"w": f32([2], [-8, 0])}, bytes(8)), "tensor w: data_offsets [-8, 0] is not [start, end]"),
    (safetensors_bytes({"w": f32([2], [0, 4])}, bytes(8)),
     "tensor w: data_offsets [0, 4] span 4 bytes, but shape [2] of F32 needs 8"),
    (safetensors_bytes({"w": f32([4], [0, 16])}, bytes(8)),
     "tensor w: data_offsets end at byte 16 of the data, which holds only 8 bytes (truncated file?)"),
], ids=["short", "truncated-header", "not-json", "not-object", "entry-not-object", "wrong-dtype", "no-offsets",
        "negative-shape", "negative-offset", "offsets-vs-shape", "offsets-past-end"])
def test_malformed_safetensors_header_names_file_and_tensor(tmp_path, content, problem):
    directory = tmp_path / "m"
    tiny_sharded_model(directory)
    shard = directory / "model-00003-of-00010.safetensors"
    shard.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: {problem}")):
        openseek.load(directory)


def test_truncated_weight_file_names_file_and_tensor(tmp_path):
    directory = tmp_path / "m"
    tiny_sharded_model(directory)
    shard = directory / "model-00008-of-00010.safetensors"  # holds only model.layers.0.mlp.down_proj.weight
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(
            f"{shard}: tensor model.layers.0.mlp.down_proj.weight: data_offsets end at byte 2048 of the data, "
            "which holds only 1948 bytes (truncated file?)")):
        openseek.load(directory)
