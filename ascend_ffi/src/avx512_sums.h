// The write-out shared by the AVX-512 streaming kernels (float32 and GGUF blocks): MR x NR accumulators of 16
// partial sums each, reduced to MR rows of NR floats. Include only from files built with -mavx512f.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace xyjax {
namespace gemm {

template <int MR, int NR>
__attribute__((always_inline)) inline void StoreSums(__m512 (&acc)[MR][NR], float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if constexpr (NR == 4) {   // 4 sums at once: 512 -> 256 bits, then two rounds of horizontal adds
      __m256 half[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        half[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[i][j]),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][j]), 1)));
      }
      const __m256 v = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
      _mm_storeu_ps(c + i * ldc, _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) c[i * ldc + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

}  // namespace gemm
}  // namespace xyjax
