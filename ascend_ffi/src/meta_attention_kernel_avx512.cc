// The meta_attention task kernel for AVX-512F (CMake adds -mavx512f -mavx2 -mfma to this file only):
// the tile path alone, on 16-float vectors. meta_attention_cpu.cc sends it the tasks of at least 16
// query rows x heads when the CPU and OS support AVX-512F; the AVX2 copy runs the others.
#define XYJAX_KERNEL_NS avx512
#define XYJAX_VECTOR_BYTES 64
#define XYJAX_TILE_PATH_ONLY 1
#include "meta_attention_kernel.inc"
