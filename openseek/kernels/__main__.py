"""`python -m openseek.kernels`: compile every extension this CPU supports now, side by side (one compiler process
each), instead of inside the first run that needs them. `make` runs it at install.

Exit 0 when each extension is built or cannot run here (a CPU without its instructions, or OPENSEEK_KERNELS=0: one
line each says so); exit 1, after the compiler's message, when one that this CPU supports fails to build, so that a
broken kernel stops the install instead of silently slowing every run. `--source-dir` builds from another copy of
the sources (a kernel being edited)."""

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import openseek.kernels as kernels


def build_one(name: str, source_dir: Path) -> str:
    """'ready', 'unavailable' or the build's error message."""
    try:
        return "ready" if kernels.build(name, source_dir=source_dir, strict=True) is not None else "unavailable"
    except kernels.KernelBuildError as error:
        return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openseek.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=kernels.HERE, help="where the .cpp files are")
    args = parser.parse_args(argv)
    names = list(kernels.EXTENSIONS)
    with ProcessPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(build_one, names, [args.source_dir] * len(names))))
    failed = {name: result for name, result in results.items() if result not in ("ready", "unavailable")}
    for message in failed.values():
        print(message, file=sys.stderr)
    print("kernels: " + ", ".join(f"{name} {'FAILED to build' if name in failed else result}"
                                  + (" (PyTorch kernels used)" if result == "unavailable" else "")
                                  for name, result in results.items()), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
