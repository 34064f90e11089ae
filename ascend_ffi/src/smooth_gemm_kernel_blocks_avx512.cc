// The block kernels of smooth_gemm for GGUF's formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), AVX-512F copy (CMake adds
// -mavx512f -mavx2 -mfma to this file only; chosen at run time where the CPU has AVX-512F).
//
// The streaming kernel is smooth_gemm_kernel_avx512.cc's, with the weights read as blocks: a 6 x 4 register
// block (24 accumulators of 16 floats; 8 x 2 for 7 or 8 x rows, so a verify run is one pass) walks K 16 inputs (a
// chunk: half a 32-input block, a sixteenth of a K-quant super-block) at a time, dequantizing each of its weight
// rows' chunk in a register, then a fused multiply-add per accumulator. The weights are exactly
// GGUFBlocks.dense()'s, in gguf's order (smooth_gemm_blocks_format.h): the float16 fields converted by
// _mm512_cvtph_ps (exact), the integer scales and q by _mm512_cvtepi32_ps (exact); Q4_1's d * q + m and Q4_K's
// (d * sc) * q - (dmin * mn) are one fused multiply-add, which rounds the exact product plus m once, as dense()'s
// separate multiply and add do: the same float32 weight. Q4_0 and Q4_1 compute a block's 16 possible weights so
// (a table in one register) and pick each weight by its nibble (vpermps), fewer instructions per weight than
// converting every nibble. The loops are smooth_gemm_kernel_blocks.inc's: blocks of kColumns weight rows (11 KiB of
// Q4_1 at K = 576) against every block of up to 8 x rows, the first prefetching the rows kPrefetchRows ahead.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "avx512_sums.h"

#include "smooth_gemm_blocks_format.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

// The block's float16 at p broadcast to 16 float32 lanes.
inline __m512 Half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(p[0] | (p[1] << 8))));
}

// The 16 bytes at p, each shifted right by shift and masked by mask, as 16 int32.
inline __m512i Bits16(const uint8_t* p, int shift, int mask) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_and_si512(_mm512_srli_epi32(bytes, shift), _mm512_set1_epi32(mask));
}

// v (an integer) broadcast to 16 float32 lanes.
inline __m512 Int16(int v) { return _mm512_set1_ps(static_cast<float>(v)); }

// The 16 weights j .. j + 15 (j a multiple of 16 below BlockInputs(Q)) of the block at blk, float32, exactly as
// dense().
template <int Q>
inline __m512 Weights(const uint8_t* blk, int j) {
  if constexpr (Q == kQ8_0) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + j));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), Half16(blk));
  } else if constexpr (Q == kQ4_0 || Q == kQ4_1) {   // the block's 16 possible weights, picked by each nibble
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = Q == kQ4_0 ? _mm512_mul_ps(Half16(blk), _mm512_sub_ps(iota, _mm512_set1_ps(8)))
                                    : _mm512_fmadd_ps(Half16(blk), iota, Half16(blk + 2));
    const uint8_t* nibbles = blk + (Q == kQ4_0 ? 2 : 4) + NibbleByte(j);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles)));
    // vpermps reads the low 4 bits of each index: the low nibble as it is, the high one shifted down
    return _mm512_permutexvar_ps(NibbleShift(j) ? _mm512_srli_epi32(bytes, 4) : bytes, table);
  } else if constexpr (Q == kQ4_K) {
    const __m512 ds = _mm512_mul_ps(Half16(blk), Int16(Q4KScale(blk, j / 32)));
    const __m512 dm = _mm512_mul_ps(Half16(blk + 2), Int16(Q4KMin(blk, j / 32)));
    return _mm512_fmsub_ps(ds, _mm512_cvtepi32_ps(Bits16(blk + Q4KByte(j), Q4KShift(j), 15)), dm);
  } else {   // kQ6_K
    const __m512i high = _mm512_slli_epi32(Bits16(blk + Q6KHighByte(j), Q6KHighShift(j), 3), 4);
    const __m512i q = _mm512_or_si512(Bits16(blk + Q6KLowByte(j), Q6KLowShift(j), 15), high);
    const __m512 ds = _mm512_mul_ps(Half16(blk + kQ6KD), Int16(static_cast<int8_t>(blk[Q6KScaleByte(j)])));
    return _mm512_mul_ps(ds, _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(32))));
  }
}

using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec LoadX(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void StoreVec(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// 6 x 4 register blocks (24 accumulators); 7 or 8 x rows as 8 x 2, so a verify run of 1 + 7 drafts is one pass
// (from 10 rows the compiler spills)
constexpr int NrFor(int rows) { return rows <= 6 ? 4 : 2; }
constexpr int64_t kMaxRows = 8;

#include "smooth_gemm_kernel_blocks.inc"

}  // namespace

// Q4_1: panel [n, K + K / 32] = each row's d * q (exact in float32), then its K / 32 block minimums m.
void BlocksSplitAvx512(int64_t n, int64_t K, const uint8_t* w, float* panel) {
  constexpr int64_t kInputs = BlockInputs(kQ4_1), kBytes = BlockBytes(kQ4_1);
  const int64_t blocks = K / kInputs;
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = w + j * blocks * kBytes;
    float* out = panel + j * (K + blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = row + b * kBytes;
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
      const __m512 d = Half16(blk);
      const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(bytes, 4);
      _mm512_storeu_ps(out + b * kInputs, _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)));
      _mm512_storeu_ps(out + b * kInputs + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)));
      out[K + b] = LoadHalf(blk + 2);
    }
  }
}

// panel [n, K] (float32) = the dequantized weight rows w [n, row_bytes].
void BlocksDequantAvx512(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel) {
  DequantAny(qtype, n, K, w, panel);
}

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ dequant(w [n, row_bytes])^T, single-threaded.
void BlocksGemmAvx512(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                      float* c, int64_t ldc) {
  GemmAny(qtype, m, n, K, x, ldx, w, c, ldc);
}

}  // namespace gemm
}  // namespace xyjax
