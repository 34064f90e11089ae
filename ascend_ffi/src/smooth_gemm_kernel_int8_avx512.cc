// The int8 kernels of smooth_gemm (int8 activations, smooth_gemm_int8.h) for GGUF's block formats, AVX-512 VNNI copy
// (CMake adds -mavx512f -mavx512bw -mavx512vnni -mavx2 -mfma -mf16c to this file only; chosen at run time where the
// CPU has them, or by XYJAX_GEMM_INT8_KERNEL=avx512vnni).
//
// The block streaming kernel's shape (smooth_gemm_kernel_blocks_avx512.cc) over int8: an MR x NR register block of
// float32 accumulators walks K a chunk of 64 inputs (two 32-input activation groups) at a time. Each weight row's
// chunk is unpacked once into 64 unsigned bytes u = qw + Z (Z, the zero point, makes every format's integers
// unsigned: Q8_0 128, Q4_0 8, Q6_K 32, Q4_1 and Q4_K 0), a scale per int32 lane and the groups' minimum terms; then
// per x row, vpdpbusd (u8 x s8 -> int32, 4 products per lane) starting from -Z * sum4 gives in lane l the exact
// p_l = sum qx * qw over inputs 4l .. 4l + 3 (|p_l| <= 4 * 127 * 128 < 2^16; the int32 sum of u * qx, < 2^17, and of
// Z * sum4 are exact too). Float order, per x row t and weight row n, per lane l (inputs 4l .. 4l + 3 of the chunk,
// in group g, sub-block s) in chunk order:
//   acc_l = fma(float(p_l), scale_s * d[t, g], acc_l)         scale_s as the generic copy (dense()'s float32)
//   acc_0 = fma(min_g, dsum[t, g], acc_0)   (lane 0: the chunk's first group; lane 1: its second)  Q4_1, Q4_K
// then out = the sum of the 16 lanes (StoreSums): the 8 lanes of a group are not summed in int32 first (a
// horizontal add per group costs more than the lane-wise multiply-add), so the float32 rounding differs from the
// generic copy's (scale * d) * isum, within a few ulps of sum |d qx| |w|, and is exact where every term is.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <cstring>

#include "avx512_sums.h"
#include "smooth_gemm_blocks_format.h"
#include "smooth_gemm_int8.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

constexpr int64_t kChunk = 64;         // inputs per chunk: 64 bytes, two activation groups
constexpr int64_t kMaxRows = 8;        // x rows per pass over the weights
constexpr int NrFor(int mr) { return mr <= 2 ? 4 : 2; }   // weight rows per register block

// The zero point that makes format Q's integers unsigned bytes (u = qw + Z <= 255).
template <int Q>
constexpr int Zero() { return Q == kQ8_0 ? 128 : Q == kQ4_0 ? 8 : Q == kQ6_K ? 32 : 0; }
template <int Q>
constexpr bool HasMin() { return Q == kQ4_1 || Q == kQ4_K; }

// A weight row's chunk: 64 bytes u = qw + Zero<Q>(), the float32 scale of each int32 lane's 4 inputs, and (Q4_1,
// Q4_K) the minimum terms of the chunk's two groups in lanes 0 and 1 (other lanes 0).
struct Chunk {
  __m512i u;
  __m512 scale, min;
};

// The 4 bytes at p (two float16, or the lane sums' bytes).
inline int32_t Bytes4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// The float16 pairs (a0, a1) at p0 and (b0, b1) at p1 (p1 null: zeros) as float32 [a0, a1, b0, b1] (exact).
inline __m128 Halves4(const uint8_t* p0, const uint8_t* p1) {
  return _mm_cvtph_ps(_mm_setr_epi32(Bytes4(p0), p1 ? Bytes4(p1) : 0, 0, 0));
}
// Lane i of v in lanes 0-7 and lane j in lanes 8-15.
inline __m512 Spread(__m128 v, int i, int j) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(i, i, i, i, i, i, i, i, j, j, j, j, j, j, j, j), _mm512_zextps128_ps512(v));
}
// Lanes i, j of v in lanes 0, 1; the other lanes 0.
inline __m512 Low2(__m128 v, int i, int j) {
  return _mm512_maskz_permutexvar_ps(0x3, _mm512_castsi128_si512(_mm_setr_epi32(i, j, 0, 0)), _mm512_zextps128_ps512(v));
}
// Each 64-bit lane of v shifted right by 0 (lanes 0-3) or shift (lanes 4-7 of each 256-bit half: bytes 32-63 of a
// 256-bit pair, 16-31 / 48-63 of two 128-bit pairs as in Q4_0's nibbles), then each byte masked by mask.
inline __m512i ShiftMask(__m512i v, __m512i shifts, int mask) {
  return _mm512_and_si512(_mm512_srlv_epi64(v, shifts), _mm512_set1_epi8(static_cast<char>(mask)));
}

// Chunk c of a row of format Q (row: its first block); two: whether the chunk holds two 32-input blocks (false: one,
// the last of a row of an odd number of blocks; its upper half is zero).
template <int Q>
inline Chunk Load(const uint8_t* row, int64_t c, bool two) {
  constexpr int64_t kBytes = BlockBytes(Q);
  if constexpr (Q == kQ8_0) {
    const uint8_t* b = row + 2 * c * kBytes;
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    const __m256i q1 = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kBytes + 2)) : _mm256_setzero_si256();
    const __m512i q = _mm512_inserti64x4(_mm512_zextsi256_si512(q0), q1, 1);
    return {_mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80))),
            Spread(Halves4(b, two ? b + kBytes : nullptr), 0, 2), _mm512_setzero_ps()};
  } else if constexpr (Q == kQ4_0 || Q == kQ4_1) {   // [lo(b0), hi(b0), lo(b1), hi(b1)]: inputs 0 .. 63 in order
    const uint8_t* b = row + 2 * c * kBytes;
    constexpr int kOff = Q == kQ4_0 ? 2 : 4;
    const __m128i n0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kOff));
    const __m128i n1 = two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kBytes + kOff)) : _mm_setzero_si128();
    const __m512i v = _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_broadcastsi128_si256(n0)),
                                         _mm256_broadcastsi128_si256(n1), 1);
    const __m512i u = ShiftMask(v, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4), 15);
    const __m128 header = Halves4(b, two ? b + kBytes : nullptr);   // [d0, m0, d1, m1] (Q4_0: m the nibbles)
    return {u, Spread(header, 0, 2), Q == kQ4_1 ? Low2(header, 1, 3) : _mm512_setzero_ps()};
  } else if constexpr (Q == kQ4_K) {   // sub-blocks 2h, 2h + 1: one 32-byte run, low then high nibbles
    const uint8_t* blk = row + c / 4 * kBytes;
    const int h = static_cast<int>(c % 4), s = 2 * h;
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + Q4KByte(64 * h)));
    const __m512i u = ShiftMask(_mm512_broadcast_i64x4(bytes), _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4), 15);
    // [d, dmin, d, dmin] * [sc, -mn, sc', -mn'] = [d * sc, -(dmin * mn), ...] of sub-blocks s, s + 1 (exact)
    const __m128 f = _mm_mul_ps(Halves4(blk, blk), _mm_cvtepi32_ps(_mm_setr_epi32(Q4KScale(blk, s), -Q4KMin(blk, s),
                                                                               Q4KScale(blk, s + 1), -Q4KMin(blk, s + 1))));
    return {u, Spread(f, 0, 2), Low2(f, 1, 3)};
  } else {   // kQ6_K: inputs j0 .. j0 + 63, 64 low bytes at one shift, 32 high bytes at two shifts, 4 scales
    const uint8_t* blk = row + c / 4 * kBytes;
    const int j0 = 64 * static_cast<int>(c % 4);
    const __m512i low = _mm512_loadu_si512(blk + Q6KLowByte(j0));
    const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + Q6KHighByte(j0))));
    const int hs = Q6KHighShift(j0);
    const __m512i lo = ShiftMask(low, _mm512_set1_epi64(Q6KLowShift(j0)), 15);
    const __m512i hi = ShiftMask(high, _mm512_setr_epi64(hs, hs, hs, hs, hs + 2, hs + 2, hs + 2, hs + 2), 3);
    const __m512i u = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));   // hi <= 3: no carry into the next byte
    const __m128i sc4 = _mm_cvtsi32_si128(Bytes4(blk + Q6KScaleByte(j0)));
    const __m128i sc16 = _mm_shuffle_epi8(sc4, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(LoadHalf(blk + kQ6KD)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc16)));
    return {u, scale, _mm512_setzero_ps()};
  }
}

// An x row's chunk c: its 64 int8, -Z * sum4 per lane (the start of vpdpbusd), its groups' d in lanes 0-7 and 8-15,
// their dsum in lanes 0, 1. two false: the chunk's first group only (the rest zero).
struct XChunk {
  __m512i q, start;
  __m512 d, dsum;
};
template <int Q>
inline XChunk LoadX(const QuantRows& x, int64_t t, int64_t c, bool two) {
  const __mmask64 bytes = two ? ~__mmask64{0} : __mmask64{0xFFFFFFFF};
  const __mmask16 lanes = two ? 0xFFFF : 0x00FF;
  const int8_t* q = x.q + t * x.K + c * kChunk;
  const int32_t* sum4 = x.sum4 + t * (x.K / kActLane) + c * (kChunk / kActLane);
  const int64_t g = t * (x.K / kActGroup) + 2 * c;
  XChunk r;
  r.q = _mm512_maskz_loadu_epi8(bytes, q);
  // -Z * sum4: Z is a power of two
  r.start = Zero<Q>() ? _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_maskz_loadu_epi32(lanes, sum4),
                                                                                   __builtin_ctz(Zero<Q>())))
                      : _mm512_setzero_si512();
  const __m128 d = two ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x.d + g))) : _mm_load_ss(x.d + g);
  r.d = Spread(d, 0, 1);
  if constexpr (HasMin<Q>()) {
    r.dsum = _mm512_zextps128_ps512(two ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x.dsum + g)))
                                        : _mm_load_ss(x.dsum + g));
  } else {
    r.dsum = _mm512_setzero_ps();
  }
  return r;
}

// acc[i][j] += the products of chunk c of MR x rows (from t) and NR weight rows (at w, row_bytes apart).
template <int Q, int MR, int NR>
__attribute__((always_inline)) inline void Step(const QuantRows& x, int64_t t, const uint8_t* w, int64_t row_bytes,
                                                int64_t c, bool two, __m512 (&acc)[MR][NR]) {
  Chunk wc[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) wc[j] = Load<Q>(w + j * row_bytes, c, two);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const XChunk xc = LoadX<Q>(x, t + i, c, two);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512i p = _mm512_dpbusd_epi32(xc.start, wc[j].u, xc.q);
      acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(wc[j].scale, xc.d), acc[i][j]);
      if constexpr (HasMin<Q>()) acc[i][j] = _mm512_fmadd_ps(wc[j].min, xc.dsum, acc[i][j]);
    }
  }
}

// c[i, j] for i < MR, j < NR: x rows t .. t + MR - 1, weight rows at w + j * row_bytes. pf: weight rows to prefetch
// alongside (same shape), or null.
template <int Q, int MR, int NR>
void Block(const QuantRows& x, int64_t t, const uint8_t* w, float* c, int64_t ldc, const uint8_t* pf) {
  const int64_t K = x.K, row_bytes = K / BlockInputs(Q) * BlockBytes(Q), chunks = K / kChunk;
  const int64_t chunk_bytes = kChunk / BlockInputs(Q) * BlockBytes(Q);   // the K-quants: a fraction of a block
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t ch = 0; ch < chunks; ++ch) {
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        for (int64_t o = 0; o < chunk_bytes; o += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(pf + j * row_bytes + ch * chunk_bytes + o), _MM_HINT_T0);
        }
      }
    }
    Step<Q, MR, NR>(x, t, w, row_bytes, ch, true, acc);
  }
  if (K % kChunk) Step<Q, MR, NR>(x, t, w, row_bytes, chunks, false, acc);   // one 32-input block left
  StoreSums<MR, NR>(acc, c, ldc);
}

#include "smooth_gemm_kernel_int8.inc"

}  // namespace

// c [m, n] (row stride ldc) = x (m quantized rows of K) @ dequant(w [n, row_bytes])^T, single-threaded.
void Int8GemmAvx512Vnni(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c,
                        int64_t ldc) {
  Int8GemmAny(qtype, m, n, x, w, c, ldc);
}

}  // namespace gemm
}  // namespace xyjax
