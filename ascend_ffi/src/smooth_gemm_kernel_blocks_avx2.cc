// The block kernels of smooth_gemm for GGUF's formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), AVX2 copy (CMake adds
// -mavx2 -mfma -mf16c to this file only; chosen at run time where the CPU has AVX2, FMA and F16C but not AVX-512F,
// or by XYJAX_GEMM_BLOCKS_KERNEL=avx2).
//
// The AVX-512 copy's streaming kernel (smooth_gemm_kernel_blocks_avx512.cc) at half the width: a 6 x 2 register
// block (12 accumulators of 8 floats, of the 16 registers) walks K 8 inputs (a chunk) at a time, dequantizing each
// of its 2 weight rows' chunk in a register, then 12 fused multiply-adds. The weights are exactly
// GGUFBlocks.dense()'s, in gguf's order (smooth_gemm_blocks_format.h): the float16 fields converted by
// _mm256_cvtph_ps (exact), the integer scales and q by _mm256_cvtepi32_ps (exact); Q4_1's d * q + m and Q4_K's
// (d * sc) * q - (dmin * mn) are one fused multiply-add, which rounds the exact product plus m once, as dense()'s
// separate multiply and add do: the same float32 weight. The loops are smooth_gemm_kernel_blocks.inc's.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "smooth_gemm_blocks_format.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

// The block's float16 at p broadcast to 8 float32 lanes.
inline __m256 Half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(p[0] | (p[1] << 8))));
}

// The 8 bytes at p, each shifted right by shift and masked by mask, as 8 int32.
inline __m256i Bits8(const uint8_t* p, int shift, int mask) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srli_epi32(bytes, shift), _mm256_set1_epi32(mask));
}

// v (an integer) broadcast to 8 float32 lanes.
inline __m256 Int8(int v) { return _mm256_set1_ps(static_cast<float>(v)); }

// The 8 weights j .. j + 7 (j a multiple of 8 below BlockInputs(Q)) of the block at blk, float32, exactly as
// dense().
template <int Q>
inline __m256 Weights(const uint8_t* blk, int j) {
  if constexpr (Q == kQ8_0) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + j));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), Half8(blk));
  } else if constexpr (Q == kQ4_0) {
    const __m256i q = _mm256_sub_epi32(Bits8(blk + 2 + NibbleByte(j), NibbleShift(j), 15), _mm256_set1_epi32(8));
    return _mm256_mul_ps(Half8(blk), _mm256_cvtepi32_ps(q));
  } else if constexpr (Q == kQ4_1) {
    const __m256i q = Bits8(blk + 4 + NibbleByte(j), NibbleShift(j), 15);
    return _mm256_fmadd_ps(Half8(blk), _mm256_cvtepi32_ps(q), Half8(blk + 2));
  } else if constexpr (Q == kQ4_K) {
    const __m256 ds = _mm256_mul_ps(Half8(blk), Int8(Q4KScale(blk, j / 32)));
    const __m256 dm = _mm256_mul_ps(Half8(blk + 2), Int8(Q4KMin(blk, j / 32)));
    return _mm256_fmsub_ps(ds, _mm256_cvtepi32_ps(Bits8(blk + Q4KByte(j), Q4KShift(j), 15)), dm);
  } else {   // kQ6_K
    const __m256i high = _mm256_slli_epi32(Bits8(blk + Q6KHighByte(j), Q6KHighShift(j), 3), 4);
    const __m256i q = _mm256_or_si256(Bits8(blk + Q6KLowByte(j), Q6KLowShift(j), 15), high);
    const __m256 ds = _mm256_mul_ps(Half8(blk + kQ6KD), Int8(static_cast<int8_t>(blk[Q6KScaleByte(j)])));
    return _mm256_mul_ps(ds, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(32))));
  }
}

// The sum of v's 8 lanes.
inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec LoadX(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void StoreVec(float* p, Vec v) { _mm256_storeu_ps(p, v); }
constexpr int NrFor(int) { return 2; }   // 6 x 2 register blocks: 12 accumulators of the 16 registers
constexpr int64_t kMaxRows = 6;

template <int MR, int NR>
inline void StoreSums(Vec (&acc)[MR][NR], float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = Sum8(acc[i][j]);
  }
}

#include "smooth_gemm_kernel_blocks.inc"

}  // namespace

// panel [n, K] (float32) = the dequantized weight rows w [n, row_bytes].
void BlocksDequantAvx2(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel) {
  DequantAny(qtype, n, K, w, panel);
}

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ dequant(w [n, row_bytes])^T, single-threaded.
void BlocksGemmAvx2(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                    float* c, int64_t ldc) {
  GemmAny(qtype, m, n, K, x, ldx, w, c, ldc);
}

}  // namespace gemm
}  // namespace xyjax
