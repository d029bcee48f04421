"""Claim: openseek's batch-1 decode against llama.cpp at each precision (F32/float32, BF16/bfloat16, Q8_0/int8,
Q4_0/int4), on the same random Qwen2.5-0.5B-shaped checkpoint, greedy, 64-token prompt, 128 new tokens.

llama.cpp runs through llama-cpp-python, built from its sdist for this machine in a venv of its own (not part of
`make test`; the `[bench]` extra names the version):

    python3.11 -m venv /work/bench-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/bench-venv/bin/pip install "llama-cpp-python==0.3.36"
    .venv/bin/python benchmarks/vs_llamacpp.py --llama-python /work/bench-venv/bin/python [--threads 1 2]

On a VM that lists AMX flags but does not let a process use AMX, the native build's Q8_0/Q4_0 kernels die with
SIGILL (or SIGSEGV, exit -11); build with the instruction sets named and AMX off instead (what benchmarks/RESULTS.md
rounds 3 and 7 used). `--no-cache-dir` matters: pip's wheel cache ignores CMAKE_ARGS and would hand back the native
build (llama.cpp's load log then still lists `AMX_INT8 = 1`):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
      -DGGML_AMX_BF16=OFF" /work/bench-venv-noamx/bin/pip install --no-cache-dir "llama-cpp-python==0.3.36"

The checkpoint is saved by transformers and converted with llama.cpp's own `convert_hf_to_gguf.py` (vendored in
that sdist, fetched by `pip download`) at F32, BF16 and Q8_0; Q4_0 is quantised from the F32 file with
`llama_model_quantize` (llama.cpp's default keeps the output layer at Q8_0, as openseek's int4 keeps a tied head at
int8). The converter refuses BPE tokenizers whose pre-tokenizer hash it does not know: this script runs it with
`conversion.base.TextModel.get_vocab_base_pre` patched to answer "qwen2" (a copy in memory; the benchmark feeds token ids, so the
pre-tokenizer never runs). Each measurement runs in its own process; decode time = time(prompt + 128 tokens) −
time(prompt + 1 token), best of 3. openseek runs twice per precision, eager and with `Engine(compile=True)` (what
`--compile` gives on the commands; its compilation happens in the warm-up, outside the timing); `--modes` picks.
Threads are pinned: `--threads N` gives llama.cpp `n_threads = n_threads_batch = N` and openseek
`Engine(threads=N)` (exactly N; `Engine(threads=None)` would tune between all cores and one), and `--threads auto`
is a separate, labelled row with both at their own defaults. `uptime` and the read bandwidth are logged before
each round; each speed is also a fraction of the memory roofline, that bandwidth over the GGUF file's bytes.
Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from machine import read_bandwidth, uptime

PROMPT, NEW = 64, 128
VERSION = "0.3.36"
PAIRS = [("F32", "float32", "none"), ("BF16", "bfloat16", "none"), ("Q8_0", "bfloat16", "int8"),
         ("Q4_0", "bfloat16", "int4")]
SHAPE = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6)


def make_checkpoint(directory: Path) -> None:
    """A random Qwen2.5-0.5B-shaped model saved by transformers, with a small BPE tokenizer (ids beyond it are
    padding to the converter)."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from openseek.tokenizer import train_bpe

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.save_pretrained(directory)
    train_bpe([f"{i} plus {i * 7} is {i * 8}" for i in range(2000)], 512).save(directory)


def converter(cache: Path, llama_python: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist (downloaded once)."""
    source = cache / f"llama_cpp_python-{VERSION}"
    if not source.is_dir():
        subprocess.run([llama_python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        "-d", str(cache), f"llama-cpp-python=={VERSION}"], check=True)
        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
    return source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def convert(script: Path, directory: Path, outtype: str, out: Path) -> None:
    subprocess.run([sys.executable, __file__, "--convert", str(script), str(directory), outtype, str(out)],
                   check=True, capture_output=True)


def run_converter(script: str, directory: str, outtype: str, out: str) -> None:
    """In a child process: llama.cpp's converter with the pre-tokenizer lookup answering "qwen2"."""
    import importlib
    import importlib.util

    sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    base = importlib.import_module("conversion.base")  # where TextModel lives in this converter's version
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"

    def no_sentencepiece(self):  # our tokenizer is tokenizer.json only: go straight to the BPE path
        raise FileNotFoundError("no tokenizer.model")

    base.TextModel._set_vocab_sentencepiece = no_sentencepiece
    sys.argv = [script, directory, "--outtype", outtype, "--outfile", out]
    module.main()


def quantize_q4(llama_python: str, source: Path, out: Path) -> None:
    code = ("import ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
            "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
            f"assert llama_cpp.llama_model_quantize({str(source)!r}.encode(), {str(out)!r}.encode(), "
            "ctypes.byref(p)) == 0")
    subprocess.run([llama_python, "-c", code], check=True, capture_output=True)


LLAMA_CHILD = """
import json, sys, time, llama_cpp
path, threads, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pinned = {} if threads == "auto" else {"n_threads": int(threads), "n_threads_batch": int(threads)}
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=prompt, verbose=False, **pinned)  # auto: its defaults
tokens = list(range(10, 10 + prompt))
def run(n):
    llm.reset()
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True), 1):
        if i == n:
            break
    return time.perf_counter() - start
run(4)
decode = min(run(new) - run(1) for _ in range(3))
print(json.dumps({"tokens_per_s": (new - 1) / decode}))
"""


def openseek_child(directory: str, dtype: str, quantize: str, threads: str, compile: bool) -> dict:
    """`threads`: a count, exactly that many threads (the Engine's own tuner would otherwise pick between all cores
    and one, whatever torch.set_num_threads says), or auto: the Engine measures and chooses."""
    import torch

    import openseek

    fixed = None if threads == "auto" else int(threads)
    if fixed is not None:
        torch.set_num_threads(fixed)
    engine = openseek.Engine(openseek.load(directory, dtype=dtype, quantize=quantize), max_batch_size=1,
                             compile=compile, threads=fixed)
    tokens = [list(range(10, 10 + PROMPT))]

    def run(n):
        start = time.perf_counter()
        engine.generate(tokens, n, temperature=0, stop_token_ids=[])
        return time.perf_counter() - start

    run(4)
    decode = min(run(NEW) - run(1) for _ in range(3))
    return {"tokens_per_s": (NEW - 1) / decode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-python", default="/work/bench-venv/bin/python")
    parser.add_argument("--threads", nargs="+", default=["1", "2"],
                        help="each a count (both sides on exactly that many threads) or auto (a separate row: "
                             "openseek's Engine tunes, llama.cpp at llama-cpp-python's default n_threads)")
    parser.add_argument("--precisions", nargs="+", default=[p[0] for p in PAIRS], choices=[p[0] for p in PAIRS])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "openseek-llamacpp"))
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole alternation; each round prints its own lines (the machine drifts)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="openseek's decode step: eager, torch.compile'd (Engine(compile=True)), or both")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:
        run_converter(*args.convert)
        return
    if args.child:
        print(json.dumps(openseek_child(*args.child[:4], args.child[4] == "compiled")))
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    directory = cache / "qwen2.5-0.5b-shaped"
    if not (directory / "config.json").is_file():
        make_checkpoint(directory)
    script = converter(cache, args.llama_python)
    files = {}
    for gguf, outtype in (("F32", "f32"), ("BF16", "bf16"), ("Q8_0", "q8_0")):
        files[gguf] = cache / f"model-{gguf}.gguf"
        if not files[gguf].is_file():
            convert(script, directory, outtype, files[gguf])
    files["Q4_0"] = cache / "model-Q4_0.gguf"
    if not files["Q4_0"].is_file():
        quantize_q4(args.llama_python, files["F32"], files["Q4_0"])
    print(f"batch 1, {PROMPT}-token prompt, {NEW} new tokens, greedy; decode tokens/s (best of 3); roofline = "
          "the read bandwidth just measured / the GGUF file's bytes (every weight streamed once per token)")
    for round_, threads in itertools.product(range(1, args.rounds + 1), args.threads):
        bandwidth = read_bandwidth()
        print(f"round {round_}, threads {threads}, {time.strftime('%H:%M:%S')}; read bandwidth {bandwidth:.1f} GB/s; "
              f"{uptime()}", flush=True)
        for gguf, dtype, quantize in PAIRS:  # alternating: llama.cpp then openseek at each precision
            if gguf not in args.precisions:
                continue
            llama = subprocess.run([args.llama_python, "-c", LLAMA_CHILD, str(files[gguf]), str(threads),
                                    str(PROMPT), str(NEW)], capture_output=True, text=True)
            ours = {}
            for mode in args.modes:
                out = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype, quantize,
                                      str(threads), mode], capture_output=True, text=True, check=True)
                ours[mode] = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
            if llama.returncode:  # e.g. SIGILL: a kernel built for an instruction this (virtual) CPU refuses
                print(f"{threads} threads  llama.cpp {gguf:5s} failed (exit {llama.returncode})   openseek "
                      f"{dtype}/{quantize:4s} " + "   ".join(f"{m} {b:6.1f}" for m, b in ours.items()), flush=True)
                continue
            a = json.loads(llama.stdout.strip().splitlines()[-1])["tokens_per_s"]
            roofline = bandwidth * 1e9 / files[gguf].stat().st_size  # tokens/s if decode only streamed weights
            print(f"{threads} threads  llama.cpp {gguf:5s} {a:6.1f} ({a / roofline:.0%} of roofline "
                  f"{roofline:.1f})   openseek {dtype}/{quantize:4s} "
                  + "   ".join(f"{m} {b:6.1f} ({b / roofline:.0%}) -> {b / a:.2f}x" for m, b in ours.items()),
                  flush=True)


if __name__ == "__main__":
    main()
