"""The prepared GPU check: openseek's CUDA paths in one command that needs no network, with a results file.

    .venv/bin/python benchmarks/gpu_check.py --out runs/gpu_check                  # on a lent GPU (--device cuda)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out runs/tiny   # every stage, toy sizes, CPU

Stages, in order; each runs in a process of its own (a CUDA fault or a hang stays in its stage) under a time limit,
is timed, and has its failures caught and recorded; the script goes on to the next stage, lists every failure at
the end and exits 1 if any stage failed:

1. `tests`: `pytest -m cuda tests` (tests/test_cuda.py: bf16 logits against transformers for qwen2, llama and
   deepseek_v3; the Engine's greedy tokens against transformers' `generate`, eager, as CUDA graphs and compiled;
   int8 weights; int4 refused), pass/fail/skip per test from pytest's JUnit XML. On a GPU a skipped CUDA test is
   a failure (the tests did not see the GPU); on the CPU they all skip, naming the missing GPU.
2. `decode`: greedy decoding at batch 1 and 32 on a random Qwen2.5-0.5B-shaped model built here (bf16 where the
   device has it natively), 64-token prompts, 128 new tokens, decode time = time(128 new) − time(1 new), best of
   3; modes eager, `cuda_graphs`, `compile+cuda_graphs` (GPU; the CPU runs eager). Roofline: bytes read per step
   (every weight once, `quantize.weight_bytes_per_step`, plus each row's cache up to its mean length) over the
   bandwidth; on a GPU both the nominal HBM bandwidth of its model (NOMINAL_BANDWIDTH; none for one not listed) and
   the measured read bandwidth (a sum over 1 GiB, best of 5) are given; on the CPU the measured one, as
   benchmarks/roofline.py measures it.
3. `train`: the Trainer's step on the dense model (same shape; bf16 autocast where native, each block compiled on
   a GPU, fused AdamW), B = 8, T = 2048: tokens/s, FLOPs per token (6 × parameters + attention,
   report.flops_per_token) and MFU over the GPU's bf16 dense peak (report.PEAK_FLOPS); "n/a" on the CPU, which has
   no listed peak (its achieved FLOP/s is given).
4. `demo`: `openseek demo`, shortened (pretraining, GRPO, held-out evaluation), on the device.
5. `grpo_step`: one `openseek grpo` step on the demo's model, on the device, with its time split.

`--tiny` runs the same stages at toy sizes (a 2-layer model, a few steps), which is how the test suite runs it on
the CPU. Writes OUT/gpu_check.json (every stage: status, seconds, figures, errors) and OUT/gpu_check.md (the same
as tables); each stage's own output is in OUT/<stage>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from roofline import SHAPE, bandwidth as cpu_read_bandwidth  # noqa: E402
from train_step import measure_training  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("tests", "decode", "train", "demo", "grpo_step")
# seconds each stage may take on a GPU, 8 minutes in all (the CPU's tiny run takes seconds); --stage-timeout
# scales them
TIME_LIMITS = {"tests": 120, "decode": 150, "train": 110, "demo": 60, "grpo_step": 40}
# nominal HBM bandwidth, bytes/s, by a piece of `torch.cuda.get_device_name` (first match; vendors' data sheets)
NOMINAL_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                     ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                     ("L40S", 0.864e12), ("A10G", 0.6e12), ("4090", 1.008e12)]
TINY_SHAPE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True, qkv_bias=True)


class StageFailures(Exception):
    """A stage that ran to its end but had failures (listed in its result)."""


# ---- stages (each runs in its own process: `--child STAGE`) -----------------------------------------------------

def stage_tests(device: torch.device, tiny: bool, out: Path) -> dict:
    xml = out / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (out / "pytest.log").write_text(run.stdout + run.stderr)
    tests = []
    for case in ElementTree.parse(xml).iter("testcase") if xml.exists() else ():
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                detail = (child.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "detail": detail})
    result = {"command": " ".join(command[1:]), "returncode": run.returncode, "tests": tests,
              "counts": {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}}
    failures = [f"{t['test']}: {t['outcome']} {t['detail']}" for t in tests if t["outcome"] in ("failed", "error")]
    if device.type == "cuda":
        failures += [f"{t['test']}: skipped on a GPU: {t['detail']}" for t in tests if t["outcome"] == "skipped"]
    if not tests:
        failures.append(f"pytest collected no CUDA test (exit {run.returncode}): {(run.stdout + run.stderr)[-800:]}")
    elif run.returncode not in (0, 5) and not failures:
        failures.append(f"pytest exited {run.returncode}: {(run.stdout + run.stderr)[-800:]}")
    return _with_failures(result, failures)


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a sum over 1 GiB of float32 on `device`, best of 5 (the CPU: benchmarks/roofline.py's)."""
    if device.type != "cuda":
        return cpu_read_bandwidth(torch.get_num_threads())
    x = torch.ones(2**28, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        x.sum()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def nominal_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in NOMINAL_BANDWIDTH if key in name), None)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random model of `shape` (weights N(0, 0.02)) made on the device itself (no checkpoint, no host copy)."""
    from openseek.config import ModelConfig
    from openseek.model import allocate, meta_model

    torch.manual_seed(0)
    model = allocate(meta_model(ModelConfig(model_type="qwen2", eos_token_id=[0], **shape), dtype), device)
    model.init_weights()
    return model.eval()


def stage_decode(device: torch.device, tiny: bool, out: Path) -> dict:
    import openseek
    from openseek.device import resolve_precision
    from openseek.engine.cache import kv_bytes_per_token
    from openseek.quantize import weight_bytes_per_step

    shape = TINY_SHAPE if tiny else SHAPE
    prompt_len, new, repeats = (8, 16, 2) if tiny else (64, 128, 3)
    dtype = torch.bfloat16 if resolve_precision("auto", device, shape["hidden_size"]) == "bf16" else torch.float32
    model = random_model(shape, device, dtype)
    measured, nominal = read_bandwidth(device), nominal_bandwidth(device)
    weights = weight_bytes_per_step(model)
    kv_per_token = kv_bytes_per_token(model.cfg, model.dtype)
    modes = ["eager", "cuda_graphs", "compile+cuda_graphs"] if device.type == "cuda" else ["eager"]
    result = {"model": f"Qwen2.5-0.5B shape, random weights, {dtype}" if not tiny else f"tiny qwen2, {dtype}",
              "prompt": prompt_len, "new_tokens": new, "weight_bytes_per_step": weights,
              "measured_bandwidth": measured, "nominal_bandwidth": nominal, "runs": []}
    if device.type != "cuda":
        result["skipped"] = "cuda_graphs and compile+cuda_graphs: CUDA graphs capture CUDA work only"
    failures = []
    for mode in modes:
        for batch in (1, 32):
            engine = None
            try:
                engine = openseek.Engine(model, max_batch_size=batch, threads=torch.get_num_threads(),
                                         compile="compile" in mode, cuda_graphs="cuda_graphs" in mode)
                prompts = [[(7 * row + 3 * i) % shape["vocab_size"] for i in range(prompt_len)] for row in range(batch)]

                def run(n: int) -> float:
                    start = time.perf_counter()
                    engine.generate(prompts, n, temperature=0, stop_token_ids=[])  # reads the tokens back: synced
                    return time.perf_counter() - start

                run(new)  # warm-up at full length: allocations, the graphs' captures, compilation
                seconds = min(run(new) - run(1) for _ in range(repeats))
                tokens_per_s = batch * (new - 1) / seconds
                step_bytes = weights + batch * (prompt_len + new / 2) * kv_per_token
                roofline = batch / step_bytes  # tokens/s per byte/s of bandwidth
                row = {"mode": mode, "batch": batch, "tokens_per_s": tokens_per_s, "bytes_per_step": step_bytes,
                       "fraction_of_measured": tokens_per_s / (roofline * measured),
                       "fraction_of_nominal": None if nominal is None else tokens_per_s / (roofline * nominal)}
            except Exception as error:  # recorded; the other modes and batches still run
                row = {"mode": mode, "batch": batch, "error": _error(error)}
                failures.append(f"decode {mode} batch {batch}: {row['error']}")
            result["runs"].append(row)
            _write(out / "partial.json", result)  # what a timeout leaves
            del engine
    return _with_failures(result, failures)


def stage_train(device: torch.device, tiny: bool, out: Path) -> dict:
    shape = dict(TINY_SHAPE if tiny else SHAPE, model_type="qwen2")
    steps, batch, seq = (3, 2, 64) if tiny else (12, 8, 2048)
    result = measure_training(shape, steps, batch, seq, device=str(device), compile=device.type == "cuda")
    if result["mfu"] is None:
        result["mfu"] = "n/a: " + ("no GPU, no listed peak" if device.type != "cuda" else
                                   f"{torch.cuda.get_device_name(device)} is not in report.PEAK_FLOPS")
    return result


def demo_arguments(device: torch.device, tiny: bool, run_dir: Path) -> list[str]:
    sizes = (["--corpus-size", "1000", "--pretrain-steps", "10", "--batch-size", "8", "--grpo-steps", "2",
              "--grpo-rounds", "1", "--prompts-per-step", "4", "--group-size", "4", "--grpo-prompts", "64",
              "--heldout", "16", "--samples", "2", "--max-new-tokens", "24"] if tiny else
             ["--pretrain-steps", "200", "--grpo-steps", "6", "--heldout", "100"])
    return ["demo", "--run-dir", str(run_dir), "--device", str(device), "--fresh", *sizes]


def stage_demo(device: torch.device, tiny: bool, out: Path) -> dict:
    run_dir = out / "run"
    command = [sys.executable, "-m", "openseek.cli", *demo_arguments(device, tiny, run_dir)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (out / "demo.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(f"openseek demo exited {run.returncode}: {(run.stdout + run.stderr)[-1500:]}")
    report = json.loads((run_dir / "report.json").read_text())
    keys = ("device", "wall_seconds", "stage_seconds", "base_accuracy", "rl_accuracy", "gain_points",
            "decode_tokens_per_s", "decode_tokens_per_s_mtp", "mtp_acceptance", "mtp_greedy_identical")
    return {"command": " ".join(command[2:]), "model": str(run_dir / "model"),
            "report": {k: report[k] for k in keys if k in report}}


def stage_grpo_step(device: torch.device, tiny: bool, out: Path) -> dict:
    model = out.parent / "demo" / "run" / "model"
    if not (model / "config.json").exists():
        raise RuntimeError(f"no model at {model}: the demo stage, which makes it, did not finish")
    run_dir = out / "run"
    group, prompts, new = (4, 4, 24) if tiny else (8, 16, 128)
    command = [sys.executable, "-m", "openseek.cli", "grpo", "--model", str(model), "--task", "arithmetic",
               "--task-size", "64", "--steps", "1", "--group-size", str(group), "--prompts-per-step", str(prompts),
               "--max-new-tokens", str(new), "--template", "plain", "--device", str(device), "--run-dir",
               str(run_dir), "--no-progress", "--checkpoint-every", "0"]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (out / "grpo.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(f"openseek grpo exited {run.returncode}: {(run.stdout + run.stderr)[-1500:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = rows[-1]
    return {"command": " ".join(command[2:]), "process_seconds": seconds,
            "step": {k: v for k, v in step.items() if k.startswith(("time/", "reward", "loss", "tokens"))}}


def _with_failures(result: dict, failures: list[str]) -> dict:
    result["failures"] = failures
    if failures:
        raise StageFailures(result)
    return result


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1500]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def child(stage: str, device_spec: str, tiny: bool, out: Path) -> int:
    """Run one stage; its result (or the error) goes to OUT/<stage>/result.json."""
    from openseek.device import resolve_device

    folder = out / stage
    folder.mkdir(parents=True, exist_ok=True)
    try:
        device = resolve_device(device_spec)
        result, status = globals()[f"stage_{stage}"](device, tiny, folder), "passed"
    except StageFailures as partial:
        result, status = partial.args[0], "failed"
    except Exception as error:
        result, status = {"failures": [_error(error)], "traceback": traceback.format_exc()[-4000:]}, "failed"
    _write(folder / "result.json", {"status": status, **result})
    return 0 if status == "passed" else 1


# ---- the parent: stages in turn, then the results file -----------------------------------------------------------

def machine(device_spec: str) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "device": device_spec,
            "cpu": next((line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")), "?")}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []


def run_stage(stage: str, args) -> dict:
    limit = TIME_LIMITS[stage] * args.stage_timeout
    command = [sys.executable, __file__, "--child", stage, "--device", args.device, "--out", str(args.out)]
    command += ["--tiny"] if args.tiny else []
    for stale in ("result.json", "partial.json"):  # of an earlier run into the same folder
        (args.out / stage / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        output = run.stdout + run.stderr
    except subprocess.TimeoutExpired as expired:
        output = f"timed out after {limit:.0f} s\n" + (expired.stderr or b"").decode(errors="replace")[-2000:]
    seconds = time.perf_counter() - started
    path = args.out / stage / "result.json"
    if path.exists():
        result = json.loads(path.read_text())
    else:  # killed (time limit, a crash): what it left
        partial = args.out / stage / "partial.json"
        result = json.loads(partial.read_text()) if partial.exists() else {}
        result.update(status="failed", failures=[f"the stage process ended without a result: {output[-1500:]}"])
    result["seconds"] = round(seconds, 1)
    print(f"{stage:10s} {result['status']:7s} {seconds:6.1f} s" +
          "".join(f"\n    {f[:300]}" for f in result.get("failures", [])), flush=True)
    return result


def markdown(results: dict) -> str:
    info, stages = results["machine"], results["stages"]
    lines = [f"# GPU check, {info['date']}", "", f"`{results['command']}`", "",
             f"Machine: {info.get('gpu', 'no GPU')}; CPU {info['cpu']}; torch {info['torch']}"
             f"{', CUDA ' + info['cuda'] if info.get('cuda') else ''}.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']} |" for name, r in stages.items()]
    tests = stages.get("tests", {}).get("tests", [])
    if tests:
        lines += ["", "## CUDA tests", "", "| test | outcome | detail |", "|---|---|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['detail'][:120]} |" for t in tests]
    decode = stages.get("decode", {})
    if decode.get("runs"):
        nominal = decode.get("nominal_bandwidth")
        lines += ["", f"## Decode ({decode['model']}; {decode['prompt']}-token prompts, {decode['new_tokens']} new)",
                  "", f"Bandwidth: measured {decode['measured_bandwidth'] / 1e9:.1f} GB/s; nominal "
                  f"{f'{nominal / 1e9:.0f} GB/s' if nominal else 'n/a'}. Weights read per step "
                  f"{decode['weight_bytes_per_step'] / 1e6:.4g} MB.", "",
                  "| mode | batch | tokens/s | of the roofline (measured bw) | of the roofline (nominal bw) |",
                  "|---|---|---|---|---|"]
        for r in decode["runs"]:
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['batch']} | failed: {r['error'][:100]} | | |")
                continue
            of_nominal = "n/a" if r["fraction_of_nominal"] is None else f"{r['fraction_of_nominal']:.0%}"
            lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['fraction_of_measured']:.0%}"
                         f" | {of_nominal} |")
    train = stages.get("train", {})
    if "tokens_per_s" in train:
        mfu = train["mfu"] if isinstance(train["mfu"], str) else f"{train['mfu']:.1%}"
        lines += ["", "## Training step", "", f"{train['params'] / 1e6:.3g}M parameters, B={train['batch_size']} "
                  f"T={train['seq_len']}, {train['precision']}, compiled: {train['compiled']}: "
                  f"{train['tokens_per_s']:,.0f} tokens/s, {train['flops_per_s'] / 1e12:.3g} TFLOP/s achieved "
                  f"({train['flops_per_token'] / 1e9:.3g} GFLOP/token), MFU {mfu}."]
    for name in ("demo", "grpo_step"):
        figures = stages.get(name, {}).get("report" if name == "demo" else "step")
        if figures:
            lines += ["", f"## {name}", "", f"`{stages[name]['command']}`", "", "```",
                      json.dumps(figures, indent=1), "```"]
    failures = [f"{name}: {f}" for name, r in stages.items() for f in r.get("failures", [])]
    lines += ["", "## Failures", ""] + ([f"- {f[:400]}" for f in failures] or ["none"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu")
    parser.add_argument("--tiny", action="store_true", help="every stage at toy sizes (seconds on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where the results go")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--stage-timeout", type=float, default=1.0, help="multiplies every stage's time limit")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.child:
        return child(args.child, args.device, args.tiny, args.out)
    os.environ.setdefault("PYTHONPATH", str(REPO))  # the stages' processes import this checkout
    started = time.perf_counter()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(args.device),
               "stages": {}}
    for stage in args.stages:
        results["stages"][stage] = run_stage(stage, args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["failed"] = [name for name, r in results["stages"].items() if r["status"] != "passed"]
    _write(args.out / "gpu_check.json", results)
    (args.out / "gpu_check.md").write_text(markdown(results))
    print(f"{len(results['failed'])} of {len(args.stages)} stages failed ({', '.join(results['failed']) or 'none'});"
          f" {results['seconds']:.0f} s; results in {args.out / 'gpu_check.json'} and gpu_check.md")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
