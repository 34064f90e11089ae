// The optional kernels of smooth_gemm_cpu.cc, each in its own file built for its own instruction set, and
// whether this build and CPU run them: the one place the gemm reads the build's XYJAX_HAVE_* switches. A
// kernel not compiled in is an inline stub, never called (its availability function returns false).
// Included by baseline files only, not by the kernel files: an inline function compiled with their flags
// could be the copy the linker keeps.
#ifndef XYJAX_SMOOTH_GEMM_KERNELS_H_
#define XYJAX_SMOOTH_GEMM_KERNELS_H_

#include <cstdint>

#include "smooth_gemm_int8.h"

namespace xyjax {
namespace gemm {

// GGUF block weights (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K by ggml type id; smooth_gemm_blocks_format.h), w [n, row_bytes]
// with K a multiple of the format's block inputs (32, or 256 for the K-quants): BlocksGemm*: c [m, n] (row stride
// ldc) = x [m, K] (row stride ldx) @ dequant(w)^T, float32, single-threaded, each weight row read once in place;
// BlocksDequant*: panel [n, K] = dequant(w), float32; dequant(w) is GGUFBlocks.dense()'s weights exactly. Three
// copies: the portable one (smooth_gemm_kernel_blocks_generic.cc) is always built; the AVX2 (+FMA, F16C) and
// AVX-512F ones (smooth_gemm_kernel_blocks_{avx2,avx512}.cc) on x86-64, run where the CPU has those features.
void BlocksGemmGeneric(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                       float* c, int64_t ldc);
void BlocksDequantGeneric(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel);
inline bool BlocksGenericRuns() { return true; }

#ifdef XYJAX_HAVE_X86_KERNELS
void BlocksGemmAvx2(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                    float* c, int64_t ldc);
void BlocksDequantAvx2(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel);
inline bool BlocksAvx2Runs() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
void BlocksGemmAvx512(int qtype, int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                      float* c, int64_t ldc);
void BlocksDequantAvx512(int qtype, int64_t n, int64_t K, const uint8_t* w, float* panel);
// Q4_1 only: panel [n, K + K / 32] = the rows in the split layout (d * q, then the block minimums m), float32.
void BlocksSplitAvx512(int64_t n, int64_t K, const uint8_t* w, float* panel);
inline bool BlocksAvx512Runs() { return __builtin_cpu_supports("avx512f"); }
#else
inline void BlocksGemmAvx2(int, int64_t, int64_t, int64_t, const float*, int64_t, const uint8_t*, float*, int64_t) {}
inline void BlocksDequantAvx2(int, int64_t, int64_t, const uint8_t*, float*) {}
inline bool BlocksAvx2Runs() { return false; }
inline void BlocksGemmAvx512(int, int64_t, int64_t, int64_t, const float*, int64_t, const uint8_t*, float*, int64_t) {}
inline void BlocksDequantAvx512(int, int64_t, int64_t, const uint8_t*, float*) {}
inline void BlocksSplitAvx512(int64_t, int64_t, const uint8_t*, float*) {}
inline bool BlocksAvx512Runs() { return false; }
#endif

// Int8 activations: c [m, n] (row stride ldc) = x (m rows of x.K inputs quantized, smooth_gemm_int8.h) @
// dequant(w [n, row_bytes])^T for GGUF blocks (the qtypes above), single-threaded, each weight row read once in place:
// integer dot products per 32-input group (per 16 inputs for Q6_K) against the blocks' integers, float32 scales.
// Three copies: the portable one (smooth_gemm_kernel_int8_generic.cc, the reference) is always built; the AVX2 one
// (pmaddubsw) and the AVX-512 VNNI one (vpdpbusd on zmm; smooth_gemm_kernel_int8_{avx2,avx512}.cc) on x86-64, run
// where the CPU has those features.
void Int8GemmGeneric(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c, int64_t ldc);
inline bool Int8GenericRuns() { return true; }
#ifdef XYJAX_HAVE_X86_KERNELS
void Int8GemmAvx2(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c, int64_t ldc);
inline bool Int8Avx2Runs() { return BlocksAvx2Runs(); }
#else
inline void Int8GemmAvx2(int, int64_t, int64_t, const QuantRows&, const uint8_t*, float*, int64_t) {}
inline bool Int8Avx2Runs() { return false; }
#endif
#ifdef XYJAX_HAVE_VNNI_KERNEL
void Int8GemmAvx512Vnni(int qtype, int64_t m, int64_t n, const QuantRows& x, const uint8_t* w, float* c,
                        int64_t ldc);
inline bool Int8Avx512VnniRuns() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
}
#else
inline void Int8GemmAvx512Vnni(int, int64_t, int64_t, const QuantRows&, const uint8_t*, float*, int64_t) {}
inline bool Int8Avx512VnniRuns() { return false; }
#endif

#ifdef XYJAX_HAVE_X86_KERNELS
// smooth_gemm_kernel_avx512.cc: c [m, n] (row stride ldc) = x [m, K] (row stride ldx) @ w [n, K]^T, float32,
// single-threaded, the weights read once in place.
void StreamGemmAvx512(int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const float* w, float* c,
                      int64_t ldc);
inline bool StreamKernelRuns() { return __builtin_cpu_supports("avx512f"); }
#else
inline void StreamGemmAvx512(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t) {}
inline bool StreamKernelRuns() { return false; }
#endif

#ifdef XYJAX_HAVE_AMX_KERNEL
// smooth_gemm_kernel_amx.cc (see there): whether this CPU and OS run it; x packed into bfloat16 tiles; the
// float32-accurate gemm of float32 weights (w_parts 3, or 2 for weights exact in two bfloat16 parts) and of
// weights stored as tiles (xyjax.ops.gemm.TileWeights).
bool AmxReady();
int64_t AmxPackedK(int64_t K, bool sums);
int64_t AmxPackedBytes(int64_t m, int64_t K);
void AmxPackX(int64_t m, int64_t K, bool sums, const float* x, int64_t ldx, int64_t b0, int64_t b1, uint8_t* dst);
void AmxGemm(int64_t m, int64_t n, int64_t K, int w_parts, const uint8_t* xb, const float* w, float* c,
             int64_t ldc);
void AmxGemmTiles(int64_t m, int64_t n, int64_t K, const uint8_t* xb, const uint8_t* tiles, float* c, int64_t ldc);
#else
inline bool AmxReady() { return false; }
inline int64_t AmxPackedK(int64_t K, bool) { return K; }
inline int64_t AmxPackedBytes(int64_t, int64_t) { return 0; }
inline void AmxPackX(int64_t, int64_t, bool, const float*, int64_t, int64_t, int64_t, uint8_t*) {}
inline void AmxGemm(int64_t, int64_t, int64_t, int, const uint8_t*, const float*, float*, int64_t) {}
inline void AmxGemmTiles(int64_t, int64_t, int64_t, const uint8_t*, const uint8_t*, float*, int64_t) {}
#endif

}  // namespace gemm
}  // namespace xyjax

#endif  // XYJAX_SMOOTH_GEMM_KERNELS_H_
