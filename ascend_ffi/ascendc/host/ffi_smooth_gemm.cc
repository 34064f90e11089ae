// SmoothGEMM on an Ascend NPU as a jax.ffi handler. NEVER COMPILED OR RUN (no CANN, no NPU here).
//
// JAX has no Ascend PJRT plugin, so this is a CPU custom call: its operands live in host memory, and each call
// stages them to the NPU through ACL (allocate, copy in, launch, wait, copy out, free). That round trip costs
// far more than the GEMM; it exists so JAX programs can reach the kernel at all, not for speed.
//
// Operands: x [m, k] and w [n, k] float16 or bfloat16 (same dtype); result [m, n] in x's dtype. Attributes: the
// tiling's m_tile, n_tile, order and num_cores, from xyjax.ops.gemm.ascend_tiling.gemm_tiling.
#include <cstddef>
#include <string>

#include "launch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { aclrtMalloc(&ptr, bytes, ACL_MEM_MALLOC_HUGE_FIRST); }
  ~DeviceBuffer() { if (ptr != nullptr) aclrtFree(ptr); }
};

ffi::Error Failed(const char* step, aclError code) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("xyjax Ascend gemm: ") + step + " failed, ACL error " +
                                                  std::to_string(code));
}

ffi::Error SmoothGemmAscend(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out, int32_t m_tile,
                            int32_t n_tile, int32_t order, int32_t num_cores) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || x.element_type() != w.element_type() ||
      (x.element_type() != ffi::F16 && x.element_type() != ffi::BF16)) {
    return ffi::Error::InvalidArgument("xyjax Ascend gemm: x [m, k], w [n, k], both float16 or both bfloat16");
  }
  XyjaxAscendGemmTiling t{static_cast<int32_t>(xd[0]), static_cast<int32_t>(wd[0]), static_cast<int32_t>(xd[1]),
                          m_tile, n_tile, 128, order, num_cores};
  static aclrtStream stream = [] {
    aclrtStream s = nullptr;
    aclrtSetDevice(0);
    aclrtCreateStream(&s);
    return s;
  }();
  DeviceBuffer dx(x.size_bytes()), dw(w.size_bytes()), dout(out->size_bytes());
  if (dx.ptr == nullptr || dw.ptr == nullptr || dout.ptr == nullptr) return Failed("aclrtMalloc", ACL_ERROR_BAD_ALLOC);
  if (aclError e = aclrtMemcpy(dx.ptr, x.size_bytes(), x.untyped_data(), x.size_bytes(), ACL_MEMCPY_HOST_TO_DEVICE)) {
    return Failed("copy x", e);
  }
  if (aclError e = aclrtMemcpy(dw.ptr, w.size_bytes(), w.untyped_data(), w.size_bytes(), ACL_MEMCPY_HOST_TO_DEVICE)) {
    return Failed("copy w", e);
  }
  if (aclError e = XyjaxAscendSmoothGemm(t, x.element_type() == ffi::BF16, dx.ptr, dw.ptr, dout.ptr, stream)) {
    return Failed("launch (is there a generated kernel for this tile shape and K?)", e);
  }
  if (aclError e = aclrtSynchronizeStream(stream)) return Failed("the kernel", e);
  if (aclError e = aclrtMemcpy(out->untyped_data(), out->size_bytes(), dout.ptr, out->size_bytes(),
                               ACL_MEMCPY_DEVICE_TO_HOST)) {
    return Failed("copy out", e);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XyjaxSmoothGemmAscend, SmoothGemmAscend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // w
                                  .Ret<ffi::AnyBuffer>()   // out
                                  .Attr<int32_t>("m_tile")
                                  .Attr<int32_t>("n_tile")
                                  .Attr<int32_t>("order")
                                  .Attr<int32_t>("num_cores"));
