"""Run one asctile kernel under asctile's NumPy interpreter on CPU (the pyasc-dev venv, ``make ascend-env``).

``interpret.py KERNEL CORES IN.npz OUT.npz``: IN holds the kernel's array operands as arr_0, arr_1, ... in
parameter order and ``scalars`` (its remaining arguments, a float64 vector; integral ones are passed as int);
the kernel runs once per block index 0..CORES-1 and OUT gets every array afterwards (outputs are written in
place). The main test suite calls this in a subprocess (tests/ops/test_ascend_kernels.py)."""

import os
import pathlib
import sys
import warnings

os.environ["ASCTILE_INTERPRET"] = "1"
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "kernels")]

import numpy as np  # noqa: E402
import interp_ext  # noqa: E402,F401  (before the kernels: the ops the interpreter lacks)
from meta_attention import meta_attention  # noqa: E402
from smooth_gemm import smooth_gemm  # noqa: E402

KERNELS = {"meta_attention": meta_attention, "smooth_gemm": smooth_gemm}


def main(kernel: str, cores: str, src: str, dst: str) -> None:
    data = np.load(src)
    arrays = [data[f"arr_{i}"].copy() for i in range(len(data.files) - 1)]
    scalars = [int(x) if float(x).is_integer() else float(x) for x in data["scalars"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # casts of tile rows never loaded (virtual padding)
        KERNELS[kernel][int(cores)](*arrays, *scalars)
    np.savez(dst, *arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
