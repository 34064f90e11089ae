// SmoothGEMM for torch_npu users: torch.ops.xyjax_ascend.smooth_gemm(x, w, m_tile, n_tile, order, num_cores) on NPU
// tensors (the PrivateUse1 dispatch key torch_npu registers). NEVER COMPILED OR RUN (no CANN, no torch_npu here).
// x [m, k] and w [n, k] float16 or bfloat16 on one NPU; returns [m, n] there, launched on the current stream. The
// tiling's values come from xyjax.ops.gemm.ascend_tiling.gemm_tiling.
#include <torch/library.h>

#include "launch.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace {

at::Tensor SmoothGemm(const at::Tensor& x, const at::Tensor& w, int64_t m_tile, int64_t n_tile, int64_t order,
                      int64_t num_cores) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [m, k] and w [n, k]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "x and w: both float16 or both bfloat16");
  auto xc = x.contiguous(), wc = w.contiguous();
  auto out = at::empty({x.size(0), w.size(0)}, x.options());
  XyjaxAscendGemmTiling t{static_cast<int32_t>(x.size(0)), static_cast<int32_t>(w.size(0)),
                          static_cast<int32_t>(x.size(1)), static_cast<int32_t>(m_tile),
                          static_cast<int32_t>(n_tile), 128, static_cast<int32_t>(order),
                          static_cast<int32_t>(num_cores)};
  aclError e = XyjaxAscendSmoothGemm(t, x.scalar_type() == at::kBFloat16, xc.data_ptr(), wc.data_ptr(),
                                     out.data_ptr(), c10_npu::getCurrentNPUStream().stream());
  TORCH_CHECK(e == ACL_SUCCESS, "xyjax Ascend gemm launch failed, ACL error ", e,
              " (is there a generated kernel for this tile shape and K?)");
  return out;
}

}  // namespace

TORCH_LIBRARY(xyjax_ascend, m) {
  m.def("smooth_gemm(Tensor x, Tensor w, int m_tile, int n_tile, int order, int num_cores) -> Tensor");
}

TORCH_LIBRARY_IMPL(xyjax_ascend, PrivateUse1, m) { m.impl("smooth_gemm", &SmoothGemm); }
