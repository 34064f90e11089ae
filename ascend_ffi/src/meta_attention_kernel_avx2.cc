// The meta_attention task kernel compiled with AVX2 and FMA (CMake adds -mavx2 -mfma to this file
// only); meta_attention_cpu.cc calls it only when the CPU reports both.
#define XYJAX_KERNEL_NS avx2
#define XYJAX_VECTOR_BYTES 32
#include "meta_attention_kernel.inc"
