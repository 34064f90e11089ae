"""The host side of the Ascend SmoothGEMM kernel (``ascend_ffi/ascendc/kernels/smooth_gemm.py``): a fixed set of
tile shapes, the tile order per shape from the profile table, and the launch's tiling (``GemmTiling``, the
ctypes mirror of ``ascend_ffi/include/xyjax/ascend_tiling.h``). Nothing here needs CANN; the kernel has been
interpreted and translated on CPU, never run on an NPU, so no profile of it exists yet and every shape takes
the defaults below."""

from __future__ import annotations

import ctypes

M_TILES = (16, 32, 64, 128)     # the fixed tile heights: m is virtually padded to a multiple of one of them
N_TILE, K_TILE = 128, 256       # defaults; a profile entry may name n_tile 64/128/256 (Fig. 7c) and order
N_TILES = (64, 128, 256)
NUM_CORES = 24                  # AI cores of a 910B (the paper: 20-25)


class GemmTiling(ctypes.Structure):
    """XyjaxAscendGemmTiling (field meanings in the header)."""

    _fields_ = [(name, ctypes.c_int32) for name in ("m", "n", "k", "m_tile", "n_tile", "k_tile", "order",
                                                      "num_cores")]


def gemm_tiling(m: int, k: int, n: int, params: dict | None = None, num_cores: int = NUM_CORES) -> GemmTiling:
    """Tiling of out[m, n] = x[m, k] @ w[n, k]^T: the smallest fixed tile height >= m (the largest past 128),
    n_tile and order from ``params`` (a ``GemmProfile.params`` entry of the ``ascend`` backend; {} or None:
    defaults). Raises ValueError when n or k do not divide into the tiles."""
    params = params or {}
    m_tile = next((t for t in M_TILES if t >= m), M_TILES[-1])
    n_tile, order = int(params.get("n_tile", N_TILE)), int(params.get("order", 0))
    k_tile = min(K_TILE, k)
    if m < 1 or n_tile not in N_TILES or n % n_tile or k % k_tile or order not in (0, 1):
        raise ValueError(f"no Ascend gemm tiling for m={m} k={k} n={n} with n_tile={n_tile} order={order} "
                         f"(n must divide by n_tile in {N_TILES}, k by {k_tile})")
    return GemmTiling(m=m, n=n, k=k, m_tile=m_tile, n_tile=n_tile, k_tile=k_tile, order=order,
                      num_cores=num_cores)
