// Launching the translated Ascend kernels on an NPU stream. NEVER COMPILED OR RUN: no machine of this project
// has had CANN or an NPU. Built only by ascend_ffi/ascendc/CMakeLists.txt when ASCEND_HOME_PATH is set.
#pragma once

#include <cstdint>

#include "acl/acl.h"
#include "xyjax/ascend_tiling.h"

// out[m, n] = x[m, k] @ w[n, k]^T with device pointers; dtype 0 float16, 1 bfloat16. ACL_ERROR_INVALID_PARAM
// when no generated kernel has the tiling's shape (generated/variants.h).
aclError XyjaxAscendSmoothGemm(const XyjaxAscendGemmTiling& t, int dtype, const void* x, const void* w,
                               void* out, aclrtStream stream);

// One task group of Meta-Attention; `operands` are the kernel's 15 device arrays in its parameter order
// (ascend_ffi/ascendc/kernels/meta_attention.py, built by xyjax/ops/attention/ascend_tiling.py).
aclError XyjaxAscendMetaAttention(const XyjaxAscendAttentionTiling& t, void* const operands[15],
                                  aclrtStream stream);
