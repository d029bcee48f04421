"""Read and write HF-format model directories: config.json + safetensors (single file or shards + index).

Loading builds the model on the meta device, checks every tensor's name and shape against it from the file
headers alone, then reads each tensor's bytes straight into its materialised parameter — so a bad checkpoint
fails before any weight is read, and the weights never exist twice in memory (not even as mapped file pages).
Only a tensor that needs converting (another dtype, FP8 block dequantisation, a GPU target) goes through a
temporary buffer of its own size.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from openseek.config import ConfigError, ModelConfig
from openseek.lora import load_adapter
from openseek.model import Model, allocate, meta_model
from openseek.quantize import check_options, fold_shared_experts, fuse_projections, quantize_modules

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes; the message names the tensor and file."""


# ---- names: HF checkpoint <-> openseek parameters ------------------------------------------------------------

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)$")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # stored copies of the shared embedding/head


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter, or one expert's slice of a stacked expert parameter."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None  # row range inside expert's [2I, H] gate_up block


def hf_to_local(name: str, cfg: ModelConfig) -> Target | None:
    """Map one checkpoint tensor name to its place in `Model`; None for names that are known redundant copies."""
    layer = _LAYER.match(name)
    if layer:
        i, rest = int(layer.group(1)), layer.group(2)
        if i >= cfg.num_hidden_layers:
            if rest in _MTP_COPIES:
                return None
            local = f"mtp.{i - cfg.num_hidden_layers}.{rest}"
        else:
            local = f"layers.{i}.{rest}"
    elif name.startswith("model."):
        local = name[len("model."):]
    else:
        local = name
    expert = _EXPERT.match(local)
    if not expert:
        return Target(local)
    base, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
    inter = cfg.moe_intermediate_size
    if proj == "down_proj":
        return Target(f"{base}.down_proj", e)
    return Target(f"{base}.gate_up_proj", e, (0, inter) if proj == "gate_proj" else (inter, 2 * inter))


def local_to_hf(model: Model) -> dict[str, torch.Tensor]:
    """The model's tensors under their transformers checkpoint names (experts split out per expert)."""
    cfg, out = model.cfg, {}
    inter = cfg.moe_intermediate_size
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            hf = f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
        elif name == "lm_head.weight":
            hf = name
        else:
            hf = f"model.{name}"
        if hf.endswith("experts.gate_up_proj"):
            base = hf[: -len(".gate_up_proj")]
            for e in range(tensor.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = tensor[e, :inter]
                out[f"{base}.{e}.up_proj.weight"] = tensor[e, inter:]
        elif hf.endswith("experts.down_proj"):
            base = hf[: -len(".down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[hf] = tensor
    for k in range(cfg.num_nextn_predict_layers):  # released MTP layers carry their own copies
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
        out[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


# ---- loading --------------------------------------------------------------------------------------------------


_HUB_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(f"{_HUB_NAME}/{_HUB_NAME}")  # owner/name, the form every repo this project loads has
_ENV_ON = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub reads as "on" in HF_HUB_OFFLINE


def resolve(path_or_repo_id: str | os.PathLike) -> Path:
    """A local model directory, or a hub repo id found in the Hugging Face cache or downloaded with huggingface_hub.

    Only a string of the form `owner/name` that cannot be a local path reaches the hub, so a mistyped or not yet
    written local directory (`models/mine`, `runs/out`) fails here, naming it, instead of sending its name to
    huggingface.co: the project opens no connection unless asked. HF_HUB_OFFLINE keeps a hub id to the local cache.
    """
    text = str(path_or_repo_id)
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{text}: not a model directory (a file; pass the directory holding config.json)")
    reason = _meant_as_local_path(path_or_repo_id)
    if reason:
        raise FileNotFoundError(f"{text}: no such model directory (looked for {path.absolute()}; {reason})")
    return _from_hub(text)


def _meant_as_local_path(path_or_repo_id: str | os.PathLike) -> str | None:
    """Why an argument that names nothing on disk must have meant a local directory; None for a hub id."""
    text = str(path_or_repo_id)
    if isinstance(path_or_repo_id, os.PathLike):
        return "given as a path, so not looked up on the Hugging Face hub"
    if not _HUB_ID.fullmatch(text) or "--" in text or ".." in text or len(text) > 96:
        return "not a Hugging Face hub id either, which has the form owner/name"
    owner = text.split("/")[0]
    if Path(owner).is_dir():  # transformers would ask the hub for it; a local `owner` says a path was meant
        return (f"{owner}/ is a local directory, so this names a path in it and was not looked up on the Hugging "
                f"Face hub; to use the hub repo {text}, run `hf download {text}` and pass the directory it prints")
    return None


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE once, when imported: a variable set since (a notebook, a test) still counts
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _ENV_ON
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        if not offline:
            raise FileNotFoundError(
                f"{repo_id}: not a local directory, and not in the local Hugging Face cache, and the hub could not "
                f"be reached to download it: {e}"
            ) from e
        raise FileNotFoundError(
            f"{repo_id}: not a local directory, and not in the local Hugging Face cache; HF_HUB_OFFLINE is set "
            f"(offline), so it was not downloaded: unset HF_HUB_OFFLINE, or run `hf download {repo_id}` where the "
            f"network is allowed"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id}: not a local directory, and no such repository on the Hugging Face hub (or a private or "
            f"gated one: log in with `hf auth login`)"
        ) from None
    except Exception as e:  # network down, hub unavailable: say so plainly
        raise FileNotFoundError(
            f"{repo_id}: not a local directory, and downloading it from the Hugging Face hub failed: "
            f"{type(e).__name__}: {e}"
        ) from e


def read_config(directory: Path) -> tuple[ModelConfig, dict]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every model directory needs a config.json)")
    hf = _read_json_object(path, ConfigError)
    return ModelConfig.from_hf(hf, source=str(path)), hf


def _read_json_object(path: Path, error: type[ValueError]) -> dict:
    """A JSON file's top-level object; a malformed file raises `error` naming it (and the line, where there is one)."""
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found a JSON {type(value).__name__}")
    return value


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = directory / INDEX
    if index.is_file():
        weight_map = _read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        roots = _weight_roots(directory)
        files = {name: _shard_path(index, roots, name, shard) for name, shard in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing (listed in {index})")
        return files
    single = directory / WEIGHTS
    if single.is_file():
        return dict.fromkeys(read_header(single)[0], single)
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {', '.join(pickled)}: pickle files are never read; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"{directory}: missing {WEIGHTS} or {INDEX}{hint}")


def _weight_roots(directory: Path) -> list[Path]:
    """Where a shard may really lie: inside the model directory, or, for a snapshot in the huggingface_hub cache
    (whose files are symlinks to ../../blobs), in that repository's blob store."""
    real = directory.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(real.parent.parent / "blobs")
    return roots


def _shard_path(index: Path, roots: list[Path], tensor: str, shard) -> Path:
    """The file that `weight_map[tensor] = shard` names, refused unless it lies inside the model directory.

    The index is part of the checkpoint, written by whoever published it: an absolute name, a `..` or a symlink
    would otherwise make loading open any file this user can read."""
    entry = f"{index}: weight_map[{json.dumps(tensor, ensure_ascii=False)}] = {json.dumps(shard, ensure_ascii=False)}"
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{entry}: not a file name")
    relative = Path(shard)
    if relative.anchor or ".." in relative.parts:
        raise CheckpointError(f"{entry} points outside the model directory")
    path = index.parent / relative
    if path.exists():  # a missing shard is reported, with its index, once all of them are known
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise CheckpointError(f"{entry} points outside the model directory (it resolves to {real})")
    return path


def load(path_or_repo_id: str | os.PathLike, dtype: torch.dtype | str | None = None, device="cpu",
         quantize: str | None = None, group_size: int = 32, adapter: str | os.PathLike | None = None) -> Model:
    """Load an HF-format checkpoint (directory or hub id) into a `Model`, in `dtype` (default: the config's).

    `quantize="int8"` or `"int4"` (with `group_size` 32, 64 or 128) makes the eligible linear layers weight-only
    quantised as they load (see quantize.py, which says what stays in `dtype` and why; a line on stderr says it too);
    with int8, the projections that read the same input are then fused into one (`quantize.fuse_projections`), and
    a shared expert joins the routed experts' int8 stacks (`quantize.fold_shared_experts`).
    `adapter` (a directory or hub id) adds a PEFT LoRA adapter on top (see lora.py). `model.name_or_path` records
    where the base came from: a saved adapter names it as its `base_model_name_or_path`.
    """
    quantize = check_options(quantize, group_size, device)
    directory = resolve(path_or_repo_id)
    cfg, hf = read_config(directory)
    files = weight_files(directory)
    mtp_layers = sum(
        any(n.startswith(f"model.layers.{cfg.num_hidden_layers + k}.") for n in files)
        for k in range(cfg.num_nextn_predict_layers)
    )
    cfg = cfg.replace(num_nextn_predict_layers=mtp_layers)  # MTP weights are optional
    cfg.eos_token_id = _eos_ids(cfg, directory)
    dtype = _load_dtype(dtype, cfg, device)

    model = meta_model(cfg, dtype)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    expected.pop("rotary.inv_freq")

    block = _fp8_block(hf)
    plan = _plan(files, cfg, expected, block)
    quantized, kept = quantize_modules(model, quantize, group_size, device)  # after the plan: it checks HF shapes
    for line in kept:
        print(f"{quantize}: {line}", file=sys.stderr)
    _read_weights(allocate(model, device), plan, quantized, files, block)
    model.cfg.torch_dtype = str(dtype).removeprefix("torch.")
    local = Path(path_or_repo_id).expanduser()
    model.name_or_path = str(local.resolve()) if local.is_dir() else str(path_or_repo_id)
    if adapter is not None:
        load_adapter(model, resolve(adapter))
    if quantize == "int8":  # projections that read one input become one matmul (an adapted one stays apart)
        fuse_projections(model)
        fold_shared_experts(model)
    model.eval()
    return model


def _load_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig, device) -> torch.dtype:
    """The dtype to load in: `dtype` (a torch dtype or its name), else the config's."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(sorted(DTYPES))}")
    if dtype in (torch.float16, "float16") and torch.device(device).type == "cpu":
        raise ValueError("dtype=float16 on the CPU: its matmuls are not supported there at useful speed; use "
                         "bfloat16 (or float32)")
    if dtype is None:
        dtype = DTYPES.get(cfg.torch_dtype, torch.float32)
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


@torch.no_grad()
def _read_weights(model: Model, plan, quantized: dict, files, block) -> None:
    """Read every planned tensor into the allocated model, file by file: straight into its parameter where the
    dtype and layout match, else converted (FP8 dequantised), and quantised on the way in for the swapped layers."""
    expected = dict(model.named_parameters()) | dict(model.named_buffers())  # to_empty made new tensors
    for path, entries in _by_file(plan).items():
        header, data_start = read_header(path)
        with open(path, "rb", buffering=0) as handle:
            for name, target in entries:
                entry = header[name]
                if target.param in quantized:  # one full-precision tensor at a time, quantised on the way in
                    tensor = _read_full(handle, data_start, name, entry, files, block)
                    if target.expert is None:
                        quantized[target.param].load_weight(tensor)
                    else:  # one expert's weight (or its gate or up half) into the int8 stack
                        quantized[target.param].load_expert(target.expert, target.rows, tensor)
                    continue
                dest = expected[target.param].detach()
                if target.expert is not None:
                    dest = dest[target.expert]
                    if target.rows is not None:
                        dest = dest[target.rows[0] : target.rows[1]]
                if entry.dtype == dest.dtype and dest.is_contiguous() and dest.device.type == "cpu":
                    _read(handle, data_start, entry, into=dest)
                else:
                    dest.copy_(_read_full(handle, data_start, name, entry, files, block))


def _read_full(handle, data_start: int, name: str, entry, files, block) -> torch.Tensor:
    """Tensor `name` as stored, FP8 blocks dequantised with their `_scale_inv`."""
    tensor = _read(handle, data_start, entry)
    if entry.dtype == torch.float8_e4m3fn:
        tensor = dequantize_fp8(tensor, read_tensor(files, name + "_scale_inv"), block)
    return tensor


def _eos_ids(cfg: ModelConfig, directory: Path) -> list[int]:
    """config.json's EOS ids plus generation_config.json's (instruct checkpoints often list extra ones there)."""
    path = directory / "generation_config.json"
    extra = _read_json_object(path, ConfigError).get("eos_token_id") if path.is_file() else None
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys([*cfg.eos_token_id, *extra]))


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    return tuple(quant.get("weight_block_size") or (128, 128))


def _plan(files, cfg, expected, block) -> list[tuple[str, Target, Path]]:
    """Validate names and shapes from the headers alone; return (checkpoint name, target, file) to copy."""
    headers = {path: read_header(path)[0] for path in set(files.values())}  # file -> its tensor table
    plan, filled = [], {}
    for name, path in files.items():
        if name not in headers[path]:  # FP8 scales too: they are read from the file the index names
            raise CheckpointError(f"{name}: listed in {INDEX} as in {path}, which does not hold it")
        if name.endswith("_scale_inv") and block is not None:
            continue
        target = hf_to_local(name, cfg)
        if target is None or (cfg.tie_word_embeddings and target.param == "lm_head.weight"):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if target.param not in expected:
            raise CheckpointError(f"{name} (in {path.name}): unexpected tensor, no such weight in a {cfg.model_type} model")
        param = expected[target.param]
        want = tuple(param.shape)
        if target.expert is not None:
            want = want[1:]
            if target.rows is not None:
                want = (target.rows[1] - target.rows[0],) + want[1:]
            if target.expert >= param.shape[0]:
                raise CheckpointError(f"{name} (in {path.name}): expert {target.expert} but n_routed_experts={param.shape[0]}")
        found = headers[path][name].shape
        if found != want:
            raise CheckpointError(f"{name} (in {path.name}): shape {list(found)}, expected {list(want)}")
        if headers[path][name].dtype == torch.float8_e4m3fn and name + "_scale_inv" not in files:
            raise CheckpointError(f"{name} (in {path.name}): float8 weight without {name}_scale_inv")
        plan.append((name, target, path))
        filled.setdefault(target.param, []).append(target)
    for param, tensor in expected.items():
        targets = filled.get(param, [])
        if param.endswith("e_score_correction_bias") and not targets:
            continue  # absent = zero bias, as in checkpoints trained without aux-free balancing
        if param == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        need = 1
        if param.endswith("experts.gate_up_proj"):
            need = 2 * tensor.shape[0]
        elif param.endswith("experts.down_proj"):
            need = tensor.shape[0]
        if len(targets) == 0:
            raise CheckpointError(f"{_hf_name(param, cfg)}: missing from the checkpoint (expected shape {list(tensor.shape)})")
        if len(targets) != need and not (len(targets) == 1 and targets[0].expert is None):
            raise CheckpointError(f"{_hf_name(param, cfg)}: {len(targets)} of {need} expert tensors present")
    return plan


def _hf_name(param: str, cfg: ModelConfig) -> str:
    if param.startswith("mtp."):
        _, k, rest = param.split(".", 2)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    return param if param == "lm_head.weight" else f"model.{param}"


def _by_file(plan):
    grouped: dict[Path, list] = {}
    for name, target, path in plan:
        grouped.setdefault(path, []).append((name, target))
    return grouped


# ---- safetensors reading, straight into destination memory -------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, Entry], int]:
    """The tensor table of a safetensors file and the offset where its data begins.

    This is where every weight file's header is read, so every field is checked here, against the format and the
    file's size: a truncated or malformed file fails as a CheckpointError naming it (and the tensor), before any
    weight is read, never as a KeyError midway, and no entry can send a read outside its own bytes of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        length = int.from_bytes(prefix, "little")
        if 8 + length > size:
            raise CheckpointError(f"{path}: its header of {length} bytes runs past the end of the {size}-byte file "
                                  f"(truncated file, or not a safetensors file)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # invalid JSON, invalid UTF-8, nesting too deep for the parser
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, "
                              f"not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    return {name: _entry(path, name, info, data_size) for name, info in header.items()}, 8 + length


def _entry(path: Path, name: str, info, data_size: int) -> Entry:
    """One tensor's header entry, checked: a known dtype, sizes >= 0, and offsets that span exactly its bytes,
    inside the file's data."""
    tensor = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{tensor}: header entry is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{tensor} has unsupported dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not _sizes(shape):
        raise CheckpointError(f"{tensor}: shape {shape!r} is not a list of sizes >= 0")
    if not _sizes(offsets) or len(offsets) != 2:
        raise CheckpointError(f"{tensor}: data_offsets {offsets!r} is not [start, end] in bytes")
    start, end = offsets
    entry = Entry(SAFETENSORS_DTYPES[dtype], tuple(shape), start, end)
    nbytes = math.prod(shape) * entry.dtype.itemsize
    if end - start != nbytes:
        raise CheckpointError(f"{tensor}: data_offsets [{start}, {end}] span {end - start} bytes, but shape "
                              f"{shape} of {dtype} needs {nbytes}")
    if end > data_size:
        raise CheckpointError(f"{tensor}: data_offsets end at byte {end} of the data, which holds only {data_size} "
                              f"bytes (truncated file?)")
    return entry


def _sizes(value) -> bool:
    """A JSON list of integers >= 0 (JSON's true and false are Python ints too: not sizes)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _read(handle, data_start: int, entry: Entry, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes into `into` (same dtype, contiguous, CPU) or a fresh buffer."""
    out = torch.empty(entry.shape, dtype=entry.dtype) if into is None else into
    view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
    handle.seek(data_start + entry.start)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{handle.name}: ended early while reading a tensor (truncated file?)")
        done += got
    return out


def read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    """Read one tensor from whichever file holds it (FP8 scales may sit in another shard)."""
    header, data_start = read_header(files[name])
    with open(files[name], "rb", buffering=0) as handle:
        return _read(handle, data_start, header[name])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = W_fp8 · scale_inv, one scale per block of `block` = (rows, cols); edge blocks may be partial."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


# ---- saving ---------------------------------------------------------------------------------------------------


def save(model: Model, directory: str | os.PathLike, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json, generation_config.json and safetensors shards (+ index when more than one).

    Files are written in a temporary directory and then moved in place, so an interrupted save never leaves a
    half-written checkpoint; weight files left over from an earlier save are removed.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in local_to_hf(model).items()}
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)

    hf = model.cfg.to_hf()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    generation = {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": hf["eos_token_id"]}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if not directory.exists():
            tmp.rename(directory)
            return directory
        for stale in [*directory.glob("model*.safetensors"), directory / INDEX]:
            if stale.exists() and not (tmp / stale.name).exists():
                stale.unlink()
        for file in tmp.iterdir():
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
