// The int8 kernels of smooth_gemm (int8 activations, smooth_gemm_int8.h) for GGUF's block formats, AVX2 copy (CMake
// adds -mavx2 -mfma -mf16c to this file only; chosen at run time where the CPU has them but not AVX-512 VNNI, or by
// XYJAX_GEMM_INT8_KERNEL=avx2).
//
// The AVX-512 VNNI copy's kernel (smooth_gemm_kernel_int8_avx512.cc) at half the width, a chunk being one 32-input
// activation group, with pmaddubsw (u8 x s8 -> int16 pairs) + pmaddwd (pairs -> int32) for vpdpbusd. pmaddubsw
// saturates int16: each pair sum is bounded here, so it never does. Q4_0, Q4_1, Q4_K, Q6_K: u = qw + Z <= 63
// unsigned, |qx| <= 127: |pair| <= 2 * 63 * 127 = 16002. Q8_0 (signed weights; with u = qw + 128 a pair could reach
// 2 * 255 * 127): |qw| as u8 and qw's sign moved onto qx (psignb), |pair| <= 2 * 128 * 127 = 32512 < 32767. Each
// int32 lane l then holds the exact p_l = sum qx * qw over inputs 4l .. 4l + 3 (with -Z * sum4 added, as there).
// Float order, per x row t and weight row n, per lane l (inputs 4l .. 4l + 3 of group g, sub-block s) in group order:
//   acc_l = fma(float(p_l), scale_s * d[t, g], acc_l);   acc_0 = fma(min_g, dsum[t, g], acc_0)   (Q4_1, Q4_K)
// then out = the sum of the 8 lanes.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "smooth_gemm_blocks_format.h"
#include "smooth_gemm_int8.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

constexpr int64_t kChunk = kActGroup;  // inputs per chunk: 32 bytes, one activation group
constexpr int64_t kMaxRows = 4;        // x rows per pass over the weights
constexpr int NrFor(int) { return 2; }   // weight rows per register block

// The zero point that makes format Q's integers unsigned bytes (Q8_0: none, the sign moves onto x instead).
template <int Q>
constexpr int Zero() { return Q == kQ4_0 ? 8 : Q == kQ6_K ? 32 : 0; }
template <int Q>
constexpr bool HasMin() { return Q == kQ4_1 || Q == kQ4_K; }

// A weight row's chunk: 32 bytes u (qw + Zero<Q>(); Q8_0 |qw|, with qw itself in sign), the float32 scale of each
// int32 lane's 4 inputs, and (Q4_1, Q4_K) the group's minimum term in lane 0 (other lanes 0).
struct Chunk {
  __m256i u, sign;
  __m256 scale, min;
};

inline __m256 Half8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(p[0] | (p[1] << 8)))); }
inline __m256 Lane0(float f) { return _mm256_zextps128_ps256(_mm_set_ss(f)); }
// The 32 bytes at p shifted right by shift, each masked by mask.
inline __m256i Bits32(const uint8_t* p, int shift, int mask) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(static_cast<char>(mask)));
}

// Chunk c (the row's activation group c) of a row of format Q (row: its first block).
template <int Q>
inline Chunk Load(const uint8_t* row, int64_t c) {
  constexpr int64_t kBytes = BlockBytes(Q);
  if constexpr (Q == kQ8_0) {
    const uint8_t* b = row + c * kBytes;
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    return {_mm256_abs_epi8(q), q, Half8(b), _mm256_setzero_ps()};
  } else if constexpr (Q == kQ4_0 || Q == kQ4_1) {   // [low nibbles, high nibbles]: inputs 0 .. 31 in order
    const uint8_t* b = row + c * kBytes;
    const __m128i n = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == kQ4_0 ? 2 : 4)));
    const __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(n, 4), n), _mm256_set1_epi8(15));
    return {u, u, Half8(b), Q == kQ4_1 ? _mm256_zextps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(b[2] | (b[3] << 8))))
                                       : _mm256_setzero_ps()};
  } else if constexpr (Q == kQ4_K) {   // sub-block s: 32 bytes at one shift
    const uint8_t* blk = row + c / 8 * kBytes;
    const int s = static_cast<int>(c % 8);
    const __m256i u = Bits32(blk + Q4KByte(32 * s), Q4KShift(32 * s), 15);
    // [d, dmin] * [sc, -mn] = [d * sc, -(dmin * mn)] (exact)
    const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(blk[0] | (blk[1] << 8) | (blk[2] << 16) | (blk[3] << 24))),
                                _mm_cvtepi32_ps(_mm_setr_epi32(Q4KScale(blk, s), -Q4KMin(blk, s), 0, 0)));
    return {u, u, _mm256_broadcastss_ps(f), _mm256_zextps128_ps256(_mm_and_ps(_mm_movehdup_ps(f),
                                                                   _mm_castsi128_ps(_mm_setr_epi32(-1, 0, 0, 0))))};
  } else {   // kQ6_K: inputs j0 .. j0 + 31, 32 low and 32 high bytes at one shift each, 2 scales (lanes 0-3, 4-7)
    const uint8_t* blk = row + c / 8 * kBytes;
    const int j0 = 32 * static_cast<int>(c % 8);
    const __m256i high = Bits32(blk + Q6KHighByte(j0), Q6KHighShift(j0), 3);
    const __m256i u = _mm256_or_si256(Bits32(blk + Q6KLowByte(j0), Q6KLowShift(j0), 15), _mm256_slli_epi16(high, 4));
    const float d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(blk[kQ6KD] | (blk[kQ6KD + 1] << 8))));
    const float s0 = d * static_cast<float>(static_cast<int8_t>(blk[Q6KScaleByte(j0)]));
    const float s1 = d * static_cast<float>(static_cast<int8_t>(blk[Q6KScaleByte(j0 + 16)]));
    return {u, u, _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1), _mm256_setzero_ps()};
  }
}

// An x row's group c: its 32 int8, -Z * sum4 per lane, its d in every lane, its dsum in lane 0.
struct XChunk {
  __m256i q, start;
  __m256 d, dsum;
};
template <int Q>
inline XChunk LoadX(const QuantRows& x, int64_t t, int64_t c) {
  const int64_t g = t * (x.K / kActGroup) + c;
  const __m256i sum4 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sum4 + g * (kChunk / kActLane)));
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + g * kChunk)),
          Zero<Q>() ? _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum4, __builtin_ctz(Zero<Q>())))
                    : _mm256_setzero_si256(),
          _mm256_set1_ps(x.d[g]), HasMin<Q>() ? Lane0(x.dsum[g]) : _mm256_setzero_ps()};
}

// The exact int32 lane sums p_l of chunk w against x row chunk xc (module comment).
template <int Q>
inline __m256i Dot(const Chunk& w, const XChunk& xc) {
  const __m256i qx = Q == kQ8_0 ? _mm256_sign_epi8(xc.q, w.sign) : xc.q;
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w.u, qx), _mm256_set1_epi16(1)), xc.start);
}

// The sum of v's 8 lanes.
inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// c[i, j] for i < MR, j < NR: x rows t .. t + MR - 1, weight rows at w + j * row_bytes. pf: weight rows to prefetch
// alongside (same shape), or null.
template <int Q, int MR, int NR>
void Block(const QuantRows& x, int64_t t, const uint8_t* w, float* c, int64_t ldc, const uint8_t* pf) {
  const int64_t K = x.K, row_bytes = K / BlockInputs(Q) * BlockBytes(Q);
  const int64_t chunk_bytes = kChunk / BlockInputs(Q) * BlockBytes(Q);   // the K-quants: a fraction of a block
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t ch = 0; ch < K / kChunk; ++ch) {
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * row_bytes + ch * chunk_bytes), _MM_HINT_T0);
    }
    Chunk wc[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wc[j] = Load<Q>(w + j * row_bytes, ch);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const XChunk xc = LoadX<Q>(x, t + i, ch);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Dot<Q>(wc[j], xc)), _mm256_mul_ps(wc[j].scale, xc.d), acc[i][j]);
        if constexpr (HasMin<Q>()) acc[i][j] = _mm256_fmadd_ps(wc[j].min, xc.dsum, acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = Sum8(acc[i][j]);
  }
}

#include "smooth_gemm_kernel_int8.inc"

}  // namespace

// c [m, n] (row stride ldc) = x (m quantized rows of K) @ dequant(w [n, row_bytes])^T, single-threaded.
void Int8GemmAvx2(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c, int64_t ldc) {
  Int8GemmAny(qtype, m, n, x, w, c, ldc);
}

}  // namespace gemm
}  // namespace xyjax
