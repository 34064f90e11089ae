/* Tiling of the Ascend meta-kernels (ascend_ffi/ascendc/kernels/): what the host hands one launch.
 *
 * Built in Python from the planner's task tables (xyjax/ops/attention/ascend_tiling.py,
 * xyjax/ops/gemm/ascend_tiling.py, whose ctypes mirrors tests/ops/test_ascend_tiling.py checks field by
 * field against this header with the C++ compiler). A launcher built with CANN passes the fields as the
 * kernels' scalar arguments (the asctile kernels take scalars, not a struct pointer); no such launcher has
 * been compiled or run here. Change both sides together.
 */
#ifndef XYJAX_ASCEND_TILING_H_
#define XYJAX_ASCEND_TILING_H_

#include <stdint.h>

/* Values of the pipeline field (XY-Serve §5.2): 2-stage for decode-only batches, 3-stage when the scores of
 * the tasks running at once fit the cache (alpha * sum over cores of rows x KV length <= cache bytes), else
 * 4-stage with the FlashAttention rescale. The kernel has the 3- and 4-stage forms; a 2-stage choice runs the
 * 4-stage one (the 2-stage kernel is not written). */
enum XyjaxAscendPipeline {
  XYJAX_ASCEND_PIPELINE_2STAGE = 2,
  XYJAX_ASCEND_PIPELINE_3STAGE = 3,
  XYJAX_ASCEND_PIPELINE_4STAGE = 4
};

/* One Meta-Attention launch: one task group (its static tile) over one layer. */
typedef struct XyjaxAscendAttentionTiling {
  int32_t num_tasks;    /* real tasks in the group */
  int32_t num_cores;    /* AI cores the deal uses (block_num) */
  int32_t pipeline;     /* an XyjaxAscendPipeline */
  int32_t rows;         /* R = tile * group: packed query rows of a task */
  int32_t group;        /* G: query heads per KV head */
  int32_t head_dim;     /* D */
  int32_t block_size;   /* P: KV positions per cache block */
  int32_t max_pages;    /* block-table width */
  int32_t num_kv_heads; /* KVH */
  int32_t q_pad_rows;   /* TP = T + tile: token rows of the packed q per KV head */
  int32_t tree_cols;    /* MTW = P + MT + P: columns of the packed tree mask */
  int32_t q_rows;       /* KVH * TP * G */
  int32_t kv_rows;      /* num_blocks * KVH * P */
  int32_t num_tables;   /* S * max_pages */
  int32_t num_slots;    /* W: task-table rows (output slots) */
  int32_t tree_rows;    /* TP * G */
  int32_t score_cols;   /* KW: workspace columns per row, P (4-stage) or the longest task KV range in whole
                           blocks (3-stage: the task's scores stay in the workspace) */
  float scale;          /* softmax scale */
} XyjaxAscendAttentionTiling;

/* One SmoothGEMM launch: out[m, n] = x[m, k] @ w[n, k]^T. */
typedef struct XyjaxAscendGemmTiling {
  int32_t m;            /* real rows (no padding in global memory) */
  int32_t n;
  int32_t k;
  int32_t m_tile;       /* the fixed tile shape */
  int32_t n_tile;
  int32_t k_tile;
  int32_t order;        /* 0: tiles in m-major order, 1: n-major (the profile table's choice) */
  int32_t num_cores;
} XyjaxAscendGemmTiling;

#endif /* XYJAX_ASCEND_TILING_H_ */
