// GGUF's 32-input block formats as the block kernels of smooth_gemm read them (xyjax/ops/gemm/formats.py,
// GGUFBlocks, gives each row's byte layout): the ggml type ids the handler takes and each block's bytes, and
// the scalar float16 -> float32 conversion of the block scales. Everything here has internal linkage (static,
// constexpr): the kernel files include it under their own instruction-set flags, and no copy may be shared.
#ifndef XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_
#define XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_

#include <cstdint>
#include <cstring>

namespace xyjax {
namespace gemm {
namespace blocks {

// ggml type ids (gguf.GGMLQuantizationType) of the formats the block kernels read.
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32;   // inputs per block

// Bytes of one block of qtype, 0 for a qtype the kernels do not read.
static constexpr int64_t BlockBytes(int qtype) {
  return qtype == kQ8_0 ? 34 : qtype == kQ4_0 ? 18 : qtype == kQ4_1 ? 20 : 0;
}

// IEEE float16 bits -> float32 (exact: every float16 is a float32), subnormals and inf/nan included.
static inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {   // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float LoadHalf(const uint8_t* p) { return HalfToFloat(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

}  // namespace blocks
}  // namespace gemm
}  // namespace xyjax

#endif  // XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_
