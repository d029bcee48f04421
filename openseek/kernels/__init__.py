"""Small CPU kernels of our own for decode's matmuls and the training pass's elementwise work, built on first use for
the machine they run on: `quantized_vnni.cpp` and `quantized_avx2.cpp` (int8/int4 weights), `dense.cpp`
(float32/bf16 weights, decode attention, the training pass's elementwise kernels; one source built per level).

Each loader here (named after its extension) builds or loads it, or returns None after saying why in one line;
`ops.py` chooses which level runs and calls them; `OPENSEEK_KERNELS` picks the level (`auto`, a level's name, `0`).
`python -m openseek.kernels` builds them all at install. Why these kernels, how the build and the cache work, and
how to add a level: docs/kernels.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from openseek.device import cpu_flags

HERE = Path(__file__).parent


def _with_quantized_shapes(module, namespace: str):
    """A quantized extension (or None), its operators under `namespace` given their shape-only versions for
    torch.compile."""
    if module is None:
        return None
    torch.library.register_fake(f"{namespace}::int8_matmul")(_int8_matmul_shape)
    torch.library.register_fake(f"{namespace}::int4_matmul")(_int4_matmul_shape)
    torch.library.register_fake(f"{namespace}::grouped_int8_matmul")(_grouped_int8_matmul_shape)
    torch.library.register_fake(f"{namespace}::int8_experts")(_int8_experts_shape)
    return module


@functools.cache
def quantized_vnni():
    """The compiled extension (`.int8_matmul(x, packed, scales, rowsum)`, `.int4_matmul(x, packed)`,
    `.grouped_int8_matmul(x, packed, scales, rowsum, ends)` and `.int8_experts(...)`: MoE's experts), or None with a
    line on stderr saying why."""
    return _with_quantized_shapes(build("quantized_vnni"), "openseek")


@functools.cache
def quantized_avx2():
    """`quantized_vnni()`'s functions at the AVX2 level (the same arguments, packed weights and results; `use_amx`
    always False), as operators under torch.ops.openseek_avx2, or None with a line on stderr saying why."""
    return _with_quantized_shapes(build("quantized_avx2"), "openseek_avx2")


@functools.cache
def dense_avx512():
    """The compiled extension (`.linear_bf16(x, w)`, `.linear_fp32(x, w)`: x [M, K] · w [N, K]ᵀ;
    `.grouped_linear_bf16(x, w, ends)`, `.grouped_linear_fp32`: x's rows by group times w [G, N, K];
    `.attend_cache(q, k, v, mask, scale)`: decode's attention over the cache; `.attend_latent`: MLA's absorbed
    decode; `.route_experts`, `.combine_experts`: MoE's routing and weighted sum in decode; `.store_latent`: MLA's
    cache write; `.masked_softmax`, `.token_logprobs`, `.rms_norm`, `.swiglu`, `.rope` and their backwards), or None
    with a line on stderr saying why. Its operators are torch.ops.openseek.*."""
    return _dense("dense_avx512", "openseek")


@functools.cache
def dense_avx2():
    """`dense_avx512`'s functions, with the same arguments and results, compiled for AVX2 + FMA + F16C (the CPUs
    without AVX-512: Intel Core, AMD Zen 2/3), or None with a line on stderr saying why. Runs on AVX-512 CPUs too,
    which is how their tests cover it. Its operators are torch.ops.openseek_avx2.*."""
    return _dense("dense_avx2", "openseek_avx2")


def _dense(name: str, namespace: str):
    """Build dense extension `name` and give its operators in `namespace` their shape-only versions."""
    module = build(name)
    if module is not None:
        for op, shape in (("linear_bf16", _linear_shape), ("linear_fp32", _linear_shape),
                          ("grouped_linear_bf16", _grouped_linear_shape),
                          ("grouped_linear_fp32", _grouped_linear_shape), ("attend_cache", _attend_cache_shape),
                          ("attend_latent", _attend_latent_shape), ("route_experts", _route_experts_shape),
                          ("combine_experts", _combine_experts_shape)):
            torch.library.register_fake(f"{namespace}::{op}")(shape)
    return module


def _int8_matmul_shape(x, packed, scales, rowsum):
    out_dtype = torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32
    return x.new_empty(*x.shape[:-1], scales.shape[0], dtype=out_dtype)


def _int4_matmul_shape(x, packed):
    out_dtype = torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32
    return x.new_empty(x.shape[0], packed.shape[0] * 16, dtype=out_dtype)


def _grouped_int8_matmul_shape(x, packed, scales, rowsum, ends):
    out_dtype = torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32
    return x.new_empty(x.shape[0], scales.shape[1], dtype=out_dtype)


def _int8_experts_shape(x, token, ends, weight, *stacks):
    return torch.empty_like(x)


def _linear_shape(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def _grouped_linear_shape(x, w, ends):
    return x.new_empty(x.shape[0], w.shape[1])


def _attend_cache_shape(q, k, v, mask, scale):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H * D)


def _attend_latent_shape(q_nope, q_pe, kv, mask, w, scale):
    B, H, T, nope = q_nope.shape
    return q_nope.new_empty(B, T, w.shape[0] - H * nope)


def _route_experts_shape(x, w, bias, top_k, n_group, topk_group, normalise, scaling, always_on):
    pairs = x.shape[0] * (top_k + always_on)
    return [x.new_empty(pairs, dtype=torch.long), x.new_empty(w.shape[0] + always_on, dtype=torch.long),
            x.new_empty(pairs, dtype=torch.float32)]


def _combine_experts_shape(out, token, weight, N):
    return out.new_empty(N, out.shape[1])


STALE_LOCK_SECONDS = 600  # a build takes about 40 s; a lock this old was left by a process killed while building


def clear_stale_lock(build: Path, what: str) -> None:
    """Remove the `lock` file that torch's extension builder leaves in `build` when its process is killed mid-build
    (Ctrl-C during the first run): the next process would otherwise wait on it forever, silently."""
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"{what}: removing {lock}, left {age / 60:.0f} minutes ago by a build that did not finish",
              file=sys.stderr)
        lock.unlink(missing_ok=True)


KERNELS_ENV = "OPENSEEK_KERNELS"


def kernels_enabled() -> bool:
    """False when the user set OPENSEEK_KERNELS=0: PyTorch's kernels only."""
    return os.environ.get(KERNELS_ENV, "auto").strip().lower() not in ("0", "off", "none", "false")


def headers_hash(source_dir: Path) -> str:
    """A hash of the headers the kernels include (simd.h, kernel_checks.h). torch's builder rebuilds when a source
    file or a compiler flag changes, not a header; passing this as a define makes a header's change a flag's."""
    digest = hashlib.sha256()
    for header in sorted(source_dir.glob("*.h")):
        digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()[:12]


def build_directory(name: str) -> Path:
    """Where extension `name` is built and cached: one folder per extension and CPU (its flags' hash)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or _default_build_root())
    cpu = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return root / f"openseek_{name}_cpu{cpu}"


def _default_build_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


@dataclass(frozen=True)
class Extension:
    """One compiled extension: what it is for (the first words of its messages), the CPU flags it needs, what runs
    without it, its source in kernels/, and the compiler flags that choose its instruction-set level."""

    what: str
    needs: frozenset[str]
    fallback: str
    source: str
    flags: tuple[str, ...]


# -march=native: the best this CPU has (the AVX-512 sources need it for their level). The AVX2 builds name their
# level instead, x86-64-v3 (AVX2, FMA, F16C, BMI2), never native: on an AVX-512 CPU native would let the compiler
# emit AVX-512 there, and the AVX2 build tested on it would not be the one an AVX2 CPU runs.
# -ffp-contract=off for quantized_avx2: the quantised kernels' float32 steps are written to round where the VNNI
# kernel rounds, and a fused multiply-add would round once less.
NATIVE = ("-march=native",)
X86_64_V3 = ("-march=x86-64-v3", "-mtune=native")
EXTENSIONS = {
    "dense_avx512": Extension("decode matmul", frozenset({"avx512f", "avx512bw", "avx512_bf16"}), "PyTorch's matmul",
                              "dense.cpp", NATIVE),
    "dense_avx2": Extension("decode matmul (AVX2)", frozenset({"avx2", "fma", "f16c"}), "PyTorch's matmul",
                            "dense.cpp", X86_64_V3),
    "quantized_vnni": Extension("int8/int4", frozenset({"avx512f", "avx512bw", "avx512_vnni"}), "PyTorch's kernels",
                                "quantized_vnni.cpp", NATIVE),
    "quantized_avx2": Extension("int8/int4 (AVX2)", frozenset({"avx2", "fma", "f16c"}), "PyTorch's kernels",
                                "quantized_avx2.cpp", X86_64_V3 + ("-ffp-contract=off",)),
}


class KernelBuildError(RuntimeError):
    """A kernel that this CPU supports did not compile; the message holds the compiler's output."""


def build(name: str, *, source_dir: Path = HERE, strict: bool = False):
    """The compiled extension `name` (of EXTENSIONS) from `source_dir`, or None after one line on stderr saying why
    (kernels turned off, the CPU lacks what it needs, the build failed). With `strict`, a failed build raises
    KernelBuildError with the compiler's message instead."""
    extension = EXTENSIONS[name]
    what, fallback, source = extension.what, extension.fallback, extension.source
    if not kernels_enabled():
        print(f"{what}: {KERNELS_ENV}=0; using {fallback}", file=sys.stderr)
        return None
    missing = extension.needs - cpu_flags()
    if missing:
        print(f"{what}: this CPU lacks {', '.join(sorted(missing))}; using {fallback}", file=sys.stderr)
        return None
    try:
        from torch.utils.cpp_extension import load

        print(f"{what}: loading the kernel {name} ({source}, compiled for this machine on first use, then cached)",
              file=sys.stderr)
        build = build_directory(name)
        build.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build, what)
        # -fopenmp: at::parallel_for is OpenMP pragmas in ATen's headers; without it the kernel runs on one thread.
        # -Wfatal-errors: a broken kernel reports its first error in a second, not after parsing all of torch's headers
        # The module is named after the extension, not the source: one source builds several extensions.
        return load(f"openseek_{name}", [str(source_dir / source)],
                    extra_cflags=["-O3", *extension.flags, "-fopenmp", "-Wfatal-errors",
                                  f"-DOPENSEEK_HEADERS={headers_hash(source_dir)}"],
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as error:  # no compiler or headers: the slower kernel still gives the same model
        if strict:
            raise KernelBuildError(f"{what}: {source} did not build as {name} on this CPU, which supports it:\n"
                                   f"{error}") from error
        first_line = str(error).splitlines()[0][:200]
        print(f"{what}: could not build {source} as {name} ({type(error).__name__}: {first_line}); using {fallback}",
              file=sys.stderr)
        return None
