// The int8 kernels of smooth_gemm (int8 activations, smooth_gemm_int8.h) for GGUF's block formats, portable copy:
// plain C++ integer loops for the default target, the reference the SIMD copies (smooth_gemm_kernel_int8_{avx2,
// avx512}.cc) are tested against (XYJAX_GEMM_INT8_KERNEL=generic forces it).
//
// Each weight block is unpacked once into its integers qw, the float32 scale of each run of inputs sharing one
// (a sub-block: 32 inputs, Q6_K's 16) and each 32-input group's minimum term, then dotted with every x row. Per x
// row t, weight row n and sub-block s of group g, in increasing input order, one float32 accumulator:
//   isum = sum qx * qw   (int32, exact: |qx| <= 127, |qw| <= 128, 32 terms: |isum| < 2^19)
//   acc  = acc + (scale_s * d[t, g]) * float(isum)            scale: Q8_0, Q4_0, Q4_1 the block's d; Q4_K d * sc;
//                                                             Q6_K d * sc (sub-blocks of 16: two per group)
//   acc  = acc + min_g * dsum[t, g]                           Q4_1: min = the block's m; Q4_K: -(dmin * mn)
// with qw: Q8_0 q; Q4_0 nibble - 8; Q4_1, Q4_K nibble (0..15); Q6_K q - 32. scale_s and min_g are the float32
// values GGUFBlocks.dense() computes (exact products, smooth_gemm_blocks_format.h), each product and sum rounded once
// (no contraction: the baseline target has no fused multiply-add).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "smooth_gemm_blocks_format.h"
#include "smooth_gemm_int8.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

// One block (32 or 256 inputs) unpacked: integers qw, a scale per sub-block, a minimum term per 32-input group.
struct Unpacked {
  int8_t qw[256];
  float scale[16];
  float min[8];
};

// Inputs per scale: Q6_K's 16, the other formats' 32.
constexpr int SubInputs(int qtype) { return qtype == kQ6_K ? 16 : 32; }
// Whether the format has a minimum term (w = scale * qw + min).
constexpr bool HasMin(int qtype) { return qtype == kQ4_1 || qtype == kQ4_K; }

// The block at blk unpacked into u (its BlockInputs(qtype) integers, scales and minimums).
void Unpack(int qtype, const uint8_t* blk, Unpacked* u) {
  const float d = LoadHalf(blk);
  if (qtype == kQ8_0) {
    for (int j = 0; j < 32; ++j) u->qw[j] = static_cast<int8_t>(blk[2 + j]);
    u->scale[0] = d;
  } else if (qtype == kQ4_0 || qtype == kQ4_1) {
    const uint8_t* nibbles = blk + (qtype == kQ4_0 ? 2 : 4);
    const int zero = qtype == kQ4_0 ? 8 : 0;
    for (int j = 0; j < 32; ++j) u->qw[j] = static_cast<int8_t>(((nibbles[NibbleByte(j)] >> NibbleShift(j)) & 15) - zero);
    u->scale[0] = d;
    u->min[0] = qtype == kQ4_1 ? LoadHalf(blk + 2) : 0.0f;
  } else if (qtype == kQ4_K) {
    const float dmin = LoadHalf(blk + 2);
    for (int j = 0; j < 256; ++j) u->qw[j] = static_cast<int8_t>((blk[Q4KByte(j)] >> Q4KShift(j)) & 15);
    for (int s = 0; s < 8; ++s) {
      u->scale[s] = d * static_cast<float>(Q4KScale(blk, s));
      u->min[s] = -(dmin * static_cast<float>(Q4KMin(blk, s)));
    }
  } else {   // kQ6_K
    const float d6 = LoadHalf(blk + kQ6KD);
    for (int j = 0; j < 256; ++j) {
      const int low = (blk[Q6KLowByte(j)] >> Q6KLowShift(j)) & 15, high = (blk[Q6KHighByte(j)] >> Q6KHighShift(j)) & 3;
      u->qw[j] = static_cast<int8_t>((low | (high << 4)) - 32);
    }
    for (int s = 0; s < 16; ++s) u->scale[s] = d6 * static_cast<float>(static_cast<int8_t>(blk[Q6KScaleByte(16 * s)]));
  }
}

// sum qx[k] * qw[k] over k < count (int32, exact).
int32_t IntDot(const int8_t* qx, const int8_t* qw, int count) {
  int32_t sum = 0;
  for (int k = 0; k < count; ++k) sum += static_cast<int32_t>(qx[k]) * static_cast<int32_t>(qw[k]);
  return sum;
}

}  // namespace

// c [m, n] (row stride ldc) = x (m quantized rows of K) @ dequant(w [n, row_bytes])^T, single-threaded.
void Int8GemmGeneric(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c, int64_t ldc) {
  const int64_t K = x.K, inputs = BlockInputs(qtype), bytes = BlockBytes(qtype), groups = K / kActGroup;
  const int sub = SubInputs(qtype);
  thread_local std::vector<float> acc;
  acc.resize(m);
  Unpacked u;
  for (int64_t j = 0; j < n; ++j) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < K / inputs; ++b) {
      Unpack(qtype, w + (j * (K / inputs) + b) * bytes, &u);
      for (int64_t t = 0; t < m; ++t) {
        const int8_t* qx = x.q + t * K + b * inputs;
        const int64_t g0 = t * groups + b * inputs / kActGroup;
        for (int s = 0; s < inputs / sub; ++s) {
          const int64_t g = g0 + s * sub / kActGroup;
          acc[t] = acc[t] + (u.scale[s] * x.d[g]) * static_cast<float>(IntDot(qx + s * sub, u.qw + s * sub, sub));
          if (HasMin(qtype)) acc[t] = acc[t] + u.min[s] * x.dsum[g];   // sub-blocks of 32: s is the group
        }
      }
    }
    for (int64_t t = 0; t < m; ++t) c[t * ldc + j] = acc[t];
  }
}

}  // namespace gemm
}  // namespace xyjax
