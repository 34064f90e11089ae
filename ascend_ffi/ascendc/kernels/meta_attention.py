"""Meta-Attention as an asctile kernel (pyasc-dev's tile language for Ascend): one launch for a hybrid
P/D/V batch over the paged KV cache, driven by the tile contract's task table.

Runs on CPU under asctile's NumPy interpreter (``ASCTILE_INTERPRET=1``) and translates to AscendC C++
(``ascend_ffi/ascendc/translate.py``); compiling and running that C++ needs CANN and an NPU, which no machine
of this project has had. Two of XY-Serve's pipelines (§5.2), chosen by the host (``STAGES``):
    4  per KV block: QK^T (cube), online softmax with the FlashAttention rescale (vector), PV (cube), rescale and
       accumulate (vector); any KV length;
    3  QK^T of the task's whole KV range (cube), softmax over the whole row (vector), then PV accumulated on the
       cube in one L0C accumulator, no rescale; the task's scores live in the workspace meanwhile, so the host picks
       it only when every core's scores fit the cache together.
The scores, probabilities and PV products pass between cube and vector cores through per-core GM workspaces (a
910B has no on-chip path between them); asctile splits the code into AIC and AIV parts and inserts the
cross-core flags. The 2-stage decode pipeline (QK^T on the vector units) is not written.

Operands (the host side, ``xyjax.ops.attention.ascend_tiling``, builds every one of them):
    q         [KVH * TP * G, D] float16: query rows packed per KV head, row (h * TP + t) * G + g = token t,
              query head h * G + g (TP = T + tile rows, so a tile never reads past the array).
    k, v      [NB * KVH * P, D] float16: one layer's cache [NB, KVH, P, D] flattened.
    tables    [S * PAGES] int32: block tables.
    tasks     [W * F] int32: the task table (F = 11 fields, ``tile_contract.h``).
    deal      [W] int32: task indices in the order the cores take them; core c runs deal[offs[c]:offs[c + 1]].
    offs      [C + 1] int32.
    cols      [R, P] int32: column index c; rtok [R, P] int32: c - r // G (R = tile * G rows of a task).
    tree      [TP * G, P + MT + P] int32: the tree mask per packed row, column p - mask_base + P (zero elsewhere).
    s_ws, p_ws  [C * R, KW] float32 and float16: scores and probabilities, R rows per core; KW = P (4-stage) or
              the longest KV range of a task rounded up to P (3-stage).
    pv_ws     [C * R, D] float32.
Outputs per task slot w (the host merges KV splits by log-sum-exp):
    out       [W * R, D] float32: the normalised partial output of each row.
    lse       [W * R] float32: its log-sum-exp, -inf where the row sees no position.
"""

import asc.experimental.asctile as asctile

F = 11                       # XYJAX_TASK_NUM_FIELDS
SEQ, Q_START, Q_LEN, Q_POS, KV_START, KV_END, KV_HEAD, MASK_KIND, MASK_BASE = range(9)
FAR = 1 << 30                # a column bound no position reaches
NEG = -1.0e30                # masked score (finite: exp(NEG - NEG) stays defined)


@asctile.jit
def masked(s: asctile.LocalTensor, first: int, cols: asctile.LocalTensor, rtok: asctile.LocalTensor,
           tree_gm: asctile.GlobalTensor, q_start: int, q_pos: int, kv_start: int, kv_end: int, is_tree: int,
           base: int, R: asctile.ConstExpr, G: asctile.ConstExpr, P: asctile.ConstExpr, MTW: asctile.ConstExpr):
    """Scores s [R, P] of KV positions first.. with what the rows do not see set to NEG: row r sees column c iff
    kv_start <= first + c < kv_end and (CAUSAL) c - r // G <= q_pos - first or (TREE) first + c < base or its tree
    bit is set; the test of the other mask kind gets a bound no column reaches."""
    s = asctile.where(cols >= kv_start - first, s, NEG)
    s = asctile.where(cols < kv_end - first, s, NEG)
    s = asctile.where(rtok <= q_pos - first + is_tree * FAR, s, NEG)
    bits = asctile.copy_in(tree_gm, [q_start * G, min(max(first - base + P, 0), MTW - P)], [R, P])
    return asctile.where(asctile.maximum(bits, asctile.where(cols < base - first + (1 - is_tree) * FAR, 1, 0)) > 0,
                         s, NEG)


@asctile.jit
def meta_attention(q_ptr: asctile.GlobalAddress, k_ptr: asctile.GlobalAddress, v_ptr: asctile.GlobalAddress,
                   tables_ptr: asctile.GlobalAddress, tasks_ptr: asctile.GlobalAddress, deal_ptr: asctile.GlobalAddress,
                   offs_ptr: asctile.GlobalAddress, cols_ptr: asctile.GlobalAddress, rtok_ptr: asctile.GlobalAddress,
                   tree_ptr: asctile.GlobalAddress, s_ws_ptr: asctile.GlobalAddress, p_ws_ptr: asctile.GlobalAddress,
                   pv_ws_ptr: asctile.GlobalAddress, out_ptr: asctile.GlobalAddress, lse_ptr: asctile.GlobalAddress,
                   q_rows: int, kv_rows: int, num_tables: int, num_slots: int, tree_rows: int, pages: int,
                   kv_heads: int, q_pad_rows: int, scale: float, R: asctile.ConstExpr, G: asctile.ConstExpr,
                   D: asctile.ConstExpr, P: asctile.ConstExpr, MTW: asctile.ConstExpr, STAGES: asctile.ConstExpr,
                   KW: asctile.ConstExpr):
    q_gm = asctile.global_tensor(q_ptr, [q_rows, D])
    k_gm = asctile.global_tensor(k_ptr, [kv_rows, D])
    v_gm = asctile.global_tensor(v_ptr, [kv_rows, D])
    tables = asctile.global_tensor(tables_ptr, [num_tables])
    tasks = asctile.global_tensor(tasks_ptr, [num_slots * F])
    deal = asctile.global_tensor(deal_ptr, [num_slots])
    offs = asctile.global_tensor(offs_ptr, [asctile.block_num() + 1])
    tree_gm = asctile.global_tensor(tree_ptr, [tree_rows, MTW])
    out_gm = asctile.global_tensor(out_ptr, [num_slots * R, D])
    lse_gm = asctile.global_tensor(lse_ptr, [num_slots * R])
    s_ws = asctile.global_tensor(s_ws_ptr, [asctile.block_num() * R, KW])
    p_ws = asctile.global_tensor(p_ws_ptr, [asctile.block_num() * R, KW])
    pv_ws = asctile.global_tensor(pv_ws_ptr, [asctile.block_num() * R, D])
    ws_row = asctile.block_idx() * R
    cols = asctile.copy_in(asctile.global_tensor(cols_ptr, [R, P]), [0, 0], [R, P])
    rtok = asctile.copy_in(asctile.global_tensor(rtok_ptr, [R, P]), [0, 0], [R, P])
    core = asctile.block_idx()
    for i in asctile.range(asctile.copy_in(offs, [core]), asctile.copy_in(offs, [core + 1])):
        w = asctile.copy_in(deal, [i])
        seq = asctile.copy_in(tasks, [w * F + SEQ])
        q_start = asctile.copy_in(tasks, [w * F + Q_START])
        q_pos = asctile.copy_in(tasks, [w * F + Q_POS])
        kv_start = asctile.copy_in(tasks, [w * F + KV_START])
        kv_end = asctile.copy_in(tasks, [w * F + KV_END])
        head = asctile.copy_in(tasks, [w * F + KV_HEAD])
        is_tree = asctile.copy_in(tasks, [w * F + MASK_KIND])
        base = asctile.copy_in(tasks, [w * F + MASK_BASE])
        q = asctile.copy_in(q_gm, [(head * q_pad_rows + q_start) * G, 0], [R, D])
        j0 = kv_start // P
        peak = asctile.full([R, 1], NEG, dtype=asctile.float32)
        denom = asctile.zeros([R, 1], dtype=asctile.float32)
        if STAGES == 4:
            acc = asctile.zeros([R, D], dtype=asctile.float32)
            for j in asctile.range(j0, (kv_end + P - 1) // P):
                row = (asctile.copy_in(tables, [seq * pages + j]) * kv_heads + head) * P
                qk = asctile.zeros_acc([R, P], asctile.float32)                 # stage 1: QK^T (cube)
                asctile.matmul_acc(qk, q, asctile.copy_in(k_gm, [row, 0], [P, D]).T)
                asctile.copy_out(qk, s_ws, [ws_row, 0])
                s = masked(asctile.copy_in(s_ws, [ws_row, 0], [R, P]) * scale, j * P, cols, rtok, tree_gm,
                           q_start, q_pos, kv_start, kv_end, is_tree, base, R, G, P, MTW)
                new_peak = asctile.maximum(peak, asctile.reduce_max(s, 1, keep_dims=True))
                # stage 2: online softmax; the reference point never drops below NEG / 2, so masked scores give 0
                p = asctile.exp(s - asctile.maximum(new_peak, NEG / 2))
                alpha = asctile.exp(peak - new_peak)
                denom = denom * alpha + asctile.reduce_sum(p, 1, keep_dims=True)
                asctile.copy_out(p.to(asctile.float16), p_ws, [ws_row, 0])
                pv = asctile.zeros_acc([R, D], asctile.float32)                 # stage 3: PV (cube)
                asctile.matmul_acc(pv, asctile.copy_in(p_ws, [ws_row, 0], [R, P]),
                                   asctile.copy_in(v_gm, [row, 0], [P, D]))
                asctile.copy_out(pv, pv_ws, [ws_row, 0])
                acc = acc * alpha + asctile.copy_in(pv_ws, [ws_row, 0], [R, D])  # stage 4: rescale, accumulate
                peak = new_peak
        else:
            for j in asctile.range(j0, (kv_end + P - 1) // P):                  # stage 1: S = QK^T (cube)
                row = (asctile.copy_in(tables, [seq * pages + j]) * kv_heads + head) * P
                qk = asctile.zeros_acc([R, P], asctile.float32)
                asctile.matmul_acc(qk, q, asctile.copy_in(k_gm, [row, 0], [P, D]).T)
                asctile.copy_out(qk, s_ws, [ws_row, (j - j0) * P])
            for j in asctile.range(j0, (kv_end + P - 1) // P):                  # stage 2: softmax of the row
                s = masked(asctile.copy_in(s_ws, [ws_row, (j - j0) * P], [R, P]) * scale, j * P, cols, rtok,
                           tree_gm, q_start, q_pos, kv_start, kv_end, is_tree, base, R, G, P, MTW)
                peak = asctile.maximum(peak, asctile.reduce_max(s, 1, keep_dims=True))
            for j in asctile.range(j0, (kv_end + P - 1) // P):
                s = masked(asctile.copy_in(s_ws, [ws_row, (j - j0) * P], [R, P]) * scale, j * P, cols, rtok,
                           tree_gm, q_start, q_pos, kv_start, kv_end, is_tree, base, R, G, P, MTW)
                p = asctile.exp(s - asctile.maximum(peak, NEG / 2))
                denom = denom + asctile.reduce_sum(p, 1, keep_dims=True)
                asctile.copy_out(p.to(asctile.float16), p_ws, [ws_row, (j - j0) * P])
            pv = asctile.zeros_acc([R, D], asctile.float32)                     # stage 3: PV, no rescale (cube)
            for j in asctile.range(j0, (kv_end + P - 1) // P):
                row = (asctile.copy_in(tables, [seq * pages + j]) * kv_heads + head) * P
                asctile.matmul_acc(pv, asctile.copy_in(p_ws, [ws_row, (j - j0) * P], [R, P]),
                                   asctile.copy_in(v_gm, [row, 0], [P, D]))
            asctile.copy_out(pv, pv_ws, [ws_row, 0])
            acc = asctile.copy_in(pv_ws, [ws_row, 0], [R, D])
        live = denom > 0.0
        asctile.copy_out(acc / asctile.where(live, denom, 1.0), out_gm, [w * R, 0])
        lse = asctile.where(live, peak + asctile.log(asctile.where(live, denom, 1.0)), float("-inf"))
        asctile.copy_out(lse.reshape(R), lse_gm, [w * R])
