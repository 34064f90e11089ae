// Int8 activations (the attribute act_quant = 1; xyjax/ops/gemm/quant.py is the contract): x's rows as the
// handler quantizes them once per call, the operand of the int8 kernels (smooth_gemm_kernel_int8_*.cc). Plain data
// only: the kernel files include it under their own instruction-set flags.
#ifndef XYJAX_SMOOTH_GEMM_INT8_H_
#define XYJAX_SMOOTH_GEMM_INT8_H_

#include <cstdint>

namespace xyjax {
namespace gemm {

constexpr int64_t kActGroup = 32;   // inputs per activation scale (quant.GROUP)
constexpr int64_t kActLane = 4;     // inputs per int32 lane of the SIMD dot products (vpdpbusd, pmaddubsw + pmaddwd)

// Rows of x [m, K] quantized per row and group g of kActGroup inputs (quant.py, bit for bit): amax = max |x[g]|,
// d = amax / 127, id = 1 / d (0 where d = 0), q = round_half_even(x[g] * id); x[g] ~ d * q.
struct QuantRows {
  const int8_t* q;        // [m, K] int8, |q| <= 127
  const float* d;         // [m, K / 32] float32: each group's d
  const float* dsum;      // [m, K / 32] float32: d * float(sum of the group's q), rounded once (Q4_1, Q4_K minimums)
  const int32_t* sum4;    // [m, K / 4] int32: the sum of each kActLane consecutive q (the SIMD copies' zero points)
  int64_t K;              // inputs per row: q's row stride; d's and dsum's K / 32, sum4's K / 4
};

}  // namespace gemm
}  // namespace xyjax

#endif  // XYJAX_SMOOTH_GEMM_INT8_H_
