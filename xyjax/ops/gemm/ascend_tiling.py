"""The host side of the Ascend SmoothGEMM kernel (``ascend_ffi/ascendc/kernels/smooth_gemm.py``): a fixed set of
tile shapes, the tile order per shape from the profile table, and the launch's tiling (``GemmTiling``, the
ctypes mirror of ``ascend_ffi/include/xyjax/ascend_tiling.h``). Nothing here needs CANN; the kernel has been
interpreted and translated on CPU, never run on an NPU, so no profile of it exists yet and every shape takes
the defaults below."""

from __future__ import annotations

import ctypes

# The fixed tile shapes (m_tile, n_tile): heights 16-128 (m is virtually padded to a multiple of one), widths
# Fig. 7c's 64-256, each within a 910B's 192 KiB UB as asctile allocates it at K_TILE 128 (translate.py checks;
# 64 x 256, 128 x 256 do not fit). A profile entry may name n_tile and order.
SHAPES = ((16, 64), (16, 128), (16, 256), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64),
          (128, 128))
N_TILE, K_TILE = 128, 128       # default width; the K step
NUM_CORES = 24                  # AI cores of a 910B (the paper: 20-25)


class GemmTiling(ctypes.Structure):
    """XyjaxAscendGemmTiling (field meanings in the header)."""

    _fields_ = [(name, ctypes.c_int32) for name in ("m", "n", "k", "m_tile", "n_tile", "k_tile", "order",
                                                      "num_cores")]


def gemm_tiling(m: int, k: int, n: int, params: dict | None = None, num_cores: int = NUM_CORES) -> GemmTiling:
    """Tiling of out[m, n] = x[m, k] @ w[n, k]^T: n_tile and order from ``params`` (a ``GemmProfile.params`` entry
    of the ``ascend`` backend; {} or None: defaults), then the smallest tile height >= m of the ``SHAPES`` with
    that width (else the largest). Raises ValueError when n or k do not divide into the tiles."""
    params = params or {}
    n_tile, order = int(params.get("n_tile", N_TILE)), int(params.get("order", 0))
    heights = [mt for mt, nt in SHAPES if nt == n_tile] or [0]
    m_tile = next((t for t in heights if t >= m), heights[-1])
    k_tile = min(K_TILE, k)
    if m < 1 or m_tile == 0 or n % n_tile or k % k_tile or order not in (0, 1):
        raise ValueError(f"no Ascend gemm tiling for m={m} k={k} n={n} with n_tile={n_tile} order={order} "
                         f"(n must divide by an n_tile of {SHAPES}, k by {k_tile})")
    return GemmTiling(m=m, n=n, k=k, m_tile=m_tile, n_tile=n_tile, k_tile=k_tile, order=order,
                      num_cores=num_cores)
