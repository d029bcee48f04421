"""Building and choosing our kernels: a broken kernel stops the install with the compiler's message, a CPU without
the instructions gets one line and the PyTorch path, OPENSEEK_KERNELS picks the level (0 turns every kernel off; a
level the CPU cannot run is refused naming the flags it lacks), and a build is never shared between CPUs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import openseek.kernels as kernels
from openseek.kernels import ops


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


AVX512_CPU = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"})
AVX2_CPU = frozenset({"avx", "avx2", "fma", "f16c"})


@pytest.mark.parametrize("value, flags, level", [
    ("auto", AVX512_CPU, "avx512"), ("", AVX512_CPU, "avx512"), (" AUTO ", AVX512_CPU, "avx512"),
    ("1", AVX512_CPU, "avx512"), ("auto", AVX2_CPU, "avx2"), ("auto", frozenset({"sse2"}), "0"),
    ("avx2", AVX512_CPU, "avx2"), ("avx512", AVX512_CPU, "avx512"), ("avx2", AVX2_CPU, "avx2"),
    ("0", AVX512_CPU, "0"), ("off", AVX2_CPU, "0"), ("none", AVX512_CPU, "0"),
])
def test_openseek_kernels_selects_a_level(value, flags, level, monkeypatch):
    """`auto` is the best level the CPU runs (an AVX-512 one runs the AVX2 level too), a level's name that level,
    0 PyTorch only; ARM and CPUs without AVX2 have no level yet and run PyTorch."""
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    assert ops.choose_level(value) == level
    assert ops.executable_levels() == [name for name in ("avx512", "avx2") if ops.LEVELS[name].flags <= flags]


@pytest.mark.parametrize("value, message", [
    ("avx512", "OPENSEEK_KERNELS=avx512: this CPU lacks avx512_bf16, avx512_vnni, avx512bw, avx512f, which the avx512 "
               "kernels need; it runs OPENSEEK_KERNELS=avx2, 0"),
    ("avx3", "OPENSEEK_KERNELS='avx3': expected auto, avx512, avx2 or 0 (PyTorch only)"),
])
def test_a_level_this_cpu_cannot_run_is_refused_naming_what_it_lacks(value, message, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX2_CPU)
    with pytest.raises(ValueError) as error:
        ops.choose_level(value)
    assert str(error.value) == message
    with pytest.raises(ValueError, match="this CPU lacks avx512_bf16"):
        with ops.use_level("avx512"):
            pass


def test_the_level_a_process_runs_at_is_the_one_its_environment_names():
    """OPENSEEK_KERNELS as a user sets it, in a fresh process (which sees the real CPU, whatever this one is told):
    each level the CPU runs is taken as named, and one it cannot run is an error naming what the CPU lacks."""
    def level_of(value):
        code = "from openseek.kernels import ops; print(','.join(ops.executable_levels())); print(ops.current_level())"
        return subprocess.run([sys.executable, "-c", code], env=os.environ | {"OPENSEEK_KERNELS": value},
                              capture_output=True, text=True, timeout=120)

    runs, auto = level_of("auto").stdout.splitlines()
    runs = runs.split(",") if runs else []
    assert auto == (runs[0] if runs else "0")
    for name in ops.LEVELS:
        result = level_of(name)
        if name in runs:
            assert result.returncode == 0 and result.stdout.split()[-1] == name, result.stderr
        else:
            assert result.returncode == 1 and f"OPENSEEK_KERNELS={name}: this CPU lacks" in result.stderr
    assert level_of("0").stdout.split()[-1] == "0"


def test_use_level_runs_code_at_a_level_and_restores_the_one_before():
    before = ops.current_level()
    with ops.use_level(ops.PYTORCH):
        assert ops.current_level() == "0" and not ops.has("dense") and not ops.has("quantized")
        for name in ops.executable_levels():
            with ops.use_level(name):
                assert ops.current_level() == name
            assert ops.current_level() == "0"
    assert ops.current_level() == before


def test_a_level_whose_extension_is_not_in_this_build_runs_pytorch_with_one_line(monkeypatch, capsys):
    """A level's extension that this build lacks (a level being written, or one ported to another CPU) leaves that
    family on PyTorch's kernels, after one line naming it; the model still runs, and gives PyTorch's results."""
    monkeypatch.setattr(ops, "LEVELS", ops.LEVELS | {"future": ops.Level(frozenset(), "dense_future",
                                                                          "quantized_future", "openseek_future")})
    ops._extension.cache_clear()
    try:
        with ops.use_level("future"):
            assert not ops.has("dense") and not ops.has("quantized") and not ops.has("dense")
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            with torch.no_grad():
                assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))
            with pytest.raises(RuntimeError, match=r"int8_matmul: the level in force \(OPENSEEK_KERNELS=future\) "
                                                   r"has no quantized kernels on this machine"):
                ops.int8_matmul(x, torch.zeros(1, 2, 16, 4, dtype=torch.int8), torch.ones(16), torch.zeros(16))
    finally:
        ops._extension.cache_clear()
    assert capsys.readouterr().err.splitlines() == [
        "dense kernels at future: dense_future is not part of this build; using PyTorch's",
        "quantized kernels at future: quantized_future is not part of this build; using PyTorch's",
    ]


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
def quantized(level):
    """The level's operators (torch.ops.<namespace>), called as a compiled graph calls them."""
    return getattr(torch.ops, ops.LEVELS[level].namespace)


@pytest.mark.parametrize("bad, message", [
    ("short scales", "scales must be a contiguous [32] float vector"),
    ("bf16 scales", "scales must be a contiguous [32] float vector"),
    ("short rowsum", "rowsum must be a contiguous [32] int vector"),
    ("wide x", "packed must be a contiguous [N/16, K/4, 16, 4] int8 tensor for x [..., 128]"),
    ("int x", "x must be float32, bfloat16 or float16"),
])
@pytest.mark.kernels("quantized")
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
@pytest.mark.kernels("quantized", "dense")
def test_grouped_kernels_refuse_group_ends_that_are_not_cumulative_counts(quantized, ends, message):
    """ends [G] are cumulative row counts: out of order, a group's rows would start before the previous group's
    ended (or before row 0) and the kernel would read and write outside x and y."""
    from openseek.quantize import GroupedInt8

    stack = GroupedInt8(3, 32, 64)  # 3 experts [out 32, in 64]
    stack.load_weight(torch.randn(3, 32, 64))
    x, ends = torch.randn(3, 64), torch.tensor(ends)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        quantized.grouped_int8_matmul(x, stack.weight, stack.scales, stack.rowsum, ends)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        quantized.grouped_linear_fp32(x, torch.randn(3, 32, 64), ends)


def test_a_changed_header_changes_the_build_flags(tmp_path):
    """torch's builder rebuilds on a changed source or flag only; the headers' hash is passed as a define."""
    for header in kernels.HERE.glob("*.h"):
        shutil.copy(header, tmp_path / header.name)
    before = kernels.headers_hash(tmp_path)
    assert before == kernels.headers_hash(kernels.HERE)
    (tmp_path / "simd.h").write_text((tmp_path / "simd.h").read_text() + "\n// changed\n")
    assert kernels.headers_hash(tmp_path) != before
