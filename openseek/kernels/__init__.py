"""Small CPU kernels of our own, built on first use for the machine they run on.

PyTorch's int8 weight-only matmul (`aten._weight_int8pack_mm`) converts every weight to bf16 before multiplying and
reaches a small fraction of the memory bandwidth at decode's few rows (benchmarks/RESULTS.md). `int8_vnni.cpp`
multiplies int8 weights by int8-quantised activations with AVX-512 VNNI instead, reading each weight byte once.

The extension is compiled with the machine's own flags by `torch.utils.cpp_extension` the first time a model is
quantised (about 40 s, then cached under ~/.cache/torch_extensions). Where it cannot be built or run (no AVX-512
VNNI, no compiler), `int8_vnni()` returns None after saying why in one line, and callers use PyTorch's kernel.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from openseek.device import cpu_flags

SOURCE = Path(__file__).with_name("int8_vnni.cpp")


@functools.cache
def int8_vnni():
    """The compiled extension (`.int8_matmul(x, packed, scales, rowsum)`), or None with a line on stderr saying why."""
    missing = {"avx512f", "avx512bw", "avx512_vnni"} - cpu_flags()
    if missing:
        print(f"int8: this CPU lacks {', '.join(sorted(missing))}; using PyTorch's int8 kernel", file=sys.stderr)
        return None
    try:
        from torch.utils.cpp_extension import load

        print("int8: building the AVX-512 VNNI kernel for this machine (once; cached)", file=sys.stderr)
        return load("openseek_int8_vnni", [str(SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False)
    except Exception as error:  # no compiler or headers: the slower kernel still gives the same model
        print(f"int8: could not build the VNNI kernel ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
              "using PyTorch's int8 kernel", file=sys.stderr)
        return None

