// meta_attention on the CPU as an XLA FFI custom call (jax.ffi): the "ffi" backend of
// xyjax.ops.meta_attention, registered from Python under the name "xyjax_meta_attention_cpu" from
// the exported handler symbol XyjaxMetaAttentionCpu.
//
// Operands (see xyjax/ops/attention.py and include/xyjax/tile_contract.h):
//   q [T, H, D] f32|bf16, k and v [L, NB, Hkv, BS, D] f32|bf16 (the whole cache, read in place),
//   layer s32[], block_tables s32[S, P], tasks s32[W, XYJAX_TASK_NUM_FIELDS] (q_len 0 = padding),
//   attribute scale f32. Result [T, H, D] in q's dtype; rows and heads no task covers are zero.
//
// Every real task is validated first (a bad table is an error, not a silent wrong answer); TREE
// masks and KV splits are not implemented here yet and fail with UNIMPLEMENTED. Tasks are then
// handed out largest first from an atomic counter to the lanes of a persistent thread pool
// (XYJAX_ATTENTION_THREADS lanes, default hardware_concurrency); each task writes disjoint
// output rows, so lanes never synchronise on the output.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "meta_attention_kernel.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"
#include "xyjax/tile_contract.h"

namespace ffi = xla::ffi;

namespace xyjax {
namespace attention {
using Scalar32 = ffi::Buffer<ffi::S32, 0>;  // aliases: the handler macro cannot take "<a, b>"
using Matrix32 = ffi::Buffer<ffi::S32, 2>;
}  // namespace attention
}  // namespace xyjax

namespace xyjax {
namespace attention {
namespace {

// The task kernel for this CPU: the AVX2+FMA copy where the CPU has both, else the baseline one.
// XYJAX_ATTENTION_KERNEL=generic forces the baseline copy (read on every call; for tests).
TaskFn PickKernel() {
  const char* forced = std::getenv("XYJAX_ATTENTION_KERNEL");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return generic::RunTask;
#if defined(XYJAX_HAVE_AVX2_KERNEL)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (avx2) return avx2::RunTask;
#endif
  return generic::RunTask;
}

bool ElemOf(ffi::DataType type, Elem* elem) {
  if (type == ffi::DataType::F32) {
    *elem = Elem::kF32;
    return true;
  }
  if (type == ffi::DataType::BF16) {
    *elem = Elem::kBF16;
    return true;
  }
  return false;
}

std::string Dims(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("xyjax_meta_attention_cpu: " + what);
}

std::string TaskText(int64_t index, const XyjaxTask& t) {
  return "task " + std::to_string(index) + " (seq " + std::to_string(t.seq) + ", q_start " +
         std::to_string(t.q_start) + ", q_len " + std::to_string(t.q_len) + ", q_pos " +
         std::to_string(t.q_pos) + ", kv [" + std::to_string(t.kv_start) + ", " +
         std::to_string(t.kv_end) + "), kv_head " + std::to_string(t.kv_head) + ")";
}

ffi::Error MetaAttentionCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            Scalar32 layer, Matrix32 block_tables, Matrix32 tasks, float scale,
                            ffi::Result<ffi::AnyBuffer> out) {
  Args a{};
  if (!ElemOf(q.element_type(), &a.q_type)) return Invalid("q must be float32 or bfloat16");
  if (!ElemOf(k.element_type(), &a.kv_type) || v.element_type() != k.element_type()) {
    return Invalid("the k and v caches must both be float32 or both bfloat16");
  }
  if (out->element_type() != q.element_type()) return Invalid("the result must have q's dtype");
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto td = block_tables.dimensions(), wd = tasks.dimensions();
  if (qd.size() != 3) return Invalid("q must be [T, H, D], got " + Dims(qd));
  if (kd.size() != 5) return Invalid("k must be [L, NB, Hkv, BS, D], got " + Dims(kd));
  if (Dims(vd) != Dims(kd)) return Invalid("v " + Dims(vd) + " differs from k " + Dims(kd));
  if (Dims(out->dimensions()) != Dims(qd)) return Invalid("the result must have q's shape");
  if (wd[1] != XYJAX_TASK_NUM_FIELDS) {
    return Invalid("tasks must be [W, " + std::to_string(XYJAX_TASK_NUM_FIELDS) + "], got " +
                   Dims(wd));
  }
  a.T = qd[0], a.H = qd[1], a.D = qd[2];
  a.L = kd[0], a.NB = kd[1], a.Hkv = kd[2], a.BS = kd[3];
  a.S = td[0], a.P = td[1];
  if (kd[4] != a.D) return Invalid("head_dim of q " + Dims(qd) + " and k " + Dims(kd) + " differ");
  if (a.Hkv <= 0 || a.H % a.Hkv != 0 || a.BS <= 0) {
    return Invalid("num_heads " + std::to_string(a.H) + " is not a multiple of num_kv_heads " +
                   std::to_string(a.Hkv));
  }
  a.group = a.H / a.Hkv;
  a.layer = layer.typed_data()[0];
  if (a.layer < 0 || a.layer >= a.L) {
    return Invalid("layer " + std::to_string(a.layer) + " outside [0, " + std::to_string(a.L) + ")");
  }
  a.q = q.untyped_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  a.out = out->untyped_data();
  a.tables = block_tables.typed_data();
  a.scale = scale;

  // Validate the real tasks; mark the (row, kv head) slices they cover.
  const XyjaxTask* rows = reinterpret_cast<const XyjaxTask*>(tasks.typed_data());
  const int64_t width = wd[0];
  std::vector<std::pair<int64_t, int32_t>> order;  // (cost, task index)
  std::vector<uint8_t> covered(static_cast<size_t>(a.T * a.Hkv), 0);
  int64_t max_rows = 0;
  for (int64_t i = 0; i < width; ++i) {
    const XyjaxTask& t = rows[i];
    if (t.q_len == 0) continue;
    if (t.mask_kind != XYJAX_MASK_CAUSAL) {
      return ffi::Error(ffi::ErrorCode::kUnimplemented,
                        "xyjax_meta_attention_cpu: " + TaskText(i, t) + " has mask kind " +
                            std::to_string(t.mask_kind) +
                            "; only CAUSAL masks are implemented (TREE masks are not yet)");
    }
    if (t.num_splits != 1 || t.split != 0) {
      return ffi::Error(ffi::ErrorCode::kUnimplemented,
                        "xyjax_meta_attention_cpu: " + TaskText(i, t) + " is KV split " +
                            std::to_string(t.split) + " of " + std::to_string(t.num_splits) +
                            "; KV splits are not implemented (num_splits must be 1)");
    }
    if (t.q_len < 0 || t.q_start < 0 || int64_t{t.q_start} + t.q_len > a.T) {
      return Invalid(TaskText(i, t) + ": query rows outside [0, " + std::to_string(a.T) + ")");
    }
    if (t.seq < 0 || t.seq >= a.S) {
      return Invalid(TaskText(i, t) + ": seq outside [0, " + std::to_string(a.S) + ")");
    }
    if (t.kv_head < 0 || t.kv_head >= a.Hkv) {
      return Invalid(TaskText(i, t) + ": kv_head outside [0, " + std::to_string(a.Hkv) + ")");
    }
    if (t.q_pos < 0 || t.kv_start < 0 || t.kv_end < t.kv_start) {
      return Invalid(TaskText(i, t) + ": negative position or empty-reversed KV range");
    }
    const int64_t hi = std::min<int64_t>(t.kv_end, int64_t{t.q_pos} + t.q_len);
    if (hi > a.P * a.BS) {
      return Invalid(TaskText(i, t) + ": reads position " + std::to_string(hi - 1) +
                     " beyond the block table's " + std::to_string(a.P * a.BS));
    }
    for (int64_t r = t.q_start; r < t.q_start + t.q_len; ++r) {
      uint8_t& c = covered[r * a.Hkv + t.kv_head];
      if (c) return Invalid(TaskText(i, t) + ": overlaps another task's rows");
      c = 1;
    }
    order.emplace_back(int64_t{t.q_len} * (std::max<int64_t>(hi - t.kv_start, 0) + 16),
                       static_cast<int32_t>(i));
    max_rows = std::max<int64_t>(max_rows, t.q_len);
  }
  // Largest first across all groups, so the last tasks handed out are the short ones.
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });

  // Zero what no task writes.
  const size_t slice = static_cast<size_t>(a.group * a.D) * (a.q_type == Elem::kF32 ? 4 : 2);
  char* out_bytes = static_cast<char*>(a.out);
  for (int64_t i = 0; i < a.T * a.Hkv; ++i) {
    if (!covered[i]) std::memset(out_bytes + i * slice, 0, slice);
  }
  if (order.empty()) return ffi::Error::Success();

  const TaskFn kernel = PickKernel();
  const int64_t scratch = ScratchFloats(a, max_rows);
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> bad{-1};
  const int64_t count = static_cast<int64_t>(order.size());
  auto lane = [&](int) {
    std::vector<float> buffer(static_cast<size_t>(scratch));
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      const int32_t index = order[i].second;
      if (kernel(a, rows[index], buffer.data()) != 0) {
        int64_t none = -1;
        bad.compare_exchange_strong(none, index);
      }
    }
  };
  ThreadPool& pool = ThreadPool::Shared();
  pool.Run(static_cast<int>(std::min<int64_t>(count, pool.lanes())), lane);
  if (bad.load() >= 0) {
    return Invalid(TaskText(bad.load(), rows[bad.load()]) +
                   ": a block table entry it reads is outside [0, " + std::to_string(a.NB) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace attention
}  // namespace xyjax

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(XyjaxMetaAttentionCpu, xyjax::attention::MetaAttentionCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()                // q
                                  .Arg<ffi::AnyBuffer>()                // k cache
                                  .Arg<ffi::AnyBuffer>()                // v cache
                                  .Arg<xyjax::attention::Scalar32>()    // layer
                                  .Arg<xyjax::attention::Matrix32>()    // block_tables
                                  .Arg<xyjax::attention::Matrix32>()    // tasks
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop

// Lanes the shared pool runs (XYJAX_ATTENTION_THREADS or hardware_concurrency); creates the pool.
extern "C" __attribute__((visibility("default"))) int32_t xyjax_attention_threads(void) {
  return xyjax::ThreadPool::Shared().lanes();
}
