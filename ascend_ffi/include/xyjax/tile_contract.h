/* xyjax tile contract: one attention task row, shared by every attention backend.
 *
 * The planner (host, numpy) writes a task table `int32[W][XYJAX_TASK_NUM_FIELDS]` plus the real
 * task count `num_tasks <= W`. Each backend (the xla oracle, the C++ custom calls, Pallas) reads
 * the same table, and so does the asctile kernel of ascend_ffi/ascendc/ (never run on an NPU).
 * The Python mirror is xyjax/ops/attention/contract.py; tests/ops/test_ascend_ffi.py checks the
 * two agree through the compiled library. Change both sides and XYJAX_TILE_ABI_VERSION together.
 *
 * One task = one query tile of one sequence, for one KV head group, over one KV split:
 *
 *   seq         sequence slot: row of block_tables (and of any per-sequence array).
 *   q_start     first row of the tile in the flat token array (token_ids[T], q[T, ...]).
 *   q_len       query rows in the tile, 1 <= q_len <= tile size. q_len == 0 marks a padding task:
 *               backends skip it. Rows at index >= num_tasks are padding too: a backend stops at
 *               num_tasks, or (the C++ custom calls) gets them zeroed by the Python side.
 *   q_pos       absolute position (in its sequence) of the tile's first query row; row i
 *               (flat row q_start + i) has position q_pos + i.
 *   kv_start,   the KV positions [kv_start, kv_end) this task reads (positions index the
 *   kv_end      sequence's KV through its block table). Without KV split: kv_start = 0,
 *               kv_end = q_pos + q_len (history + this tile). With splits, the num_splits tasks
 *               of one (seq, q_start, kv_head) partition that range in order of split: split s + 1
 *               starts where split s ends, and the boundaries are multiples of the block size
 *               (the CPU ffi backend rejects other boundaries; the xla oracle takes any).
 *   kv_head     KV head; the task covers the query heads of that GQA group,
 *               [kv_head * group, (kv_head + 1) * group), group = num_q_heads / num_kv_heads.
 *   mask_kind   XYJAX_MASK_CAUSAL or XYJAX_MASK_TREE, see below.
 *   mask_base   TREE only (0 for CAUSAL): KV position of column 0 of the per-row tree mask,
 *               i.e. the sequence's first tree token.
 *   split       index of this task's KV split, 0 <= split < num_splits.
 *   num_splits  splits of this (seq, q_start, kv_head); 1 = no split. The splits of one tile
 *               agree on every field but kv_start, kv_end and split (they may sit in different
 *               groups). Each split yields a partial output O_s (normalised over the positions the
 *               row sees in it) and its log-sum-exp lse_s per row and head; the row's output is
 *               sum_s exp(lse_s - m) O_s / sum_s exp(lse_s - m), m = max_s lse_s. A row that sees
 *               no position in a split has lse = -inf there (weight 0).
 *
 * Masks (a row never sees positions outside [kv_start, kv_end)):
 *   CAUSAL  row i sees position p iff p <= q_pos + i. Covers prefill, chunked prefill, cached
 *           prefix hits, decode (q_len 1) and chain speculative verify.
 *   TREE    row i sees p iff p < mask_base, or tree_mask[q_start + i][p - mask_base] is set.
 *           tree_mask is a per-token row mask built on the host over the sequence's tree tokens
 *           (stored in topological order, so only columns <= the row's own are set); the mask
 *           alone decides (no causal order among tree tokens is implied), and columns past its
 *           width are never seen. Its array layout belongs to the op that takes it
 *           (meta_attention: uint8 [T, MT], MT the static maximum of tree tokens).
 *
 * Padding rows of q (flat rows not covered by any real task) produce zeros, and so do rows whose
 * mask leaves them no visible position in [kv_start, kv_end) of any of their splits.
 */
#ifndef XYJAX_TILE_CONTRACT_H_
#define XYJAX_TILE_CONTRACT_H_

#include <stdint.h>

#define XYJAX_TILE_ABI_VERSION 1

/* Field indices of a task row (int32 each, in this order). */
enum XyjaxTaskField {
  XYJAX_TASK_SEQ = 0,
  XYJAX_TASK_Q_START = 1,
  XYJAX_TASK_Q_LEN = 2,
  XYJAX_TASK_Q_POS = 3,
  XYJAX_TASK_KV_START = 4,
  XYJAX_TASK_KV_END = 5,
  XYJAX_TASK_KV_HEAD = 6,
  XYJAX_TASK_MASK_KIND = 7,
  XYJAX_TASK_MASK_BASE = 8,
  XYJAX_TASK_SPLIT = 9,
  XYJAX_TASK_NUM_SPLITS = 10,
  XYJAX_TASK_NUM_FIELDS = 11
};

/* Values of the mask_kind field. */
enum XyjaxMaskKind {
  XYJAX_MASK_CAUSAL = 0,
  XYJAX_MASK_TREE = 1,
  XYJAX_MASK_NUM_KINDS = 2
};

/* The same row as a struct; its layout is the table row layout. */
typedef struct XyjaxTask {
  int32_t seq;
  int32_t q_start;
  int32_t q_len;
  int32_t q_pos;
  int32_t kv_start;
  int32_t kv_end;
  int32_t kv_head;
  int32_t mask_kind;
  int32_t mask_base;
  int32_t split;
  int32_t num_splits;
} XyjaxTask;

#ifdef __cplusplus
static_assert(sizeof(XyjaxTask) == XYJAX_TASK_NUM_FIELDS * sizeof(int32_t),
              "XyjaxTask must be a packed row of int32 fields");
#else
_Static_assert(sizeof(XyjaxTask) == XYJAX_TASK_NUM_FIELDS * sizeof(int32_t),
               "XyjaxTask must be a packed row of int32 fields");
#endif

#endif /* XYJAX_TILE_CONTRACT_H_ */
