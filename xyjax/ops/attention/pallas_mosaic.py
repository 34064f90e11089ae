"""Meta-Attention as a Pallas kernel for the Mosaic GPU lowering (Hopper: TMA copies into shared memory, wgmma).

Same contract as ``pallas.attend_pallas`` (the tile-contract task table over the paged cache; returns [T, H, D]
float32, optionally the merged log-sum-exp) for what ``unsupported`` accepts: a bfloat16 / float16 cache (q is
cast to it), head_dim a multiple of 64, KV chunks of whole cache blocks that make a multiple of 64 positions, at
most 128 packed rows per task (tile x G) and no TREE tasks (a traced table's TREE rows come out NaN, as the
Triton-style kernel's do without a tree mask). ``pallas.meta_attention_pallas`` sends everything else to the
Triton-style kernel.

Design (one CTA of one warpgroup per task; ``plgpu.kernel`` grid (W,)):
  * the task's G query heads packed as rows r = i * G + g (``metadata.packed_rows``), padded to R, a multiple
    of 64 (wgmma's M), gathered outside the kernel into [W, R, D] and copied to shared memory by one TMA;
  * its KV range walked in chunks of ``pages_per_chunk`` whole cache blocks: each block one TMA copy of
    ``k_cache[layer, page, kv_head]`` ([BS, D], the page from the block table read as a scalar from global
    memory) into a 2-slot shared-memory ring, the next chunk's copies issued before this chunk's math (one
    barrier per slot, ``pages_per_chunk`` arrivals), so loads overlap compute;
  * S = Q K^T and O += P V by wgmma (float32 accumulators in registers, P cast to the cache dtype), the
    online softmax in float32 on the WGMMA register layout; masks from iotas: row r sees position p iff p is in
    [KV_START, KV_END), r < Q_LEN * G and r >= (p - Q_POS) * G (causal: p <= Q_POS + r // G);
  * the normalised output [R, D] float32 and its lse [R] written back by TMA; the scatter into [T, H, D] and the
    merge of KV splits are ``metadata.merge_partials``, as for the Triton-style kernel. A padding task (Q_LEN 0:
    the tables' capacity is far above their real tasks) exits at once, its output rows left unwritten: they are
    all off the task's rows, which the merge drops.
Unlike the Triton-style kernel, V rows outside the task's range are not zeroed: they meet probabilities that are
exactly zero, so only a non-finite value in the cache there (the pool starts zeroed and holds model outputs)
could leak in.

Lowering it for CUDA works on a CPU host (tests: ``jax.export`` to "cuda", jax 0.11 and 0.12), and
``interpret=True`` runs it in Pallas' GPU interpreter on CPU (tests, with its race detector); compiling the
Mosaic GPU module to a cubin and running it needs the CUDA plugin and a Hopper GPU: ``examples/gpu_check.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention.metadata import TASK_COLS, merge_partials, packed_rows

__all__ = ["attend_mosaic", "unsupported"]

WG_ROWS = 64          # wgmma's M: packed rows per task are padded to a multiple of this
MAX_ROWS = 128        # packed rows one warpgroup holds in registers (accumulator + scores) without spilling
CHUNK_MULTIPLE = 64   # KV positions per chunk: a multiple of this (wgmma N of S, K of P V)
DTYPES = (jnp.bfloat16, jnp.float16)
DEFAULT_BLOCK_KV = 64
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SEMANTICS = plgpu.LoweringSemantics.Lane


def _rows(tile: int, group: int) -> int:
    return WG_ROWS * -(-tile * group // WG_ROWS)


def _pages_per_chunk(block_kv: int, block_size: int) -> int:
    return max(1, block_kv // block_size)


def unsupported(q_dtype, cache_dtype, head_dim: int, block_size: int, group: int, tile: int, *,
                has_tree: bool = False, block_kv: int = DEFAULT_BLOCK_KV) -> str | None:
    """Why this kernel cannot take the call (None: it can)."""
    chunk = _pages_per_chunk(block_kv, block_size) * block_size
    checks = [
        (jnp.dtype(cache_dtype) not in map(jnp.dtype, DTYPES), f"KV cache dtype {jnp.dtype(cache_dtype)} is not "
                                                               "bfloat16/float16"),
        (jnp.dtype(q_dtype) not in map(jnp.dtype, DTYPES + (jnp.float32,)), f"q dtype {jnp.dtype(q_dtype)}"),
        (head_dim % 64 != 0, f"head_dim {head_dim} is not a multiple of 64"),
        (block_size % 8 != 0, f"block_size {block_size} is not a multiple of 8"),
        (chunk % CHUNK_MULTIPLE != 0, f"KV chunk {chunk} (block_kv {block_kv}, block_size {block_size}) is not a "
                                      f"multiple of {CHUNK_MULTIPLE}"),
        (_rows(tile, group) > MAX_ROWS, f"tile {tile} x {group} query heads per KV head > {MAX_ROWS} rows"),
        (has_tree, "tree masks (speculative tree verify) are not ported"),
    ]
    return next((why for bad, why in checks if bad), None)


def _transforms(cols: int, dtype):
    """Shared-memory tiling + swizzle for rows of ``cols`` elements (what TMA and wgmma want)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(task_ref, layer_ref, scale_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, *, group: int, tile: int,
            pages_per_chunk: int):
    """One task (module docstring): rows [R, D] against its KV range, online softmax, then TMA back."""
    rows, head_dim = q_smem.shape
    num_blocks, block_size = k_ref.shape[1], k_ref.shape[3]
    chunk = pages_per_chunk * block_size
    dtype = k_smem.dtype
    w = lax.axis_index("task")

    seq, q_pos = task_ref[w, Field.SEQ], task_ref[w, Field.Q_POS]
    q_len = jnp.minimum(task_ref[w, Field.Q_LEN], tile)
    kv_head = task_ref[w, Field.KV_HEAD]
    causal = task_ref[w, Field.MASK_KIND] == int(MaskKind.CAUSAL)
    layer, scale = layer_ref[0], scale_ref[0]
    lo = jnp.where(q_len > 0, task_ref[w, Field.KV_START], 0)
    hi = jnp.where(q_len > 0, task_ref[w, Field.KV_END], 0)
    hi = jnp.maximum(jnp.where(causal, jnp.minimum(hi, q_pos + q_len), hi), lo)
    first_page = lo // block_size
    num_chunks = jnp.where(hi > lo, (pl.cdiv(hi, block_size) - first_page + pages_per_chunk - 1) // pages_per_chunk, 0)

    def fetch(c, slot):
        page0 = first_page + c * pages_per_chunk
        for j in range(pages_per_chunk):
            page = jnp.clip(bt_ref[seq, page0 + j], 0, num_blocks - 1)
            dst = pl.ds(j * block_size, block_size)
            plgpu.copy_gmem_to_smem(k_ref.at[layer, page, kv_head], k_smem.at[slot, dst], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[layer, page, kv_head], v_smem.at[slot, dst], v_bar.at[slot])

    @pl.when(q_len > 0)    # a padding task reads and writes nothing: its rows are dropped by the merge
    def _():
        plgpu.copy_gmem_to_smem(q_ref.at[w], q_smem, q_bar)
        pl.when(num_chunks > 0)(lambda: fetch(0, 0))
        plgpu.barrier_wait(q_bar)
        row = plgpu.broadcasted_iota(jnp.int32, (rows, chunk), 0, layout=plgpu.Layout.WGMMA)
        col = plgpu.broadcasted_iota(jnp.int32, (rows, chunk), 1, layout=plgpu.Layout.WGMMA)

        def step(c, carry):
            acc, m_prev, l_prev = carry
            slot = lax.rem(c, 2)
            pl.when(c + 1 < num_chunks)(lambda: fetch(c + 1, 1 - slot))   # the other slot was read by step c - 1
            plgpu.barrier_wait(k_bar.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((rows, chunk), jnp.float32)) * scale
            pos = (first_page + c * pages_per_chunk) * block_size + col
            visible = (pos >= lo) & (pos < hi) & (row < q_len * group) & (row >= (pos - q_pos) * group)
            s = jnp.where(visible, s, MASK_VALUE)
            m_next = jnp.maximum(m_prev, s.max(axis=1))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.where(visible, jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0])), 0.0)
            l_next = alpha * l_prev + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

            return pl.run_state(values)(plgpu.ACC.init(acc)), m_next, l_next

        init = (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
        acc, m, l = lax.fori_loop(0, num_chunks, step, init)
        seen = l > 0.0
        total = jnp.where(seen, l, 1.0)
        out = acc / lax.broadcast_in_dim(total, acc.shape, [0])
        o_smem[...] = jnp.where(causal, out, jnp.nan)     # TREE tasks are not ported: poison, never a wrong answer
        lse_smem[...] = jnp.where(seen, m + jnp.log(total), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[w])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[w])
        plgpu.wait_smem_to_gmem(0)


def attend_mosaic(q, k_cache, v_cache, layer, block_tables, tasks, scale, *, tile: int, interpret: bool = False,
                  block_kv: int = DEFAULT_BLOCK_KV, return_lse: bool = False):
    """``pallas.attend_pallas``'s contract on the Mosaic GPU lowering (module docstring); ``tasks`` rows past the
    real ones must be padding (Q_LEN 0: ``metadata.live_tasks``). ``interpret``: Pallas' GPU interpreter (CPU)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    why = unsupported(q.dtype, k_cache.dtype, head_dim, block_size, group, tile, block_kv=block_kv)
    if why or k_cache.shape != v_cache.shape or num_heads % num_kv_heads or tasks.shape[1:] != (NUM_FIELDS,):
        raise ValueError(f"attend_mosaic cannot take q {q.shape} {q.dtype}, caches {k_cache.shape} "
                         f"{k_cache.dtype} / {v_cache.shape}, tasks {tasks.shape}, tile {tile}: {why or 'shapes'}")
    rows = _rows(tile, group)
    pages_per_chunk = _pages_per_chunk(block_kv, block_size)
    chunk = pages_per_chunk * block_size
    width = tasks.shape[0]
    out_shape = (num_tokens, num_heads, head_dim)
    if width == 0:
        out = jnp.zeros(out_shape, jnp.float32)
        return (out, jnp.full(out_shape[:2], -jnp.inf, jnp.float32)) if return_lse else out

    tasks = jnp.asarray(tasks, jnp.int32)
    dtype = k_cache.dtype
    token, head = packed_rows(tasks, num_tokens, group, tile, rows)
    q_w = q.astype(dtype).at[token, head].get(mode="fill", fill_value=0)                 # [W, R, D]
    task_cols = jnp.pad(tasks, ((0, 0), (0, TASK_COLS - NUM_FIELDS)))
    tables = jnp.pad(jnp.asarray(block_tables, jnp.int32), ((0, 0), (0, pages_per_chunk)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, group=group, tile=tile, pages_per_chunk=pages_per_chunk),
        out_type=[jax.ShapeDtypeStruct((width, rows, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((width, rows), jnp.float32)],
        grid=(width,),
        grid_names=("task",),
        scratch_types=[plgpu.SMEM((rows, head_dim), dtype, transforms=_transforms(head_dim, dtype)),
                       plgpu.SMEM((2, chunk, head_dim), dtype, transforms=_transforms(head_dim, dtype)),
                       plgpu.SMEM((2, chunk, head_dim), dtype, transforms=_transforms(head_dim, dtype)),
                       plgpu.SMEM((rows, head_dim), jnp.float32, transforms=_transforms(head_dim, jnp.float32)),
                       plgpu.SMEM((rows,), jnp.float32),
                       plgpu.Barrier(),
                       plgpu.Barrier(num_arrivals=pages_per_chunk, num_barriers=2),
                       plgpu.Barrier(num_arrivals=pages_per_chunk, num_barriers=2)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
        kernel_name=f"xyjax_meta_attention_mosaic_t{tile}_g{group}",
    )
    out_w, lse_w = kernel(task_cols, jnp.asarray(layer, jnp.int32).reshape(1),
                          jnp.asarray(scale, jnp.float32).reshape(1), tables, q_w, k_cache, v_cache)
    out, lse = merge_partials(out_shape, [(token, head, out_w, lse_w)])
    return (out, lse) if return_lse else out
