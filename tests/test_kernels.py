"""Building our kernels: a broken kernel stops the install with the compiler's message, a CPU without the
instructions gets one line and the PyTorch path, OPENSEEK_KERNELS=0 turns every kernel off, and a build is never
shared between CPUs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import openseek.kernels as kernels


def build_command(source_dir, build_root, **env):
    return subprocess.run([sys.executable, "-m", "openseek.kernels", "--source-dir", str(source_dir)],
                          env=os.environ | {"TORCH_EXTENSIONS_DIR": str(build_root)} | env,
                          capture_output=True, text=True, timeout=300)


def broken_sources(tmp_path):
    """A copy of the kernel sources in which every .cpp starts with a syntax error."""
    source = tmp_path / "src"
    shutil.copytree(kernels.HERE, source, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for cpp in source.glob("*.cpp"):
        cpp.write_text("int broken_on_purpose = ;\n" + cpp.read_text())
    return source


def test_a_kernel_that_fails_to_build_stops_the_build_command_with_the_compilers_message(tmp_path):
    supported = [name for name, extension in kernels.EXTENSIONS.items() if extension.needs <= kernels.cpu_flags()]
    if not supported or not kernels.kernels_enabled():
        pytest.skip("this CPU runs none of our kernels (or OPENSEEK_KERNELS=0): nothing it supports can fail")
    result = build_command(broken_sources(tmp_path), tmp_path / "build")
    assert result.returncode == 1, result.stderr
    for name in supported:
        source = kernels.EXTENSIONS[name].source
        assert f"{source} did not build as {name} on this CPU, which supports it" in result.stderr
        assert f"{source}:1:" in result.stderr and "error" in result.stderr  # the compiler's own line
        assert f"{name} FAILED to build" in result.stderr


def test_with_kernels_off_the_build_command_builds_nothing_and_says_so(tmp_path):
    result = build_command(broken_sources(tmp_path), tmp_path / "build", OPENSEEK_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert "decode matmul: OPENSEEK_KERNELS=0; using PyTorch's matmul" in result.stderr
    assert "int8/int4: OPENSEEK_KERNELS=0; using PyTorch's kernels" in result.stderr
    assert not (tmp_path / "build").exists()


def test_a_cpu_without_the_instructions_gets_one_line_and_no_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma", "f16c"}))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("OPENSEEK_KERNELS", raising=False)  # CI runs this file with it set too
    broken = broken_sources(tmp_path)
    assert kernels.build("dense_avx512", source_dir=broken, strict=True) is None
    assert kernels.build("quantized_vnni", strict=True) is None
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx", "fma"}))  # an AVX-only CPU
    assert kernels.build("dense_avx2", source_dir=broken, strict=True) is None
    assert capsys.readouterr().err.splitlines() == [
        "decode matmul: this CPU lacks avx512_bf16, avx512bw, avx512f; using PyTorch's matmul",
        "int8/int4: this CPU lacks avx512_vnni, avx512bw, avx512f; using PyTorch's kernels",
        "decode matmul (AVX2): this CPU lacks avx2, f16c; using PyTorch's matmul",
    ]


def test_the_avx2_builds_are_compiled_for_avx2_not_for_this_cpu():
    """An AVX2 build tested on an AVX-512 machine must be the one an AVX2 CPU runs: compiled for x86-64-v3 (AVX2,
    FMA, F16C), never -march=native, which would let the compiler use AVX-512 in it."""
    avx2 = [extension for name, extension in kernels.EXTENSIONS.items() if name.endswith("avx2")]
    assert avx2 and all(e.needs >= {"avx2", "fma", "f16c"} and "-march=x86-64-v3" in e.flags
                        and not any(flag.startswith("-march=native") for flag in e.flags) for e in avx2)
    module = kernels.dense_avx2()
    if module is None:
        pytest.skip("this CPU cannot run the AVX2 kernels (or OPENSEEK_KERNELS=0)")
    assert module.__doc__ == "AVX2"  # simd.h's level, from the compiler's own macros: no __AVX512F__ there
    if kernels.dense_avx512() is not None:
        assert kernels.dense_avx512().__doc__ == "AVX-512"


@pytest.mark.parametrize("value, enabled", [("auto", True), ("", True), ("1", True), ("0", False), ("off", False)])
def test_the_kernels_switch(value, enabled, monkeypatch):
    monkeypatch.setenv("OPENSEEK_KERNELS", value)
    assert kernels.kernels_enabled() is enabled


def test_the_build_cache_is_one_folder_per_cpu(tmp_path, monkeypatch):
    """-march=native code for one CPU dies of SIGILL on another: a shared cache must not hand it over."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}))
    with_avx512 = kernels.build_directory("dense_avx512")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw", "avx512_bf16", "avx2"}))
    assert kernels.build_directory("dense_avx512") == with_avx512  # the flags' order does not matter
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2"}))
    avx2_only = kernels.build_directory("dense_avx512")
    assert avx2_only != with_avx512 and avx2_only.parent == with_avx512.parent == tmp_path
    assert with_avx512.name.startswith("openseek_dense_avx512_cpu")


def int8_layer_tensors(N=32, K=64):
    from openseek.quantize import Int8Linear

    layer = Int8Linear(K, N, False, torch.float32)
    layer.load_weight(torch.randn(N, K))
    return layer


@pytest.fixture
def quantized():
    if kernels.quantized_vnni() is None:
        pytest.skip("no AVX-512 VNNI kernel on this CPU (or OPENSEEK_KERNELS=0): nothing to call")
    return torch.ops.openseek


@pytest.mark.parametrize("bad, message", [
    ("short scales", "scales must be a contiguous [32] float vector"),
    ("bf16 scales", "scales must be a contiguous [32] float vector"),
    ("short rowsum", "rowsum must be a contiguous [32] int vector"),
    ("wide x", "packed must be a contiguous [N/16, K/4, 16, 4] int8 tensor for x [..., 128]"),
    ("int x", "x must be float32, bfloat16 or float16"),
])
def test_the_int8_kernel_refuses_tensors_that_do_not_match(quantized, bad, message):
    """Called as an operator, the kernel gets whatever tensors it is handed: each length and layout is checked
    before a byte is read (a short `scales` was read past its end before)."""
    layer = int8_layer_tensors()
    x, packed, scales, rowsum = torch.randn(3, 64), layer.weight, layer.scales, layer.rowsum
    if bad == "short scales":
        scales = scales[:16].clone()
    elif bad == "bf16 scales":
        scales = scales.bfloat16()
    elif bad == "short rowsum":
        rowsum = rowsum[:16].clone()
    elif bad == "wide x":
        x = torch.randn(3, 128)
    elif bad == "int x":
        x = torch.ones(3, 64, dtype=torch.int64)
    with pytest.raises(RuntimeError) as error:
        quantized.int8_matmul(x, packed, scales, rowsum)
    assert message in str(error.value).replace("Float", "float").replace("Int", "int")


@pytest.mark.parametrize("ends, message", [
    ([2, 1, 3], "ends[1] = 1 is below 2: ends must be non-decreasing"),
    ([-1, 0, 3], "ends[0] = -1 is below 0"),
    ([1, 2, 2], "ends[-1] must equal the number of rows of x (3), got 2"),
])
def test_grouped_kernels_refuse_group_ends_that_are_not_cumulative_counts(quantized, ends, message):
    """ends [G] are cumulative row counts: out of order, a group's rows would start before the previous group's
    ended (or before row 0) and the kernel would read and write outside x and y."""
    from openseek.quantize import GroupedInt8

    stack = GroupedInt8(3, 32, 64)  # 3 experts [out 32, in 64]
    stack.load_weight(torch.randn(3, 32, 64))
    x, ends = torch.randn(3, 64), torch.tensor(ends)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        quantized.grouped_int8_matmul(x, stack.weight, stack.scales, stack.rowsum, ends)
    if kernels.dense_avx512() is not None:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.openseek.grouped_linear_fp32(x, torch.randn(3, 32, 64), ends)
