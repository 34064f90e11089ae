// meta_attention on the CPU as an XLA FFI custom call (jax.ffi): the "ffi" backend of
// xyjax.ops.meta_attention, registered from Python under the name "xyjax_meta_attention_cpu" from
// the exported handler symbol XyjaxMetaAttentionCpu.
//
// Operands (see xyjax/ops/attention/ and include/xyjax/tile_contract.h):
//   q [T, H, D] f32|bf16, k and v [L, NB, Hkv, BS, D] f32|bf16 (the whole cache, read in place),
//   layer s32[], block_tables s32[S, P], tasks s32[W, XYJAX_TASK_NUM_FIELDS] (q_len 0 = padding),
//   tree_mask u8[T, MT] (row t, column j != 0: flat row t of a TREE task sees KV position
//   mask_base + j; [T, 0] when there is none, and then a TREE task is an error),
//   attribute scale f32. Result [T, H, D] in q's dtype; rows and heads no task covers are zero.
//
// The handler is four steps: Parse (buffers -> Args, shape checks), Validate (every real task and the KV
// split groups: a bad table is an error naming the task, not a silent wrong answer), Run (phase 1: the tasks,
// largest first, pulled from an atomic counter by the lanes of a persistent thread pool, XYJAX_ATTENTION_THREADS
// lanes, default hardware_concurrency; an unsplit task writes its own disjoint output rows, a KV split its
// normalised partial and log-sum-exp into scratch) and Merge (phase 2: each split group's partials combined
// with log-sum-exp weights, groups in parallel).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "meta_attention_kernel.h"
#include "ffi_util.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"
#include "xyjax/tile_contract.h"

namespace ffi = xla::ffi;

namespace xyjax {
namespace attention {
using Scalar32 = ffi::Buffer<ffi::S32, 0>;  // aliases: the handler macro cannot take "<a, b>"
using Matrix32 = ffi::Buffer<ffi::S32, 2>;
using MatrixU8 = ffi::Buffer<ffi::U8, 2>;
}  // namespace attention
}  // namespace xyjax

namespace xyjax {
namespace attention {
namespace {

// The task kernel for this CPU: the AVX-512F copy, else the AVX2+FMA one, else the baseline one.
// XYJAX_ATTENTION_KERNEL=generic|avx2 caps the choice (read on every call; tests).
TaskFn PickKernel() {
  const char* forced = std::getenv("XYJAX_ATTENTION_KERNEL");
  const std::string cap = forced != nullptr ? forced : "";
  if (cap == "generic") return generic::RunTask;
#if defined(XYJAX_HAVE_X86_KERNELS)
  static const int level = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
  }();
  if (level == 2 && cap != "avx2") return avx512::RunTask;
  if (level >= 1) return avx2::RunTask;
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

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("xyjax_meta_attention_cpu: " + what);
}

std::string TaskText(int64_t index, const XyjaxTask& t) {
  std::string s = "task " + std::to_string(index) + " (seq " + std::to_string(t.seq) + ", q_start " +
                  std::to_string(t.q_start) + ", q_len " + std::to_string(t.q_len) + ", q_pos " +
                  std::to_string(t.q_pos) + ", kv [" + std::to_string(t.kv_start) + ", " +
                  std::to_string(t.kv_end) + "), kv_head " + std::to_string(t.kv_head);
  if (t.mask_kind != XYJAX_MASK_CAUSAL) {
    s += ", mask_kind " + std::to_string(t.mask_kind) + ", mask_base " + std::to_string(t.mask_base);
  }
  if (t.num_splits != 1 || t.split != 0) {
    s += ", split " + std::to_string(t.split) + " of " + std::to_string(t.num_splits);
  }
  return s + ")";
}

void StoreRow(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void StoreRow(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

// Merges the KV splits of one (q_start, kv_head): out[row, head] = sum_s w_s partial_s / sum_s w_s
// with w_s = exp(lse_s - max_s lse_s); a row and head no split sees are zeros.
template <typename QT>
void MergeSplits(const Args& a, const XyjaxTask& t, const float* const* partials,
                 const float* const* lses, float* row_buffer) {
  const int64_t G = a.group, D = a.D, n = t.num_splits;
  QT* out = static_cast<QT*>(a.out);
  for (int64_t r = 0; r < t.q_len; ++r) {
    QT* dst = out + ((t.q_start + r) * a.H + t.kv_head * G) * D;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = r * G + g;
      float peak = -INFINITY;
      for (int64_t s = 0; s < n; ++s) peak = std::max(peak, lses[s][m]);
      for (int64_t d = 0; d < D; ++d) row_buffer[d] = 0.0f;
      if (peak != -INFINITY) {
        float total = 0.0f;
        for (int64_t s = 0; s < n; ++s) {
          if (lses[s][m] == -INFINITY) continue;
          const float w = std::exp(lses[s][m] - peak);
          const float* src = partials[s] + m * D;
          for (int64_t d = 0; d < D; ++d) row_buffer[d] += w * src[d];
          total += w;
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; ++d) row_buffer[d] *= inv;
      }
      StoreRow(dst + g * D, row_buffer, D);
    }
  }
}

// Buffers -> Args, with the shape and dtype checks.
ffi::Error Parse(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, Scalar32 layer, Matrix32 block_tables,
                 Matrix32 tasks, MatrixU8 tree_mask, float scale, ffi::Result<ffi::AnyBuffer>& out, Args* a) {
  if (!ElemOf(q.element_type(), &a->q_type)) return Invalid("q must be float32 or bfloat16");
  if (!ElemOf(k.element_type(), &a->kv_type) || v.element_type() != k.element_type()) {
    return Invalid("the k and v caches must both be float32 or both bfloat16");
  }
  if (out->element_type() != q.element_type()) return Invalid("the result must have q's dtype");
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto td = block_tables.dimensions(), wd = tasks.dimensions(), md = tree_mask.dimensions();
  if (qd.size() != 3) return Invalid("q must be [T, H, D], got " + Dims(qd));
  if (kd.size() != 5) return Invalid("k must be [L, NB, Hkv, BS, D], got " + Dims(kd));
  if (Dims(vd) != Dims(kd)) return Invalid("v " + Dims(vd) + " differs from k " + Dims(kd));
  if (Dims(out->dimensions()) != Dims(qd)) return Invalid("the result must have q's shape");
  if (wd[1] != XYJAX_TASK_NUM_FIELDS) {
    return Invalid("tasks must be [W, " + std::to_string(XYJAX_TASK_NUM_FIELDS) + "], got " + Dims(wd));
  }
  if (md[0] != qd[0]) {
    return Invalid("tree_mask must be [T, MT] with T = " + std::to_string(qd[0]) + " (q's rows), got " +
                   Dims(md));
  }
  a->T = qd[0], a->H = qd[1], a->D = qd[2];
  a->L = kd[0], a->NB = kd[1], a->Hkv = kd[2], a->BS = kd[3];
  a->S = td[0], a->P = td[1];
  a->MT = md[1];
  if (kd[4] != a->D) return Invalid("head_dim of q " + Dims(qd) + " and k " + Dims(kd) + " differ");
  if (a->Hkv <= 0 || a->H % a->Hkv != 0 || a->BS <= 0) {
    return Invalid("num_heads " + std::to_string(a->H) + " is not a multiple of num_kv_heads " +
                   std::to_string(a->Hkv));
  }
  a->group = a->H / a->Hkv;
  a->layer = layer.typed_data()[0];
  if (a->layer < 0 || a->layer >= a->L) {
    return Invalid("layer " + std::to_string(a->layer) + " outside [0, " + std::to_string(a->L) + ")");
  }
  a->q = q.untyped_data();
  a->k = k.untyped_data();
  a->v = v.untyped_data();
  a->out = out->untyped_data();
  a->tables = block_tables.typed_data();
  a->tree_mask = tree_mask.typed_data();
  a->scale = scale;
  return ffi::Error::Success();
}

// What Validate derives from the task table for Run and Merge.
struct Plan {
  const XyjaxTask* rows = nullptr;
  std::vector<std::pair<int64_t, int32_t>> order;  // (cost, index) of each real task; Run sorts it
  std::vector<int32_t> splits;                     // tasks with num_splits > 1, by (q_start, kv_head, split)
  std::vector<size_t> groups;                      // index in splits of each split group's split 0
  std::vector<int64_t> partial_at, lse_at;         // per task: its offsets in partials, -1 when unsplit
  std::vector<uint8_t> covered;                    // [T, Hkv]: the slices some task writes
  int64_t partial_floats = 0, max_rows = 0;
  float* partials = nullptr;                       // KV splits' partials and log-sum-exps (Run sets it)
};

// One real task's fields against the call's shapes. *hi: one past the last position it reads.
ffi::Error CheckTask(const Args& a, int64_t i, const XyjaxTask& t, int64_t* hi) {
  if (t.q_len < 0 || t.q_start < 0 || int64_t{t.q_start} + t.q_len > a.T) {
    return Invalid(TaskText(i, t) + ": query rows outside [0, " + std::to_string(a.T) + ")");
  }
  if (t.seq < 0 || t.seq >= a.S) return Invalid(TaskText(i, t) + ": seq outside [0, " + std::to_string(a.S) + ")");
  if (t.kv_head < 0 || t.kv_head >= a.Hkv) {
    return Invalid(TaskText(i, t) + ": kv_head outside [0, " + std::to_string(a.Hkv) + ")");
  }
  if (t.q_pos < 0 || t.kv_start < 0 || t.kv_end < t.kv_start) {
    return Invalid(TaskText(i, t) + ": negative position or empty-reversed KV range");
  }
  int64_t bound;  // one past the last position a row of the task may see
  if (t.mask_kind == XYJAX_MASK_CAUSAL) {
    bound = int64_t{t.q_pos} + t.q_len;
  } else if (t.mask_kind == XYJAX_MASK_TREE) {
    if (a.MT == 0) {
      return Invalid(TaskText(i, t) +
                     ": a TREE mask task needs a tree mask, but none was given "
                     "(AttentionMetadata.tree_mask is None or has no columns)");
    }
    if (t.mask_base < 0) return Invalid(TaskText(i, t) + ": negative mask_base");
    bound = int64_t{t.mask_base} + a.MT;
  } else {
    return Invalid(TaskText(i, t) + ": unknown mask kind " + std::to_string(t.mask_kind) + " (CAUSAL = 0, TREE = 1)");
  }
  if (t.num_splits < 1 || t.split < 0 || t.split >= t.num_splits) {
    return Invalid(TaskText(i, t) + ": split " + std::to_string(t.split) + " outside [0, num_splits = " +
                   std::to_string(t.num_splits) + ")");
  }
  *hi = std::min<int64_t>(t.kv_end, bound);
  if (*hi > a.P * a.BS) {
    return Invalid(TaskText(i, t) + ": reads position " + std::to_string(*hi - 1) + " beyond the block table's " +
                   std::to_string(a.P * a.BS));
  }
  return ffi::Error::Success();
}

// KV splits: each (q_start, kv_head) with num_splits n > 1 must have exactly the splits 0..n-1, agreeing on
// everything but their KV ranges, which follow each other without gap or overlap and meet at multiples of
// block_size. Places each split's partial [q_len, G, D] and log-sum-exp [q_len, G] in partials.
ffi::Error CheckSplitGroups(const Args& a, Plan* p) {
  const XyjaxTask* rows = p->rows;
  std::vector<int32_t>& splits = p->splits;
  std::sort(splits.begin(), splits.end(), [&](int32_t x, int32_t y) {
    const XyjaxTask &u = rows[x], &w = rows[y];
    if (u.q_start != w.q_start) return u.q_start < w.q_start;
    if (u.kv_head != w.kv_head) return u.kv_head < w.kv_head;
    if (u.split != w.split) return u.split < w.split;
    return x < y;
  });
  auto same_tile = [&](size_t j, const XyjaxTask& first) {
    return j < splits.size() && rows[splits[j]].q_start == first.q_start && rows[splits[j]].kv_head == first.kv_head;
  };
  for (size_t i = 0; i < splits.size();) {
    const XyjaxTask& first = rows[splits[i]];
    const int64_t n = first.num_splits;
    if (first.split != 0) {
      return Invalid(TaskText(splits[i], first) + ": its KV split 0 is missing (no split 0 task of q_start " +
                     std::to_string(first.q_start) + ", kv_head " + std::to_string(first.kv_head) + ")");
    }
    for (int64_t s = 1; s < n; ++s) {
      const size_t j = i + static_cast<size_t>(s);
      if (!same_tile(j, first) || rows[splits[j]].split != s) {
        return Invalid(TaskText(splits[i], first) + ": KV split " + std::to_string(s) + " of " + std::to_string(n) +
                       " is missing or given twice");
      }
      const XyjaxTask &t = rows[splits[j]], &prev = rows[splits[j - 1]];
      if (t.seq != first.seq || t.q_len != first.q_len || t.q_pos != first.q_pos ||
          t.mask_kind != first.mask_kind || t.mask_base != first.mask_base || t.num_splits != n) {
        return Invalid(TaskText(splits[j], t) + " disagrees with its split 0 " + TaskText(splits[i], first) +
                       " (seq, q_len, q_pos, mask_kind, mask_base and num_splits must match)");
      }
      if (t.kv_start != prev.kv_end) {
        return Invalid(TaskText(splits[j], t) + ": KV split " + std::to_string(s) + " starts at " +
                       std::to_string(t.kv_start) + " but split " + std::to_string(s - 1) + " ends at " +
                       std::to_string(prev.kv_end) + " (splits must be contiguous)");
      }
      if (t.kv_start % a.BS != 0) {
        return Invalid(TaskText(splits[j], t) + ": KV split " + std::to_string(s) + " starts at " +
                       std::to_string(t.kv_start) + ", not a multiple of block_size " + std::to_string(a.BS));
      }
    }
    const size_t end = i + static_cast<size_t>(n);
    if (same_tile(end, first)) {
      return Invalid(TaskText(splits[end], rows[splits[end]]) + ": more than num_splits = " + std::to_string(n) +
                     " KV splits of q_start " + std::to_string(first.q_start) + ", kv_head " +
                     std::to_string(first.kv_head));
    }
    p->groups.push_back(i);
    for (size_t j = i; j < end; ++j) {
      p->partial_at[splits[j]] = p->partial_floats;
      p->partial_floats += int64_t{first.q_len} * a.group * a.D;
    }
    for (size_t j = i; j < end; ++j) {
      p->lse_at[splits[j]] = p->partial_floats;
      p->partial_floats += int64_t{first.q_len} * a.group;
    }
    i = end;
  }
  return ffi::Error::Success();
}

// Every real task (a bad table is an error naming the task, not a silent wrong answer), its KV split groups,
// and that no two tasks (or split groups) write the same (row, kv head) slice.
ffi::Error Validate(const Args& a, Matrix32 tasks, Plan* p) {
  const int64_t width = tasks.dimensions()[0];
  p->rows = reinterpret_cast<const XyjaxTask*>(tasks.typed_data());
  p->partial_at.assign(static_cast<size_t>(width), -1);
  p->lse_at.assign(static_cast<size_t>(width), -1);
  for (int64_t i = 0; i < width; ++i) {
    const XyjaxTask& t = p->rows[i];
    if (t.q_len == 0) continue;  // a padding task: the one place it is skipped (nothing else sees it)
    int64_t hi;
    if (ffi::Error e = CheckTask(a, i, t, &hi); e.failure()) return e;
    if (t.num_splits > 1) p->splits.push_back(static_cast<int32_t>(i));
    p->order.emplace_back(int64_t{t.q_len} * (std::max<int64_t>(hi - t.kv_start, 0) + 16), static_cast<int32_t>(i));
    p->max_rows = std::max<int64_t>(p->max_rows, t.q_len);
  }
  if (ffi::Error e = CheckSplitGroups(a, p); e.failure()) return e;
  p->covered.assign(static_cast<size_t>(a.T * a.Hkv), 0);
  for (const auto& entry : p->order) {  // still in table order: the first overlapping task is named
    const int32_t i = entry.second;
    const XyjaxTask& t = p->rows[i];
    if (t.split != 0) continue;  // a split group writes once, through its split 0
    for (int64_t r = t.q_start; r < t.q_start + t.q_len; ++r) {
      uint8_t& c = p->covered[r * a.Hkv + t.kv_head];
      if (c) return Invalid(TaskText(i, t) + ": overlaps another task's rows");
      c = 1;
    }
  }
  return ffi::Error::Success();
}

// Zeroes the slices no task writes, then phase 1: every task on the pool's lanes; an unsplit task writes its
// own rows of out, a KV split its partial and log-sum-exp.
ffi::Error Run(const Args& a, Plan* p) {
  const size_t slice = static_cast<size_t>(a.group * a.D) * (a.q_type == Elem::kF32 ? 4 : 2);
  char* out_bytes = static_cast<char*>(a.out);
  for (int64_t i = 0; i < a.T * a.Hkv; ++i) {
    if (!p->covered[i]) std::memset(out_bytes + i * slice, 0, slice);
  }
  if (p->order.empty()) return ffi::Error::Success();
  // The hand-out order: largest cost first, so the last tasks the lanes pull are the short ones. This is the
  // only place the order is decided; the table's row order does not matter (ties go by q_start, kv_head,
  // split, unique among valid tasks).
  const XyjaxTask* rows = p->rows;
  std::sort(p->order.begin(), p->order.end(), [&](const auto& x, const auto& y) {
    if (x.first != y.first) return x.first > y.first;
    const XyjaxTask &u = rows[x.second], &w = rows[y.second];
    return std::tie(u.q_start, u.kv_head, u.split) < std::tie(w.q_start, w.kv_head, w.split);
  });
  thread_local std::vector<float> partials;  // reused across calls on this thread
  if (static_cast<int64_t>(partials.size()) < p->partial_floats) partials.resize(p->partial_floats);
  p->partials = partials.data();
  const TaskFn kernel = PickKernel();
  const int64_t scratch = ScratchFloats(a, p->max_rows);
  const int64_t count = static_cast<int64_t>(p->order.size());
  std::atomic<int64_t> next{0}, bad{-1};
  auto lane = [&](int) {
    thread_local std::vector<float> buffer;  // each lane's scratch, reused across calls (pool threads persist)
    if (static_cast<int64_t>(buffer.size()) < scratch) buffer.resize(static_cast<size_t>(scratch));
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      const int32_t index = p->order[i].second;
      const bool split = p->partial_at[index] >= 0;
      if (kernel(a, rows[index], buffer.data(), split ? p->partials + p->partial_at[index] : nullptr,
                 split ? p->partials + p->lse_at[index] : nullptr) != 0) {
        int64_t none = -1;
        bad.compare_exchange_strong(none, index);
      }
    }
  };
  ThreadPool& pool = ThreadPool::Shared();
  pool.Run(static_cast<int>(std::min<int64_t>(count, pool.lanes())), lane);
  if (bad.load() >= 0) {
    return Invalid(TaskText(bad.load(), rows[bad.load()]) + ": a block table entry it reads is outside [0, " +
                   std::to_string(a.NB) + ")");
  }
  return ffi::Error::Success();
}

// Phase 2: merges each KV split group's partials into out (MergeSplits), groups in parallel.
void Merge(const Args& a, const Plan& p) {
  if (p.groups.empty()) return;
  const int64_t count = static_cast<int64_t>(p.groups.size());
  std::atomic<int64_t> next{0};
  auto lane = [&](int) {
    std::vector<float> row_buffer(static_cast<size_t>(a.D));
    std::vector<const float*> ps, ls;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      const size_t first = p.groups[i];
      const XyjaxTask& t = p.rows[p.splits[first]];
      ps.clear();
      ls.clear();
      for (int64_t s = 0; s < t.num_splits; ++s) {
        ps.push_back(p.partials + p.partial_at[p.splits[first + s]]);
        ls.push_back(p.partials + p.lse_at[p.splits[first + s]]);
      }
      if (a.q_type == Elem::kF32) {
        MergeSplits<float>(a, t, ps.data(), ls.data(), row_buffer.data());
      } else {
        MergeSplits<uint16_t>(a, t, ps.data(), ls.data(), row_buffer.data());
      }
    }
  };
  ThreadPool& pool = ThreadPool::Shared();
  pool.Run(static_cast<int>(std::min<int64_t>(count, pool.lanes())), lane);
}

ffi::Error MetaAttentionCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, Scalar32 layer,
                            Matrix32 block_tables, Matrix32 tasks, MatrixU8 tree_mask, float scale,
                            ffi::Result<ffi::AnyBuffer> out) {
  Args a{};
  Plan plan;
  if (ffi::Error e = Parse(q, k, v, layer, block_tables, tasks, tree_mask, scale, out, &a); e.failure()) return e;
  if (ffi::Error e = Validate(a, tasks, &plan); e.failure()) return e;
  if (ffi::Error e = Run(a, &plan); e.failure()) return e;
  Merge(a, plan);
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
                                  .Arg<xyjax::attention::MatrixU8>()    // tree_mask
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop

// Lanes the shared pool runs (XYJAX_ATTENTION_THREADS or hardware_concurrency); creates the pool.
extern "C" __attribute__((visibility("default"))) int32_t xyjax_attention_threads(void) {
  return xyjax::ThreadPool::Shared().lanes();
}
