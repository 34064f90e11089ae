// Small helpers shared by the CPU jax.ffi handlers (meta_attention_cpu.cc, smooth_gemm_cpu.cc).
// The per-ISA kernel copies keep their own bf16 rounding (meta_attention_kernel.inc) so that no
// inline function is shared between translation units built with different instruction sets.
#ifndef XYJAX_FFI_UTIL_H_
#define XYJAX_FFI_UTIL_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace xyjax {

// "[d0, d1, ...]" for error messages.
inline std::string Dims(xla::ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// float32 -> bfloat16, round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace xyjax

#endif  // XYJAX_FFI_UTIL_H_
