"""``python -m xyjax.bench.blas``: row-major sgemm of the PyPI BLAS candidates at the default model's shapes.

Times ``cblas_sgemm`` (ctypes, C[m, N] = A[m, K] @ B[K, N], exactly m rows) of every candidate installed
(``scipy-openblas32``; MKL from the ``mkl`` wheel), with each thread count, interleaved per repetition
in one process, and prints the best-of-repeats microseconds per call and GFLOP/s: the per-shape half of how
the ffi ``smooth_gemm`` backend's BLAS was picked (docs/architecture.md has both halves). Install the
candidates first: ``pip install scipy-openblas32 mkl``.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

# SmolLM2-135M: hidden 576, q 576 + k/v 2 x 192, intermediate 1536, vocabulary 49152.
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
ROWS = (1, 4, 16, 64, 128, 256, 512)
ROW_MAJOR, NO_TRANS = 101, 111


def candidates() -> dict[str, tuple[ctypes.CDLL, ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """name -> (library, cblas_sgemm, set_num_threads) for each installed candidate."""
    found = {}
    try:
        import scipy_openblas32

        lib = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"))
        found["openblas"] = (lib, lib.scipy_cblas_sgemm, lib.scipy_openblas_set_num_threads)
    except ImportError:
        pass
    mkl = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    if mkl.is_file():
        lib = ctypes.CDLL(str(mkl))
        found["mkl"] = (lib, lib.cblas_sgemm, lib.MKL_Set_Num_Threads)
    for _, sgemm, threads in found.values():
        sgemm.restype, threads.restype = None, None
        sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                               ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        threads.argtypes = [ctypes.c_int]
    return found


def time_call(sgemm, a: np.ndarray, b: np.ndarray, c: np.ndarray, m: int, calls: int) -> float:
    """Seconds per call of ``c[:m] = a[:m] @ b``."""
    k, n = b.shape
    args = (ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)
    sgemm(*args)
    start = time.perf_counter()
    for _ in range(calls):
        sgemm(*args)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xyjax.bench.blas", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="BLAS thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.02, help="seconds of calls per timing")
    parser.add_argument("--settle", type=float, default=0.3, help="seconds of sleep between candidates")
    args = parser.parse_args(argv)
    libs = candidates()
    if not libs:
        print("no candidate BLAS installed (pip install scipy-openblas32 mkl)", file=sys.stderr)
        return 1
    threads = [int(t) for t in args.threads.split(",")]
    systems = [(name, t) for name in libs for t in threads]
    rng = np.random.default_rng(0)
    print("shape      K x N        m  " + "  ".join(f"{n}/{t}t us (GF/s)".rjust(20) for n, t in systems))
    for shape, (k, n) in SHAPES.items():
        b = rng.standard_normal((k, n), dtype=np.float32)
        a = rng.standard_normal((max(ROWS), k), dtype=np.float32)
        c = np.empty((max(ROWS), n), np.float32)
        calls = {m: max(1, min(2000, int(args.budget / max(time_call(libs[systems[0][0]][1], a, b, c, m, 1), 1e-7))))
                 for m in ROWS}
        best = {(s, m): np.inf for s in systems for m in ROWS}
        for _ in range(args.repeats):   # candidates interleaved within each repeat
            for name, t in systems:
                libs[name][2](t)
                for m in ROWS:
                    best[(name, t), m] = min(best[(name, t), m], time_call(libs[name][1], a, b, c, m, calls[m]))
                # Idle BLAS workers spin a while after a call (MKL's OpenMP 200 ms, OpenBLAS ~0.1 s): let them
                # sleep before the next candidate runs.
                time.sleep(args.settle)
        for m in ROWS:
            cells = [f"{1e6 * best[s, m]:9.1f} ({2e-9 * m * k * n / best[s, m]:6.1f})" for s in systems]
            print(f"{shape:8s} {k:5d}x{n:<6d} {m:4d}  " + "  ".join(cell.rjust(20) for cell in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
