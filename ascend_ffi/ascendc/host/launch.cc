// NEVER COMPILED OR RUN (see launch.h). Dispatches a tiling to the generated kernel of its specialisation.
#include "launch.h"

#include "runtime/rt.h"   // rtGetC2cCtrlAddr, as pyasc's own launcher uses it
#include "variants.h"     // generated: aclrtlaunch_<kernel>.h of every kernel and the variant tables

namespace {

// asctile's mixed (cube + vector) kernels take, last, a device pointer to the cross-core control address.
void* FftsAddress() {
  static void* device = [] {
    uint64_t addr = 0;
    uint32_t len = 0;
    void* ptr = nullptr;
    if (rtGetC2cCtrlAddr(&addr, &len) != 0 ||
        aclrtMalloc(&ptr, sizeof(addr), ACL_MEM_MALLOC_HUGE_FIRST) != ACL_SUCCESS ||
        aclrtMemcpy(ptr, sizeof(addr), &addr, sizeof(addr), ACL_MEMCPY_HOST_TO_DEVICE) != ACL_SUCCESS) {
      return static_cast<void*>(nullptr);
    }
    return ptr;
  }();
  return device;
}

}  // namespace

aclError XyjaxAscendSmoothGemm(const XyjaxAscendGemmTiling& t, int dtype, const void* x, const void* w, void* out,
                               aclrtStream stream) {
  void* ffts = FftsAddress();
  if (ffts == nullptr) return ACL_ERROR_INTERNAL_ERROR;
#define XYJAX_GEMM_CASE(DT, MT, NT, K, KERNEL)                                                          \
  if (dtype == DT && t.m_tile == MT && t.n_tile == NT && t.k == K)                                      \
    return static_cast<aclError>(aclrtlaunch_##KERNEL(t.num_cores, stream, const_cast<void*>(x),        \
                                                      const_cast<void*>(w), out, t.m, t.n, t.order, ffts));
  XYJAX_ASCEND_GEMM_VARIANTS(XYJAX_GEMM_CASE)
#undef XYJAX_GEMM_CASE
  return ACL_ERROR_INVALID_PARAM;
}

aclError XyjaxAscendMetaAttention(const XyjaxAscendAttentionTiling& t, void* const o[15],
                                  aclrtStream stream) {
  void* ffts = FftsAddress();
  if (ffts == nullptr) return ACL_ERROR_INTERNAL_ERROR;
#define XYJAX_ATTENTION_CASE(TILE, G, D, P, MTW, STAGES, KW, KERNEL)                                      \
  if (t.rows == TILE * G && t.group == G && t.head_dim == D && t.block_size == P && t.tree_cols == MTW &&  \
      (STAGES == 3) == (t.pipeline == XYJAX_ASCEND_PIPELINE_3STAGE) && t.score_cols == KW)                \
    return static_cast<aclError>(aclrtlaunch_##KERNEL(                                                    \
        t.num_cores, stream, o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11],    \
        o[12], o[13], o[14], t.q_rows, t.kv_rows, t.num_tables, t.num_slots, t.tree_rows,   \
        t.max_pages, t.num_kv_heads, t.q_pad_rows, t.scale, ffts));
  XYJAX_ASCEND_ATTENTION_VARIANTS(XYJAX_ATTENTION_CASE)
#undef XYJAX_ATTENTION_CASE
  return ACL_ERROR_INVALID_PARAM;
}
