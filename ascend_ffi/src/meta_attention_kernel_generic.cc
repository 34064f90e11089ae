// The meta_attention task kernel for baseline x86-64 (SSE2) or any other target: the row path
// only (no XYJAX_VECTOR_BYTES). Without FMA and with 16 narrow registers the tile path's register
// blocks spill, and measured 30-100x slower than the row path here.
#define XYJAX_KERNEL_NS generic
#include "meta_attention_kernel.inc"
