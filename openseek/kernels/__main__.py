"""`python -m openseek.kernels`: compile both extensions for this machine now, side by side (one compiler process
each), instead of inside the first run that needs them. `make` runs it at install."""

import sys
from concurrent.futures import ProcessPoolExecutor


def build(name: str) -> bool:
    import openseek.kernels

    return getattr(openseek.kernels, name)() is not None


if __name__ == "__main__":
    names = ["dense_avx512", "quantized_vnni"]
    with ProcessPoolExecutor(len(names)) as pool:
        built = dict(zip(names, pool.map(build, names)))
    print("kernels: " + ", ".join(f"{n} {'ready' if ok else 'unavailable (PyTorch kernels used)'}"
                                  for n, ok in built.items()), file=sys.stderr)
    sys.exit(0)
