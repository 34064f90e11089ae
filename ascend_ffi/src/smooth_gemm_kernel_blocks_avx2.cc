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
// separate multiply and add do: the same float32 weight. Blocks of kColumns weight rows are multiplied against
// every block of up to 6 x rows, the first of which prefetches the rows kPrefetchRows ahead.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "smooth_gemm_blocks_format.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

constexpr int64_t kColumns = 32;       // weight rows per block (kept in cache across the x row blocks)
constexpr int64_t kPrefetchRows = 8;   // how far ahead of a block's rows the stream is prefetched
constexpr int kNR = 2;                 // weight rows per register block

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

// c[i, j] for i < MR, j < NR: x rows at x + i * ldx, weight rows at w + j * row_bytes. pf: weight rows to
// prefetch alongside (same shape), or null.
template <int Q, int MR, int NR>
inline void Block(const float* x, int64_t ldx, const uint8_t* w, int64_t K, float* c, int64_t ldc,
                  const uint8_t* pf) {
  constexpr int64_t kInputs = BlockInputs(Q), kBytes = BlockBytes(Q);
  const int64_t row_bytes = K / kInputs * kBytes;
  __m256 acc[MR][NR];   // unrolled by pragma: see smooth_gemm_kernel_avx512.cc
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < K / kInputs; ++b) {
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
#pragma GCC unroll 4
        for (int64_t o = 0; o < kBytes; o += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(pf + j * row_bytes + b * kBytes + o), _MM_HINT_T0);
        }
      }
    }
#pragma GCC unroll 32
    for (int k = 0; k < kInputs; k += 8) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) wv[j] = Weights<Q>(w + j * row_bytes + b * kBytes, k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + b * kInputs + k);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = Sum8(acc[i][j]);
  }
}

// MR x rows against n weight rows, kNR at a time, then singly.
template <int Q, int MR>
void Rows(const float* x, int64_t ldx, const uint8_t* w, int64_t n, int64_t K, float* c, int64_t ldc,
          const uint8_t* pf) {
  const int64_t row_bytes = K / BlockInputs(Q) * BlockBytes(Q);
  int64_t j = 0;
  for (; j + kNR <= n; j += kNR) {
    Block<Q, MR, kNR>(x, ldx, w + j * row_bytes, K, c + j, ldc, pf ? pf + j * row_bytes : nullptr);
  }
  for (; j < n; ++j) Block<Q, MR, 1>(x, ldx, w + j * row_bytes, K, c + j, ldc, pf ? pf + j * row_bytes : nullptr);
}

using RowsFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, float*, int64_t, const uint8_t*);
template <int Q>
constexpr RowsFn kRows[7] = {nullptr, Rows<Q, 1>, Rows<Q, 2>, Rows<Q, 3>, Rows<Q, 4>, Rows<Q, 5>, Rows<Q, 6>};

template <int Q>
void Gemm(int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w, float* c, int64_t ldc) {
  const int64_t row_bytes = K / BlockInputs(Q) * BlockBytes(Q);
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t columns = std::min(kColumns, n - j0);
    const uint8_t* block = w + j0 * row_bytes;
    for (int64_t i = 0; i < m; i += 6) {
      const int rows = static_cast<int>(std::min<int64_t>(6, m - i));
      kRows<Q>[rows](x + i * ldx, ldx, block, columns, K, c + i * ldc + j0, ldc,
                     i == 0 ? block + kPrefetchRows * row_bytes : nullptr);
    }
  }
}

// The n rows' blocks one after another (n * K / BlockInputs(Q) of them) into panel [n, K].
template <int Q>
void Dequant(int64_t n, int64_t K, const uint8_t* w, float* panel) {
  constexpr int64_t kInputs = BlockInputs(Q), kBytes = BlockBytes(Q);
  for (int64_t b = 0; b < n * (K / kInputs); ++b) {
#pragma GCC unroll 32
    for (int k = 0; k < kInputs; k += 8) _mm256_storeu_ps(panel + b * kInputs + k, Weights<Q>(w + b * kBytes, k));
  }
}

}  // namespace

// panel [n, K] (float32) = the dequantized weight rows w [n, row_bytes].
void BlocksDequantAvx2(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel) {
  switch (qtype) {
    case kQ8_0: return Dequant<kQ8_0>(n, K, w, panel);
    case kQ4_0: return Dequant<kQ4_0>(n, K, w, panel);
    case kQ4_1: return Dequant<kQ4_1>(n, K, w, panel);
    case kQ4_K: return Dequant<kQ4_K>(n, K, w, panel);
    case kQ6_K: return Dequant<kQ6_K>(n, K, w, panel);
  }
}

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ dequant(w [n, row_bytes])^T, single-threaded.
void BlocksGemmAvx2(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                    float* c, int64_t ldc) {
  switch (qtype) {
    case kQ8_0: return Gemm<kQ8_0>(m, n, K, x, ldx, w, c, ldc);
    case kQ4_0: return Gemm<kQ4_0>(m, n, K, x, ldx, w, c, ldc);
    case kQ4_1: return Gemm<kQ4_1>(m, n, K, x, ldx, w, c, ldc);
    case kQ4_K: return Gemm<kQ4_K>(m, n, K, x, ldx, w, c, ldc);
    case kQ6_K: return Gemm<kQ6_K>(m, n, K, x, ldx, w, c, ldc);
  }
}

}  // namespace gemm
}  // namespace xyjax
