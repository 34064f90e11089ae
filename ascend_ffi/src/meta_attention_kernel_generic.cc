// The meta_attention task kernel for baseline x86-64 (SSE2) or any other target.
#define XYJAX_KERNEL_NS generic
#include "meta_attention_kernel.inc"
