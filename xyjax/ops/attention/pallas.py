"""Meta-Attention as a Pallas kernel over the tile-contract task table (Triton lowering; interpret mode on CPU),
and ``meta_attention_pallas``, the pallas backend, which runs each task group on this kernel or on the Mosaic GPU
one (``pallas_mosaic.py``) by ``xyjax.ops.pallas_lowering``.

Contract (``ascend_ffi/include/xyjax/tile_contract.h``; fields ``xyjax.ops.attention.contract.Field``)::

    out = attend_pallas(q, k_cache, v_cache, layer, block_tables, tasks, scale, *, tile, interpret)

    q             [T, H, D] float32 / bfloat16: the step's query rows.
    k_cache,      [L, NB, Hkv, BS, D]: the whole paged cache (head-major inside a block), read in place.
      v_cache
    layer         int32 scalar (may be traced): the layer whose cache is read.
    block_tables  [S, P] int32: physical block of each logical block of sequence slot s.
    tasks         [W, NUM_FIELDS] int32 rows of the tile contract. A row with Q_LEN == 0 is a padding
                  task: it is skipped and writes nothing (``num_tasks=`` zeroes rows >= num_tasks for you).
    scale         softmax scale (Python float or traced scalar).
    tile          static: the most query rows of any task of the table (1 for decode tables).
    interpret     run the kernel in Pallas' interpreter (required on CPU).
    tree_mask     optional [T, MT] bool/uint8: row t column j set = token t sees position MASK_BASE + j.
    num_tasks     optional: rows >= num_tasks are padding whatever their Q_LEN.
    block_kv      KV positions per online-softmax step (rounded to whole cache blocks; default 64).
    return_lse    also return the merged log-sum-exp [T, H] float32 (-inf where nothing was seen), so
                  partial results of split tasks in different tables can still be merged by the caller.
    precision     of the two dots (default HIGHEST: IEEE float32 on GPU; DEFAULT lowers f32 to TF32).
    num_warps,    Triton launch parameters (ignored when interpreting).
      num_stages

    returns [T, H, D] float32. A task writes flat rows q_start .. q_start + q_len for query heads
    [kv_head * G, (kv_head + 1) * G), G = H // Hkv; rows no task covers are zero.

Masks and splits (all supported):
    CAUSAL  row i sees KV positions p in [KV_START, KV_END) with p <= Q_POS + i.
    TREE    row i sees p in [KV_START, KV_END) with p < MASK_BASE or tree_mask[Q_START + i, p - MASK_BASE]
            set (columns >= MT: not seen). TREE tasks need ``tree_mask``: with a host (numpy / concrete)
            table that lacks it a ValueError is raised; with a traced table their rows come out NaN.
    splits  the NUM_SPLITS tasks of one (seq, q_start, kv_head) each write a partial output normalised
            over their own KV range plus its log-sum-exp; partials landing on the same (row, head) are
            merged with log-sum-exp weights (outside the kernel, ``metadata.merge_partials``). For NUM_SPLITS == 1
            the merge is exact (weight exp(0) = 1). KV_START need not be block aligned.

How meta_attention's ``backend="pallas"`` is meant to call it (groups cover disjoint rows, so their
outputs add up; ``meta_attention_pallas`` below does this where it picks this kernel)::

    out = jnp.zeros(q.shape, jnp.float32)
    for g in meta.groups:
        live = jnp.arange(g.tasks.shape[0]) < g.num_tasks
        tasks = jnp.asarray(g.tasks).at[:, Field.Q_LEN].set(jnp.where(live, g.tasks[:, Field.Q_LEN], 0))
        out = out + attend_pallas(q, kv.k, kv.v, layer, meta.block_tables, tasks, scale, tile=g.tile,
                                  interpret=jax.default_backend() == "cpu", tree_mask=meta.tree_mask)

(``tree_mask=None`` is fine for tables without TREE tasks.) A table with no real task (or no rows at all) returns zeros.

Design:
  * Grid: one program per task row (W programs). Each program reads its task row (padded to 16 int32
    columns so the block is a power of two) and loops with ``lax.fori_loop`` over its own KV range only
    (virtual padding: the trip count is ceil(range / chunk) of that task; a padding task runs 0 steps).
  * Packing: the G query heads of the task's KV head are packed as rows, row r = i * G + g (query row
    i, head g), padded to R = max(16, next_pow2(tile * G)) rows, so each K/V chunk is loaded once per GQA
    group and every dot is at least 16 x 16 (Triton's minimum). The packed queries [W, R, D] are gathered
    by one jnp gather outside the kernel; the kernel's per-task outputs [W, R, D] (normalised) and
    lse [W, R] are scattered back into [T, H, D] by jnp scatters with ``mode="drop"`` outside the kernel
    (also the split merge). No dynamic-offset stores inside the kernel: portable to interpret mode,
    Triton and other backends alike.
  * KV: the cache refs are whole-array blocks (global memory); a chunk is ``pages_per_chunk`` whole
    cache blocks gathered through the block table: ``k_ref[layer, pages, kv_head]`` -> [CP, BS, D] is one
    indexer (scalar, int vector, scalar, slices), which the Triton lowering turns into pointer
    arithmetic. The block table is padded by one chunk of pages so a chunk never reads past a row.
    Page ids are clamped into the cache; V rows outside the task's range are zeroed before the dot
    (stale cache contents can never turn into NaN through 0 * inf).
  * Online softmax in float32 (scores from a dot with float32 accumulation; masked scores get a finite
    large negative value and their probabilities are zeroed explicitly, so a row that has seen nothing
    yet, e.g. in a split or tree range, accumulates nothing). dots run in the common dtype of q and the
    cache (bf16 x bf16 -> f32 on bf16 models). ``precision`` defaults to HIGHEST, so float32 dots lower
    to IEEE f32 on Triton (its DEFAULT is TF32: pass ``precision=lax.Precision.DEFAULT`` for speed).

GPU: the kernel is written for the Pallas Triton lowering (``compiler_params`` are Triton's): all
loaded values have power-of-two sizes when BS, D, block_kv are powers of two (checked when not
interpreting). Tests lower it to Triton IR for CUDA on a CPU host (``jax.export`` with
platforms=["cuda"]); compiling that IR to PTX and running it needs a GPU (``examples/gpu_check.py``). On
Hopper the backend prefers the Mosaic GPU kernel (``pallas_mosaic.py``) and uses this one for what that one does
not take (float32, tree masks, other shapes).
TPU (Mosaic) would need scalar prefetch of the task table and DMA'd pages instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xyjax.ops import pallas_lowering
from xyjax.ops.attention import pallas_mosaic
from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention.metadata import TASK_COLS, TaskTable, live_tasks, merge_partials, packed_rows

__all__ = ["attend_pallas", "meta_attention_pallas"]

MIN_ROWS = 16                    # Triton dots need M, N, K >= 16
DEFAULT_BLOCK_KV = 64            # KV positions per online-softmax step (whole cache blocks)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kernel(task_ref, layer_ref, scale_ref, bt_ref, q_ref, k_ref, v_ref, *rest, group: int, tile: int,
            pages_per_chunk: int, has_tree: bool, precision):
    """One task: packed rows [R, D] of one (query tile, KV head) against its KV range, online softmax."""
    if has_tree:
        tm_ref, o_ref, lse_ref = rest
    else:
        tm_ref, (o_ref, lse_ref) = None, rest
    rows, head_dim = q_ref.shape
    num_blocks, block_size = k_ref.shape[1], k_ref.shape[3]
    chunk = pages_per_chunk * block_size

    seq, q_pos = task_ref[Field.SEQ], task_ref[Field.Q_POS]
    q_len = jnp.minimum(task_ref[Field.Q_LEN], tile)
    kv_head, kind = task_ref[Field.KV_HEAD], task_ref[Field.MASK_KIND]
    layer, scale = layer_ref[0], scale_ref[0]
    causal = kind == int(MaskKind.CAUSAL)

    r = jnp.arange(rows, dtype=jnp.int32)
    live = r < q_len * group                                    # [R] packed rows of real query rows
    row_pos = q_pos + r // group                                # [R] absolute position of each row
    lo = jnp.where(q_len > 0, task_ref[Field.KV_START], 0)
    hi = jnp.where(q_len > 0, task_ref[Field.KV_END], 0)
    hi = jnp.where(causal, jnp.minimum(hi, q_pos + q_len), hi)  # causal: nothing past the last row
    hi = jnp.maximum(hi, lo)
    first_page = lo // block_size
    num_chunks = (pl.cdiv(hi, block_size) - first_page + pages_per_chunk - 1) // pages_per_chunk
    num_chunks = jnp.where(hi > lo, num_chunks, 0)

    q = q_ref[...]
    compute = q.dtype
    if has_tree:
        mask_base, tree_cols = task_ref[Field.MASK_BASE], tm_ref.shape[1] - 2 * chunk

    def body(c, carry):
        acc, m_prev, l_prev = carry
        page0 = first_page + c * pages_per_chunk
        pages = jnp.clip(bt_ref[seq, pl.ds(page0, pages_per_chunk)], 0, num_blocks - 1)
        k = k_ref[layer, pages, kv_head, :, :].reshape(chunk, head_dim).astype(compute)
        v = v_ref[layer, pages, kv_head, :, :].reshape(chunk, head_dim).astype(compute)
        pos = page0 * block_size + jnp.arange(chunk, dtype=jnp.int32)    # [C]
        in_range = (pos >= lo) & (pos < hi)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        seen_causal = pos[None, :] <= row_pos[:, None]
        if has_tree:
            # per-task mask rows, padded by `chunk` columns of ones (p < mask_base) on the left and
            # zeros (past the tree) on the right; a clamped start keeps the slice inside the block
            col0 = jnp.clip(page0 * block_size - mask_base + chunk, 0, tree_cols + chunk)
            seen_tree = tm_ref[:, pl.ds(col0, chunk)] != 0
            seen = jnp.where(causal, seen_causal, seen_tree)
        else:
            seen = seen_causal
        visible = seen & in_range[None, :] & live[:, None]              # [R, C]
        s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = alpha * l_prev + p.sum(axis=-1)
        v = jnp.where(in_range[:, None], v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(compute), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_next, l_next

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_chunks, body, init)
    seen_any = l > 0.0
    out = acc / jnp.where(seen_any, l, 1.0)[:, None]
    lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, l, 1.0)), -jnp.inf)
    if not has_tree:   # TREE task without its mask: poison its rows rather than answer wrongly
        out = jnp.where(causal, out, jnp.nan)
    o_ref[...] = out
    lse_ref[...] = lse


def _host_checks(tasks, tile: int, has_tree: bool):
    """Contract checks possible only on a concrete (host) table."""
    real = tasks[tasks[:, Field.Q_LEN] > 0]
    if (real[:, Field.Q_LEN] > tile).any():
        raise ValueError(f"a task has Q_LEN {real[:, Field.Q_LEN].max()} > tile={tile}")
    kinds = set(np.unique(real[:, Field.MASK_KIND]).tolist())
    if not kinds <= {int(k) for k in MaskKind}:
        raise ValueError(f"unknown MASK_KIND value(s) {sorted(kinds - {int(k) for k in MaskKind})}")
    if int(MaskKind.TREE) in kinds and not has_tree:
        raise ValueError("the table has TREE tasks: pass tree_mask=[T, MT] to attend_pallas")


def attend_pallas(q, k_cache, v_cache, layer, block_tables, tasks, scale, *, tile: int, interpret: bool,
                  tree_mask=None, num_tasks=None, block_kv: int = DEFAULT_BLOCK_KV, return_lse: bool = False,
                  precision=lax.Precision.HIGHEST, num_warps: int = 4, num_stages: int = 2):
    """Attention of every task of ``tasks`` (module docstring): [T, H, D] float32 (and [T, H] lse)."""
    if q.ndim != 3 or k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, H, D] and k/v caches [L, NB, Hkv, BS, D] alike; got q {q.shape}, "
                         f"k {k_cache.shape}, v {v_cache.shape}")
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if tasks.ndim != 2 or tasks.shape[1] != NUM_FIELDS:
        raise ValueError(f"tasks must be [W, {NUM_FIELDS}], got {tasks.shape}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    has_tree = tree_mask is not None
    if not isinstance(tasks, jax.core.Tracer) and not isinstance(num_tasks, jax.core.Tracer):
        _host_checks(np.asarray(tasks)[:None if num_tasks is None else int(num_tasks)], tile, has_tree)

    group = num_heads // num_kv_heads
    rows = max(MIN_ROWS, _next_pow2(tile * group))
    pages_per_chunk = max(1, block_kv // block_size)
    chunk = pages_per_chunk * block_size
    if not interpret:
        for name, n in (("block_size", block_size), ("head_dim", head_dim), ("KV chunk", chunk)):
            if not _is_pow2(n):
                raise ValueError(f"the Pallas Triton lowering needs power-of-two sizes: {name}={n}")
        if chunk < MIN_ROWS or head_dim < MIN_ROWS:
            raise ValueError(f"the Pallas Triton lowering needs dots of at least 16: chunk={chunk}, "
                             f"head_dim={head_dim}")

    width = tasks.shape[0]
    out_shape = (num_tokens, num_heads, head_dim)
    if width == 0:
        out = jnp.zeros(out_shape, jnp.float32)
        return (out, jnp.full(out_shape[:2], -jnp.inf, jnp.float32)) if return_lse else out

    tasks = jnp.asarray(tasks, jnp.int32) if num_tasks is None else live_tasks(TaskTable(tasks, num_tasks, tile))
    token, head = packed_rows(tasks, num_tokens, group, tile, rows)
    compute = jnp.promote_types(q.dtype, k_cache.dtype)
    q_w = q.astype(compute).at[token, head].get(mode="fill", fill_value=0)            # [W, R, D]
    task_cols = jnp.pad(tasks, ((0, 0), (0, TASK_COLS - NUM_FIELDS)))
    tables = jnp.asarray(block_tables, jnp.int32)
    tables = jnp.pad(tables, ((0, 0), (0, pages_per_chunk)))
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    scale_arr = jnp.asarray(scale, jnp.float32).reshape(1)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda w, n=x.ndim: (0,) * n)

    args = [task_cols, layer_arr, scale_arr, tables, q_w, k_cache, v_cache]
    in_specs = [pl.BlockSpec((None, TASK_COLS), lambda w: (w, 0)), whole(layer_arr), whole(scale_arr),
                whole(tables), pl.BlockSpec((None, rows, head_dim), lambda w: (w, 0, 0)),
                whole(k_cache), whole(v_cache)]
    if has_tree:
        tm = jnp.asarray(tree_mask).astype(jnp.uint8)
        if tm.ndim != 2 or tm.shape[0] != num_tokens:
            raise ValueError(f"tree_mask must be [T={num_tokens}, MT], got {tm.shape}")
        tm = jnp.concatenate([jnp.ones((num_tokens, chunk), jnp.uint8), tm,
                              jnp.zeros((num_tokens, chunk), jnp.uint8)], axis=1)
        tm_w = tm.at[token].get(mode="fill", fill_value=0)                             # [W, R, MT + 2C]
        args.append(tm_w)
        in_specs.append(pl.BlockSpec((None, rows, tm_w.shape[2]), lambda w: (w, 0, 0)))

    kernel = functools.partial(_kernel, group=group, tile=tile, pages_per_chunk=pages_per_chunk,
                               has_tree=has_tree, precision=precision)
    out_w, lse_w = pl.pallas_call(
        kernel,
        grid=(width,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, rows, head_dim), lambda w: (w, 0, 0)),
                   pl.BlockSpec((None, rows), lambda w: (w, 0))],
        out_shape=[jax.ShapeDtypeStruct((width, rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((width, rows), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"xyjax_meta_attention_t{tile}_g{group}",
    )(*args)
    out, lse = merge_partials(out_shape, [(token, head, out_w, lse_w)])
    return (out, lse) if return_lse else out


def meta_attention_pallas(q, kv, layer, meta, *, scale=None, lowering: str | None = None, tree_mask=None):
    """meta_attention over every group of ``meta`` ([T, H, D] float32): the ``backend="pallas"`` wiring (rows >=
    num_tasks zeroed; groups cover disjoint rows, so outputs add). ``lowering``: a name of
    ``xyjax.ops.pallas_lowering.LOWERINGS`` (None: ``default_lowering()``); a group the Mosaic GPU kernel does
    not take (``pallas_mosaic.unsupported``) runs this module's kernel on the same kind of device.
    ``tree_mask`` defaults to ``meta.tree_mask`` where AttentionMetadata has one."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tree_mask = getattr(meta, "tree_mask", None) if tree_mask is None else tree_mask
    lowering = pallas_lowering.check(lowering or pallas_lowering.default_lowering())
    group = q.shape[1] // kv.k.shape[2]
    out = jnp.zeros(q.shape, jnp.float32)
    for g in meta.groups:
        tasks = live_tasks(g)
        use = lowering
        if lowering in ("mosaic", "mosaic_interpret") and pallas_mosaic.unsupported(
                q.dtype, kv.k.dtype, q.shape[2], kv.k.shape[3], group, g.tile, has_tree=tree_mask is not None):
            use = pallas_lowering.fallback(lowering)
        if use in ("mosaic", "mosaic_interpret"):
            part = pallas_mosaic.attend_mosaic(q, kv.k, kv.v, layer, meta.block_tables, tasks, scale, tile=g.tile,
                                               interpret=use == "mosaic_interpret")
        else:
            part = attend_pallas(q, kv.k, kv.v, layer, meta.block_tables, tasks, scale, tile=g.tile,
                                 interpret=use == "interpret", tree_mask=tree_mask)
        out = out + part
    return out
