"""SmoothGEMM as an asctile kernel: out[m, N] = x[m, K] @ w[N, K]^T on the cube, float32 accumulation, for any
real row count m with tiles of a fixed shape (M_TILE x N_TILE, K in K_TILE steps).

Virtual padding: x and out are declared with their real m rows, so a tile's load reads only the rows < m from
global memory (asctile clips the copy; the rest of the on-chip tile is never read back) and its store writes
only the real rows (``real_shape``); nothing is padded in global memory. The host picks the tile shape from a
fixed set and the tile order (``order`` 0: tiles in m-major order, 1: n-major) from the profile table
(``xyjax.ops.gemm.ascend_tiling``); core c takes tiles c, c + cores, ...

Same status as meta_attention.py: interpreted and translated here, never compiled or run on an NPU.
Operands: x [m, K] and w [n, K] float16 or bfloat16 (n a multiple of N_TILE, K of K_TILE; K is a compile-time
constant, since asctile's lowering failed on a runtime row length); out [m, n] in x's dtype.
"""

import asc.experimental.asctile as asctile


@asctile.jit
def smooth_gemm(x_ptr: asctile.GlobalAddress, w_ptr: asctile.GlobalAddress, out_ptr: asctile.GlobalAddress,
                m: int, n: int, order: int, M_TILE: asctile.ConstExpr, N_TILE: asctile.ConstExpr,
                K_TILE: asctile.ConstExpr, K: asctile.ConstExpr):
    x_gm = asctile.global_tensor(x_ptr, [m, K])
    w_gm = asctile.global_tensor(w_ptr, [n, K])
    out_gm = asctile.global_tensor(out_ptr, [m, n])
    m_tiles = (m + M_TILE - 1) // M_TILE
    n_tiles = n // N_TILE
    for tile in asctile.range(asctile.block_idx(), m_tiles * n_tiles, asctile.block_num()):
        # order 0: m-major (consecutive tiles share x's rows), 1: n-major (they share w's rows)
        mi = (1 - order) * (tile // n_tiles) + order * (tile % m_tiles)
        ni = (1 - order) * (tile % n_tiles) + order * (tile // m_tiles)
        row = mi * M_TILE
        col = ni * N_TILE
        acc = asctile.zeros_acc([M_TILE, N_TILE], asctile.float32)
        for step in asctile.range(K // K_TILE):
            x = asctile.copy_in(x_gm, [row, step * K_TILE], [M_TILE, K_TILE])  # rows >= m are not read
            w = asctile.copy_in(w_gm, [col, step * K_TILE], [N_TILE, K_TILE])
            asctile.matmul_acc(acc, x, w.T)
        asctile.copy_out(acc.to(x_gm.dtype), out_gm, [row, col], real_shape=[min(M_TILE, m - row), N_TILE])
