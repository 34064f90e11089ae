// The meta_attention task kernel for AVX-512F (CMake adds -mavx512f -mavx2 -mfma to this file only):
// both paths on 16-float vectors. meta_attention_cpu.cc runs it when the CPU and OS support AVX-512F.
#define XYJAX_KERNEL_NS avx512
#define XYJAX_VECTOR_BYTES 64
#include "meta_attention_kernel.inc"
