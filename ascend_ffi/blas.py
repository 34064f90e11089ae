"""The BLAS behind the CPU ``smooth_gemm`` handler: MKL's single dynamic library ``libmkl_rt`` from the PyPI
wheel ``mkl`` (a dependency of the project), found through the wheel's file list, so the build never links
a path. ``load()`` opens it once, fixes its 32-bit integer interface and sequential threading layer, and hands
``cblas_sgemm`` and ``cblas_gemm_bf16bf16f32`` to ``libxyjax_ffi`` (``xyjax_gemm_set_blas``), whose handler
cuts the real rows' columns over the lanes of its own thread pool (one BLAS thread each).

``python -m xyjax.bench.blas`` measured MKL against ``scipy-openblas32`` and the thread policies;
docs/architecture.md has the figures.
"""

from __future__ import annotations

import ctypes
import threading
from importlib import metadata
from pathlib import Path

import ascend_ffi

__all__ = ["available", "library_path", "load"]

_INTERFACE_LP64 = 0    # MKL_INTERFACE_LP64: 32-bit integers, the handler's cblas ints
_THREADING_SEQUENTIAL = 1   # MKL_THREADING_SEQUENTIAL: no OpenMP threads of its own

_LOADED: ctypes.CDLL | None = None
_LOCK = threading.Lock()


def library_path() -> Path:
    """``libmkl_rt.so.*`` of the installed ``mkl`` wheel; FileNotFoundError says how to install it."""
    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError("the ffi smooth_gemm backend needs MKL from PyPI: pip install mkl "
                                "(a dependency of xyjax; reinstall with `pip install -e .`)") from None
    for file in dist.files or ():
        if file.name.startswith("libmkl_rt.so"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"the installed mkl wheel ({dist.version}) has no libmkl_rt.so: reinstall it "
                            "(pip install --force-reinstall mkl)")


def available() -> bool:
    """Whether the installed packages provide the BLAS (``library_path`` finds it)."""
    try:
        library_path()
    except FileNotFoundError:
        return False
    return True


def load() -> None:
    """Open MKL and hand its gemm entry points to ``libxyjax_ffi``, once per process (later calls return at once).

    Raises FileNotFoundError when MKL or libxyjax_ffi is missing, RuntimeError when MKL refuses the LP64
    interface or the sequential layer (e.g. another MKL layer was chosen in this process first).
    """
    global _LOADED
    if _LOADED is not None:
        return
    with _LOCK:
        if _LOADED is not None:
            return
        path = library_path()
        mkl = ctypes.CDLL(str(path))
        for name in ("MKL_Set_Interface_Layer", "MKL_Set_Threading_Layer"):
            getattr(mkl, name).argtypes, getattr(mkl, name).restype = [ctypes.c_int], ctypes.c_int
        if mkl.MKL_Set_Interface_Layer(_INTERFACE_LP64) != _INTERFACE_LP64:
            raise RuntimeError(f"{path}: MKL would not use the LP64 (32-bit integer) interface")
        if mkl.MKL_Set_Threading_Layer(_THREADING_SEQUENTIAL) != _THREADING_SEQUENTIAL:
            raise RuntimeError(f"{path}: MKL would not use its sequential threading layer")
        lib = ascend_ffi.load()
        lib.xyjax_gemm_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.xyjax_gemm_set_blas.restype = None
        address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value   # noqa: E731
        lib.xyjax_gemm_set_blas(address(mkl.cblas_sgemm), address(mkl.cblas_gemm_bf16bf16f32))
        _LOADED = mkl
