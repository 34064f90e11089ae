// The block kernels of smooth_gemm for GGUF's formats (Q8_0, Q4_0, Q4_1 in 32-input blocks; Q4_K, Q6_K in
// 256-input super-blocks), portable copy: plain C++ compiled for the default target (the baseline every CPU runs;
// XYJAX_GEMM_BLOCKS_KERNEL=generic forces it).
//
// Each weight is dequantized exactly as xyjax.ops.gemm.formats.GGUFBlocks.dense() computes it, in gguf's order
// (smooth_gemm_blocks_format.h says why every product is exact, so that a contracted multiply-add gives the same
// float32 weight). Here the weights of 4 rows at a time are dequantized into a small buffer (L1) and dotted with
// every x row: one pass over the weights; the AVX2 and AVX-512 copies (smooth_gemm_kernel_blocks_{avx2,avx512}.cc)
// keep them in registers.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "smooth_gemm_blocks_format.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

// The BlockInputs(qtype) weights of the block at blk, float32, exactly as dense().
void DequantBlock(int qtype, const uint8_t* blk, float* out) {
  const float d = LoadHalf(blk);
  if (qtype == kQ8_0) {
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<int8_t>(blk[2 + j])) * d;
  } else if (qtype == kQ4_0) {
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>((blk[2 + j] & 15) - 8);
      out[16 + j] = d * static_cast<float>((blk[2 + j] >> 4) - 8);
    }
  } else if (qtype == kQ4_1) {
    const float mn = LoadHalf(blk + 2);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(blk[4 + j] & 15) + mn;
      out[16 + j] = d * static_cast<float>(blk[4 + j] >> 4) + mn;
    }
  } else if (qtype == kQ4_K) {   // per sub-block of 32: one scale, one min, 32 consecutive bytes at one shift
    const float dmin = LoadHalf(blk + 2);
    for (int s = 0; s < 8; ++s) {
      const float ds = d * static_cast<float>(Q4KScale(blk, s)), dm = dmin * static_cast<float>(Q4KMin(blk, s));
      const uint8_t* qs = blk + Q4KByte(32 * s);
      const int shift = Q4KShift(32 * s);
      for (int j = 0; j < 32; ++j) out[32 * s + j] = ds * static_cast<float>((qs[j] >> shift) & 15) - dm;
    }
  } else {   // kQ6_K, per 16 inputs: one scale, 16 consecutive low and high bytes at one shift each
    const float d6 = LoadHalf(blk + kQ6KD);
    for (int g = 0; g < 256; g += 16) {
      const float ds = d6 * static_cast<float>(static_cast<int8_t>(blk[Q6KScaleByte(g)]));
      const uint8_t *low = blk + Q6KLowByte(g), *high = blk + Q6KHighByte(g);
      const int low_shift = Q6KLowShift(g), high_shift = Q6KHighShift(g);
      for (int j = 0; j < 16; ++j) {
        const int q = (((low[j] >> low_shift) & 15) | (((high[j] >> high_shift) & 3) << 4)) - 32;
        out[g + j] = ds * static_cast<float>(q);
      }
    }
  }
}

// dot(x, w) over K with eight running sums (a shape the compiler vectorizes without reassociating).
float Dot(const float* x, const float* w, int64_t K) {
  float acc[8] = {};
  for (int64_t k = 0; k < K; k += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[k + l] * w[k + l];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

// panel [n, K] (float32) = the dequantized weight rows w [n, row_bytes], K a multiple of BlockInputs(qtype).
void BlocksDequantGeneric(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel) {
  const int64_t inputs = BlockInputs(qtype), bytes = BlockBytes(qtype);
  for (int64_t b = 0; b < n * (K / inputs); ++b) DequantBlock(qtype, w + b * bytes, panel + b * inputs);
}

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ dequant(w [n, row_bytes])^T, single-threaded.
void BlocksGemmGeneric(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                       float* c, int64_t ldc) {
  constexpr int64_t kRows = 4;
  const int64_t row_bytes = K / BlockInputs(qtype) * BlockBytes(qtype);
  thread_local std::vector<float> rows;
  rows.resize(kRows * K);
  for (int64_t j0 = 0; j0 < n; j0 += kRows) {
    const int64_t nj = std::min(kRows, n - j0);
    BlocksDequantGeneric(qtype, nj, K, w + j0 * row_bytes, rows.data());
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < nj; ++j) c[i * ldc + j0 + j] = Dot(x + i * ldx, rows.data() + j * K, K);
    }
  }
}

}  // namespace gemm
}  // namespace xyjax
