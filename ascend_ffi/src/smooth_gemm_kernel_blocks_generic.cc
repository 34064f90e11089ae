// The block kernels of smooth_gemm for GGUF's 32-input formats (Q8_0, Q4_0, Q4_1), portable copy: plain C++
// compiled for the default target (the baseline every CPU runs; XYJAX_GEMM_BLOCKS_KERNEL=generic forces it).
//
// Each weight is dequantized exactly as xyjax.ops.gemm.formats.GGUFBlocks.dense() computes it (gguf's own
// dequantization): Q8_0 q * d, Q4_0 d * (q - 8), Q4_1 d * q + m, with d and m the block's float16 fields as
// float32. The products are exact in float32 (an 11-bit significand times an integer of at most 8 bits), so
// whether the compiler contracts d * q + m into a fused multiply-add or not, the weight is the same float32.
// Here the weights of 4 rows at a time are dequantized into a small buffer (L1) and dotted with every x row:
// one pass over the weights; the AVX-512 copy (smooth_gemm_kernel_blocks_avx512.cc) keeps them in registers.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "smooth_gemm_blocks_format.h"

namespace xyjax {
namespace gemm {
namespace {

using namespace blocks;

// One row's K weights (K a multiple of 32) from its blocks.
void DequantRow(int qtype, int64_t K, const uint8_t* row, float* out) {
  const int64_t bytes = BlockBytes(qtype);
  for (int64_t b = 0; b < K / kBlock; ++b, row += bytes, out += kBlock) {
    const float d = LoadHalf(row);
    if (qtype == kQ8_0) {
      for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<int8_t>(row[2 + j])) * d;
    } else if (qtype == kQ4_0) {
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>((row[2 + j] & 15) - 8);
        out[16 + j] = d * static_cast<float>((row[2 + j] >> 4) - 8);
      }
    } else {   // kQ4_1
      const float mn = LoadHalf(row + 2);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>(row[4 + j] & 15) + mn;
        out[16 + j] = d * static_cast<float>(row[4 + j] >> 4) + mn;
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

// panel [n, K] (float32) = the dequantized weight rows w [n, row_bytes].
void BlocksDequantGeneric(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel) {
  const int64_t row_bytes = K / kBlock * BlockBytes(qtype);
  for (int64_t j = 0; j < n; ++j) DequantRow(qtype, K, w + j * row_bytes, panel + j * K);
}

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ dequant(w [n, row_bytes])^T, single-threaded.
void BlocksGemmGeneric(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                       float* c, int64_t ldc) {
  constexpr int64_t kRows = 4;
  const int64_t row_bytes = K / kBlock * BlockBytes(qtype);
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
