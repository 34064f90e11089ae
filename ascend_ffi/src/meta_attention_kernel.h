// The per-task kernel of the CPU meta_attention backend: what one lane computes for one task row
// of the tile contract. The kernel body (meta_attention_kernel.inc) is compiled once per
// instruction-set level, each copy in its own namespace; meta_attention_cpu.cc picks one at run
// time (so the library runs on any x86-64 and uses AVX2/FMA or AVX-512F where the CPU has them).
#ifndef XYJAX_META_ATTENTION_KERNEL_H_
#define XYJAX_META_ATTENTION_KERNEL_H_

#include <stdint.h>

#include "xyjax/tile_contract.h"

namespace xyjax {
namespace attention {

enum class Elem : int32_t { kF32 = 0, kBF16 = 1 };

// One call's operands. Shapes: q/out [T, H, D], k/v [L, NB, Hkv, BS, D], tables [S, P],
// tree_mask [T, MT] (row t, column j: flat query row t sees the tree token at KV position
// mask_base + j of its TREE task; MT = 0 when the call has no tree mask).
struct Args {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* tables;
  const uint8_t* tree_mask;
  int64_t MT;
  Elem q_type;   // also the output's
  Elem kv_type;
  int64_t T, H, D, L, NB, Hkv, BS, S, P;
  int64_t group;  // H / Hkv
  int64_t layer;
  float scale;
};

// Positions of one KV block handled together by the row path (decodes, short verify runs).
constexpr int kChunk = 16;
// Positions per chunk of the tile path (prefill chunks, long verify runs); may span cache blocks.
constexpr int kTileKeys = 64;
// Widest row vector of the tile path (floats): 16 with AVX-512.
constexpr int kMaxRowVector = 16;

// Floats of scratch one lane needs for tasks of up to `max_rows` query rows (either path).
inline int64_t ScratchFloats(const Args& a, int64_t max_rows) {
  const int64_t m = max_rows * a.group;
  const int64_t mp = (m + kMaxRowVector - 1) / kMaxRowVector * kMaxRowVector;
  const int64_t rows = 2 * m * a.D + 2 * m + 2 * kChunk * a.D + a.group * kChunk;
  const int64_t tile = (2 * a.D + 2 * kTileKeys + 4) * mp + 2 * kTileKeys * a.D;
  return (rows > tile ? rows : tile) + 64;
}

// Computes one validated task (CAUSAL or TREE) with q_len > 0 over its KV range [kv_start, kv_end).
// With partial == nullptr (an unsplit task) it writes the task's rows and heads of out, normalised;
// a row that sees no position gets zeros. Otherwise (one KV split of a task) it writes float32
// partial[R, G, D] (normalised over the split's visible positions; zeros where none) and
// lse[R, G] (log-sum-exp of the scaled scores; -inf where none), R = q_len, G = group.
// `scratch` holds ScratchFloats(a, >= q_len) floats. Returns 0, or -1 when a block table entry it
// reads is outside [0, NB) (then what it wrote is undefined; the call fails).
using TaskFn = int (*)(const Args& a, const XyjaxTask& task, float* scratch, float* partial, float* lse);

namespace generic {
int RunTask(const Args& a, const XyjaxTask& task, float* scratch, float* partial, float* lse);
}
namespace avx2 {
int RunTask(const Args& a, const XyjaxTask& task, float* scratch, float* partial, float* lse);
}
namespace avx512 {
int RunTask(const Args& a, const XyjaxTask& task, float* scratch, float* partial, float* lse);
}

}  // namespace attention
}  // namespace xyjax

#endif  // XYJAX_META_ATTENTION_KERNEL_H_
