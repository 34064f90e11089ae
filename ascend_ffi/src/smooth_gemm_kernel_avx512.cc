// The streaming small-m gemm of smooth_gemm_cpu.cc, for AVX-512F (CMake adds -mavx512f -mavx2 -mfma to
// this file only): c[i, j] = dot(x[i, :], w[j, :]) for a few rows x [m, K] against weights w [n, K]
// stored as the rows of the outputs (the layout of the model's dense weights and of a tied LM head).
//
// Why not the BLAS: at small m a step is bound by reading the weights once, and the BLAS packs them
// first (read, write, read again), which made a 7-row pass over the model's weights cost 1.9x a 1-row
// pass. Here the weight rows are consumed where they lie, in order: a block of kColumns rows (74 KiB at
// K = 576: it stays in L2) is multiplied against every block of up to 6 x rows, the first of which also
// prefetches the rows kPrefetchRows ahead, so the whole lane's range is one forward stream read once.
// Each 6 x 4 register block (24 accumulators of 16 floats) runs fused multiply-adds along K and is
// reduced to its 24 dot products at the end.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "avx512_sums.h"

namespace xyjax {
namespace gemm {
namespace {

constexpr int64_t kColumns = 32;   // weight rows per block (kept in cache across the x row blocks)
constexpr int64_t kPrefetchRows = 8;   // how far ahead of a block's rows the stream is prefetched

// c[i, j] for i < MR, j < NR: x rows at x + i * ldx, weight rows at w + j * K. pf: weight rows to
// prefetch alongside (same shape), or null.
template <int MR, int NR>
inline void Block(const float* x, int64_t ldx, const float* w, int64_t K, float* c, int64_t ldc, const float* pf) {
  // The loops over i and j are unrolled by pragma: unrolled later (by -O3 alone), GCC 12 keeps acc in memory
  // and stores all of it every K step, which made this kernel store-bound at a third of the FMA rate.
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  StoreSums<MR, NR>(acc, c, ldc);
}

// MR x rows against n weight rows, 4 at a time, then singly.
template <int MR>
void Rows(const float* x, int64_t ldx, const float* w, int64_t n, int64_t K, float* c, int64_t ldc,
          const float* pf) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) Block<MR, 4>(x, ldx, w + j * K, K, c + j, ldc, pf ? pf + j * K : nullptr);
  for (; j < n; ++j) Block<MR, 1>(x, ldx, w + j * K, K, c + j, ldc, pf ? pf + j * K : nullptr);
}

using RowsFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, const float*);
constexpr RowsFn kRows[7] = {nullptr, Rows<1>, Rows<2>, Rows<3>, Rows<4>, Rows<5>, Rows<6>};

}  // namespace

// c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ w [n, K]^T, float32, single-threaded.
void StreamGemmAvx512(int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const float* w, float* c,
                      int64_t ldc) {
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t columns = std::min(kColumns, n - j0);
    const float* block = w + j0 * K;
    for (int64_t i = 0; i < m; i += 6) {
      const int rows = static_cast<int>(std::min<int64_t>(6, m - i));
      // The first row block pulls the weights in; it also prefetches the rows kPrefetchRows ahead.
      kRows[rows](x + i * ldx, ldx, block, columns, K, c + i * ldc + j0, ldc,
                  i == 0 ? block + kPrefetchRows * K : nullptr);
    }
  }
}

}  // namespace gemm
}  // namespace xyjax
