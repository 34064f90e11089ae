// smooth_gemm on the CPU as an XLA FFI custom call (jax.ffi): the "ffi" backend of
// xyjax.ops.smooth_gemm, registered from Python under the name "xyjax_smooth_gemm_cpu" from the
// exported handler symbol XyjaxSmoothGemmCpu.
//
// Operands (see xyjax/ops/gemm/): x [T, K] f32|bf16; w of x's dtype, [K, N] ([N, K] with the
// attribute transpose_w), or a stack [L, K, N] ([L, N, K]) of which layer w[layer] is read in place;
// m s32[] with 0 <= m <= T; layer s32[] (0 for an unstacked w). Result [T, N] in x's dtype: rows < m
// are x @ w (x @ w^T), accumulated in float32; rows >= m are zero and never computed (virtual padding).
//
// The BLAS is not linked: the Python side (ascend_ffi.blas) loads the PyPI package's library and
// hands its row-major cblas_sgemm and bf16 gemm (bf16 inputs, f32 result) to
// xyjax_gemm_set_blas before the first call. The real rows' columns (or, with split_rows, the rows) are
// cut into one block per lane of the shared thread pool (XYJAX_ATTENTION_THREADS lanes; the attribute
// lanes > 0 caps them), each block one single-threaded BLAS call: on 2 cores this measured faster than
// the BLAS's own threads (docs/architecture.md). m_align rounds the rows computed up to a multiple
// (within T; those extra rows are zeroed after): some BLAS kernels are faster on aligned row counts.
// stream_rows: float32 gemms with transpose_w and 1 <= m <= stream_rows run the streaming kernel of
// smooth_gemm_kernel_avx512.cc instead of the BLAS (on CPUs with AVX-512F; elsewhere the BLAS): it reads
// the weights once, in place, where the BLAS packs them first. amx_rows: the float32 transpose_w gemms
// the streaming kernel does not take and with m >= amx_rows > 0 run the AMX kernel of
// smooth_gemm_kernel_amx.cc (on CPUs with AMX-BF16; elsewhere the BLAS): float32-accurate products from
// bfloat16 tiles, x packed once per call by all lanes, then each lane's columns as for the BLAS. The five
// are the tunables `xyjax profile` sweeps per shape and bucket.
//
// quant_block = 32 (0: plain w): w is the split layout of a 4-bit block-quantized matrix (SplitBlocks in
// xyjax/ops/gemm/formats.py), [N, K + K / 32] ([L, N, K + K / 32]) rows [d * q | m] with transpose_w,
// float32, K a multiple of 32: the
// result is x_ext @ w^T for x_ext = [x | the sums of x's 32-column blocks]. w's values are exact in two
// bfloat16 parts, which the AMX kernel relies on (five part products, not six); it sums x's blocks as it packs
// x, the other paths read x_ext built here.
//
// gguf_qtype (0: none): w is a GGUF block-quantized matrix as the file's bytes (xyjax/ops/gemm/formats.py,
// GGUFBlocks), uint8 [N, row_bytes] ([L, N, row_bytes]) with transpose_w, float32 x and gguf_qtype the ggml type
// id of Q8_0 (8), Q4_0 (2), Q4_1 (3) (K a multiple of 32), Q4_K (12) or Q6_K (14) (K a multiple of 256). The block
// kernels read it in place (smooth_gemm_kernel_blocks_*.cc), each weight exactly GGUFBlocks.dense()'s: for m <=
// stream_rows the streaming one (each weight row read once, dequantized in registers, register-blocked over x's
// rows), else each lane dequantizes panels of its weight rows into a cache-sized float32 buffer and runs the BLAS's
// sgemm on it. The copy: the best this CPU runs (AVX-512F, else AVX2 with FMA and F16C, else the portable one), or
// the one the environment variable XYJAX_GEMM_BLOCKS_KERNEL names (generic, avx2, avx512; read once per call, so
// tests can switch; an unknown name or a copy this CPU or build does not run is an InvalidArgument error).
//
// act_quant = 1 (0: none; GGUF blocks only): int8 activations (xyjax/ops/gemm/quant.py, the contract). x's m rows
// are quantized once per call (QuantizeX: per row and 32-input group, d = amax / 127 and q = round_half_even(x / d)
// as int8, bit for bit as quant.quantize_activations), then the int8 kernels (smooth_gemm_kernel_int8_*.cc) multiply
// them with the blocks' integers in place for m <= stream_rows, one block of weight rows per lane; larger m (prefill)
// run the block panels (AMX or the BLAS, as above) on the fake-quantized rows d * q, float32 (faster there than the
// int8 kernels, whose per-group scales cost a float multiply-add per 4 inputs and x row). The copy: AVX-512 VNNI,
// else AVX2, else the portable one, or the one XYJAX_GEMM_INT8_KERNEL names (avx512vnni, avx2, generic; as
// XYJAX_GEMM_BLOCKS_KERNEL).
//
// The handler: Parse (buffers -> Problem), CheckBlasAndTunables, ChooseKernel (the one choice among the five
// kernels: BLAS sgemm, BLAS bf16 gemm, streaming, AMX, AMX tiles; smooth_gemm_kernels.h says which this build
// has), Compute (x prepared once, then one block per lane) and the zeroing of rows >= m.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ffi_util.h"
#include "smooth_gemm_blocks_format.h"
#include "smooth_gemm_kernels.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace xyjax {
namespace gemm {

using Scalar32 = ffi::Buffer<ffi::S32, 0>;

// CBLAS enumerators and the two gemm signatures (ints are 32-bit: LP64 interfaces).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
using Bf16Gemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

namespace {

std::atomic<Sgemm> g_sgemm{nullptr};  // set by xyjax_gemm_set_blas
std::atomic<Bf16Gemm> g_bf16_gemm{nullptr};

// Columns of one lane's block are a multiple of this (a 64-byte line of floats).
constexpr int64_t kColumnAlign = 16;
// The quantization block of the split weight layout (the attribute quant_block): GGUF's 4-bit quants'.
constexpr int64_t kQuantBlock = 32;

// x_ext [m, K + K / kQuantBlock] = [x | the sums of x's kQuantBlock-column blocks] for x [m, K].
void ExtendRows(const float* x, int64_t m, int64_t K, float* x_ext) {
  const int64_t KE = K + K / kQuantBlock;
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * K;
    float* out = x_ext + r * KE;
    std::memcpy(out, row, K * sizeof(float));
    for (int64_t b = 0; b < K / kQuantBlock; ++b) {
      float acc[8] = {};   // eight running sums: a shape the compiler vectorizes
      for (int64_t j = 0; j < kQuantBlock; j += 8) {
        for (int l = 0; l < 8; ++l) acc[l] += row[b * kQuantBlock + j + l];
      }
      out[K + b] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("xyjax_smooth_gemm_cpu: " + what);
}

// One call's checked operands.
struct Problem {
  const void* x;
  const void* w;
  char* out;
  int64_t T, K, KE, N, m, layer;  // KE: w's row length, x_ext's columns (K + K / 32 with quant_block)
  bool bf16, transpose_w, quant, w_tiles;
  int qtype;           // GGUF blocks: the ggml type id (0: none)
  int64_t row_bytes;   // GGUF blocks: bytes of one weight row
  bool int8;           // GGUF blocks: int8 activations (act_quant = 1)
};

// The handler's tunables (attributes), as `xyjax profile` sweeps them.
struct Tunables {
  int32_t lanes, m_align, stream_rows, amx_rows;
  bool split_rows;
};

// The gemm kernels; ChooseKernel picks one per call.
enum class GemmKernel {
  kSgemm, kBf16Gemm, kStream, kAmx, kAmxTiles, kBlocksStream, kBlocksPanel, kBlocksAmx, kInt8
};

// Buffers -> Problem, with the shape and dtype checks.
ffi::Error Parse(ffi::AnyBuffer x, ffi::AnyBuffer w, Scalar32 m_buffer, Scalar32 layer_buffer, bool transpose_w,
                 int32_t quant_block, bool w_tiles, int32_t gguf_qtype, int32_t act_quant,
                 ffi::Result<ffi::AnyBuffer>& out, Problem* p) {
  const ffi::DataType type = x.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16) return Invalid("x must be float32 or bfloat16");
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0]) {
    return Invalid("x must be [T, K] and the result [T, N], got x " + Dims(xd) + " and " + Dims(od));
  }
  const int64_t T = xd[0], K = xd[1];
  if (act_quant != 0 && (act_quant != 1 || gguf_qtype == 0)) {
    return Invalid("act_quant = " + std::to_string(act_quant) + ": 1 (int8 activations) takes GGUF blocks only, " +
                   "0 none");
  }
  if (quant_block != 0 &&
      (quant_block != kQuantBlock || !transpose_w || type != ffi::DataType::F32 || K % kQuantBlock)) {
    return Invalid("quant_block = " + std::to_string(quant_block) + " needs quant_block = 32, transpose_w, " +
                   "float32 and K = " + std::to_string(K) + " a multiple of 32");
  }
  const int64_t KE = quant_block ? K + K / kQuantBlock : K;
  int64_t L = 1, N = od[1], row_bytes = 0;
  if (gguf_qtype != 0) {   // GGUF blocks [(L,) N, row_bytes] uint8
    const blocks::Format f = blocks::FormatOf(gguf_qtype);
    if (f.bytes == 0) {
      std::string supported;
      for (const blocks::Format& g : blocks::kFormats) {
        supported += (supported.empty() ? "" : ", ") + std::string(g.name) + " (" + std::to_string(g.qtype) + ")";
      }
      return Invalid("gguf_qtype " + std::to_string(gguf_qtype) + " is not read here; supported: " + supported);
    }
    if (type != ffi::DataType::F32 || out->element_type() != type || w.element_type() != ffi::DataType::U8 ||
        !transpose_w || quant_block != 0 || w_tiles) {
      return Invalid("GGUF blocks need float32 x and result, uint8 w, transpose_w and no other weight format");
    }
    if (K % f.inputs) {
      return Invalid(std::string("GGUF blocks of ") + f.name + " need K a multiple of " + std::to_string(f.inputs) +
                     ", got K = " + std::to_string(K));
    }
    row_bytes = K / f.inputs * f.bytes;
    if ((wd.size() != 2 && wd.size() != 3) || wd[wd.size() - 2] != N || wd[wd.size() - 1] != row_bytes) {
      return Invalid("GGUF blocks for N = " + std::to_string(N) + " rows of K = " + std::to_string(K) +
                     " must be [(L,) " + std::to_string(N) + ", " + std::to_string(row_bytes) + "], got " + Dims(wd));
    }
    if (wd.size() == 3) L = wd[0];
  } else if (w_tiles) {   // [(L,) 16 ceil(N / 16), ceil(KE / 32), 2, 32] bfloat16: N is the result's
    const size_t r = wd.size();
    if (type != ffi::DataType::F32 || out->element_type() != type || w.element_type() != ffi::DataType::BF16 ||
        !transpose_w) {
      return Invalid("tile weights need float32 x and result, bfloat16 tiles and transpose_w");
    }
    if ((r != 4 && r != 5) || wd[r - 4] != (N + 15) / 16 * 16 || wd[r - 3] != (KE + 31) / 32 || wd[r - 2] != 2 ||
        wd[r - 1] != 32) {
      return Invalid("tile weights for N = " + std::to_string(N) + " rows of " + std::to_string(KE) +
                     " must be [(L,) " + std::to_string((N + 15) / 16 * 16) + ", " + std::to_string((KE + 31) / 32) +
                     ", 2, 32], got " + Dims(wd));
    }
    if (r == 5) L = wd[0];
    if (!AmxReady()) return Invalid("tile weights need the AMX kernel (a CPU with AMX-BF16)");
  } else {
    if (w.element_type() != type || out->element_type() != type) {
      return Invalid("w and the result must have x's dtype");
    }
    if (wd.size() != 2 && wd.size() != 3) {
      return Invalid("w must be [K, N] or [L, K, N], got " + Dims(wd));
    }
    const int64_t rows = wd[wd.size() - 2], cols = wd[wd.size() - 1];
    if (wd.size() == 3) L = wd[0];
    if ((transpose_w ? cols : rows) != KE || (transpose_w ? rows : cols) != N) {
      return Invalid("x " + Dims(xd) + ", w " + Dims(wd) + (transpose_w ? " (transposed)" : "") + " and the result " +
                     Dims(od) + (quant_block ? " do not chain: w's rows must hold K + K / 32" : " do not chain"));
    }
  }
  if (std::max({T, KE, N}) > INT32_MAX) return Invalid("dimensions beyond the BLAS's 32-bit ints");
  const int64_t m = m_buffer.typed_data()[0];
  if (m < 0 || m > T) {
    return Invalid("m = " + std::to_string(m) + " outside [0, T = " + std::to_string(T) + "]");
  }
  const int64_t layer = layer_buffer.typed_data()[0];
  if (layer < 0 || layer >= L) {
    return Invalid("layer " + std::to_string(layer) + " outside [0, " + std::to_string(L) + ")");
  }
  *p = Problem{x.untyped_data(), w.untyped_data(), static_cast<char*>(out->untyped_data()), T, K, KE, N, m, layer,
               type == ffi::DataType::BF16, transpose_w, quant_block != 0, w_tiles, gguf_qtype, row_bytes,
               act_quant == 1};
  return ffi::Error::Success();
}

// That the BLAS the call needs is loaded and the tunables are in range.
ffi::Error CheckBlasAndTunables(const Problem& p, const Tunables& t) {
  if (g_sgemm.load() == nullptr) {
    return ffi::Error::Internal("xyjax_smooth_gemm_cpu: no BLAS loaded (ascend_ffi.blas.load() hands it over)");
  }
  if (p.bf16 && g_bf16_gemm.load() == nullptr) return Invalid("the loaded BLAS has no bfloat16 gemm");
  if (t.lanes < 0 || t.m_align < 1 || t.stream_rows < 0 || t.amx_rows < 0) {
    return Invalid("lanes, stream_rows and amx_rows must be >= 0 and m_align >= 1, got " + std::to_string(t.lanes) +
                   ", " + std::to_string(t.stream_rows) + ", " + std::to_string(t.amx_rows) + " and " +
                   std::to_string(t.m_align));
  }
  return ffi::Error::Success();
}

// The one choice of kernel. GGUF blocks with int8 activations: the int8 kernel for m <= stream_rows, else (x
// fake-quantized first) the block panels below. GGUF blocks: the block streaming kernel for m <= stream_rows, else the block panels,
// multiplied by the AMX kernel for m >= amx_rows > 0 where this CPU runs it, else by the BLAS.
// Tile weights: the AMX tile kernel. bfloat16: the BLAS's bf16 gemm. float32 with
// transpose_w: the streaming kernel for m <= stream_rows, else the AMX kernel for m >= amx_rows > 0, where this
// CPU runs them. Everything else: the BLAS's sgemm.
GemmKernel ChooseKernel(const Problem& p, const Tunables& t) {
  static const bool stream_runs = StreamKernelRuns(), amx_runs = AmxReady();
  if (p.int8 && p.m <= t.stream_rows) return GemmKernel::kInt8;
  if (p.qtype != 0 && p.m <= t.stream_rows) return GemmKernel::kBlocksStream;
  if (p.qtype != 0) return amx_runs && t.amx_rows > 0 && p.m >= t.amx_rows ? GemmKernel::kBlocksAmx
                                                                          : GemmKernel::kBlocksPanel;
  if (p.w_tiles) return GemmKernel::kAmxTiles;
  if (p.bf16) return GemmKernel::kBf16Gemm;
  if (p.transpose_w && stream_runs && p.m <= t.stream_rows) return GemmKernel::kStream;
  if (p.transpose_w && amx_runs && t.amx_rows > 0 && p.m >= t.amx_rows) return GemmKernel::kAmx;
  return GemmKernel::kSgemm;
}

// A copy of the block kernels (smooth_gemm_kernels.h): its XYJAX_GEMM_BLOCKS_KERNEL name, whether this CPU and build
// run it, its streaming gemm and its panel dequantization.
struct BlocksCopy {
  const char* name;
  bool (*runs)();
  void (*gemm)(int, int64_t, int64_t, int64_t, const float*, int64_t, const uint8_t*, float*, int64_t);
  void (*dequant)(int, int64_t, int64_t, const uint8_t*, float*);
};
constexpr BlocksCopy kBlocksCopies[] = {   // best first
    {"avx512", BlocksAvx512Runs, BlocksGemmAvx512, BlocksDequantAvx512},
    {"avx2", BlocksAvx2Runs, BlocksGemmAvx2, BlocksDequantAvx2},
    {"generic", BlocksGenericRuns, BlocksGemmGeneric, BlocksDequantGeneric},
};

// A copy of the int8 kernels (smooth_gemm_kernels.h): its XYJAX_GEMM_INT8_KERNEL name, whether this CPU and build
// run it, its gemm.
struct Int8Copy {
  const char* name;
  bool (*runs)();
  void (*gemm)(int, int64_t, int64_t, const QuantRows&, const uint8_t*, float*, int64_t);
};
constexpr Int8Copy kInt8Copies[] = {   // best first
    {"avx512vnni", Int8Avx512VnniRuns, Int8GemmAvx512Vnni},
    {"avx2", Int8Avx2Runs, Int8GemmAvx2},
    {"generic", Int8GenericRuns, Int8GemmGeneric},
};

// The names of the copies (of a table, best first) this CPU and build run, best first, comma-separated.
template <typename Copy, size_t kCount>
std::string CopiesRun(const Copy (&copies)[kCount]) {
  std::string names;
  for (const Copy& c : copies) {
    if (c.runs()) names += (names.empty() ? "" : ",") + std::string(c.name);
  }
  return names;
}

// The copy of a kernel family (what: "block kernels", "int8 kernels") this call runs: the one the environment
// variable env names (read here, once per call), else (unset or empty) the best this CPU runs. An unknown name, or a
// copy this CPU or build does not run, is an error naming the copies that run.
template <typename Copy, size_t kCount>
ffi::Error ChooseCopy(const char* env, const char* what, const Copy (&copies)[kCount], const Copy** chosen) {
  const char* value = std::getenv(env);
  const std::string forced = value == nullptr ? "" : value;
  for (const Copy& c : copies) {
    if (forced.empty() ? c.runs() : forced == c.name) {
      if (!c.runs()) {
        return Invalid(std::string(env) + "=" + forced + ": this CPU or build does not run that copy of the " + what +
                       "; it runs " + CopiesRun(copies));
      }
      *chosen = &c;
      return ffi::Error::Success();
    }
  }
  std::string all;   // worst first
  for (size_t i = kCount; i-- > 0;) all += std::string(all.empty() ? "" : ", ") + copies[i].name;
  return Invalid(std::string(env) + "=" + forced + " names no copy of the " + what + " (" + all +
                 "; unset: the best this CPU runs, of " + CopiesRun(copies) + ")");
}

// Rounds v (|v| < 2^22) to the nearest integer, ties to even, as jnp.round: the sum with 1.5 * 2^23 is rounded to
// an integer by the IEEE default rounding (the compiler keeps the two adds: no -ffast-math), the difference exact.
inline float RoundHalfEven(float v) { return (v + 12582912.0f) - 12582912.0f; }

// One row x [K] quantized (quant.py's contract, bit for bit, for finite x; smooth_gemm_int8.h): per group, amax,
// d = amax / 127 and id = 1 / d by float32 division, q [K] = RoundHalfEven(x * id); d and dsum [K / 32], sum4 [K / 4].
void QuantizeRow(const float* x, int64_t K, int8_t* q, float* d, float* dsum, int32_t* sum4) {
  for (int64_t g = 0; g < K / kActGroup; ++g) {
    const float* xg = x + g * kActGroup;
    int8_t* qg = q + g * kActGroup;
    float amax = 0.0f;
    for (int k = 0; k < kActGroup; ++k) amax = std::max(amax, std::fabs(xg[k]));
    const float dg = amax / 127.0f, id = dg != 0.0f ? 1.0f / dg : 0.0f;
    for (int k = 0; k < kActGroup; ++k) qg[k] = static_cast<int8_t>(RoundHalfEven(xg[k] * id));
    int32_t sum = 0;
    for (int l = 0; l < kActGroup / kActLane; ++l) {
      const int8_t* ql = qg + kActLane * l;
      sum4[g * kActGroup / kActLane + l] = ql[0] + ql[1] + ql[2] + ql[3];
      sum += ql[0] + ql[1] + ql[2] + ql[3];
    }
    d[g] = dg;
    dsum[g] = dg * static_cast<float>(sum);
  }
}

// Rows [0, mc) of x quantized (smooth_gemm_int8.h) into this thread's buffers, the rows cut over the lanes from 16
// rows (below, one lane: a pool pass costs more than the work).
QuantRows QuantizeX(const Problem& p, int64_t mc, int64_t lanes) {
  const int64_t K = p.K, groups = K / kActGroup;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;   // d [mc, groups] then dsum [mc, groups]
  thread_local std::vector<int32_t> sum4;
  q.resize(mc * K);
  scales.resize(2 * mc * groups);
  sum4.resize(mc * (K / kActLane));
  // this thread's buffers by pointer: a thread_local named in the lambda would be each lane's own
  int8_t* qx = q.data();
  float *d = scales.data(), *dsum = d + mc * groups;
  int32_t* s4 = sum4.data();
  const float* x = static_cast<const float*>(p.x);
  const int64_t parts = mc >= 16 ? lanes : 1, per_part = (mc + parts - 1) / parts;
  ThreadPool::Shared().Run(static_cast<int>(parts), [&](int i) {
    for (int64_t t = i * per_part; t < std::min(mc, (i + 1) * per_part); ++t) {
      QuantizeRow(x + t * K, K, qx + t * K, d + t * groups, dsum + t * groups, s4 + t * (K / kActLane));
    }
  });
  return QuantRows{qx, d, dsum, s4, K};
}

// Weight rows per panel of the block panel kernels: about 1 MiB of float32 rows of K (in L2), a multiple of 16:
// enough rows that the passes over x (AMX; the BLAS packs x per call) cost little beside the multiply.
int64_t PanelRows(int64_t K) { return std::max<int64_t>(16, ((1 << 20) / 4 / std::max<int64_t>(K, 1)) / 16 * 16); }

// AMX: x's rows [0, mc) as bfloat16 tiles, 16 rows per block, packed by all lanes before any lane multiplies;
// with sums each row followed by its 32-column block sums (the split layout's x_ext).
const uint8_t* PackX(const Problem& p, int64_t mc, int64_t lanes, bool sums) {
  struct alignas(64) Line {
    uint8_t bytes[64];
  };
  thread_local std::vector<Line> packed;  // cache-line aligned: a tile row across two lines loads slower
  packed.resize((AmxPackedBytes(mc, AmxPackedK(p.K, sums)) + 63) / 64);
  uint8_t* dst = reinterpret_cast<uint8_t*>(packed.data());
  const int64_t row_blocks = (mc + 15) / 16, per_lane = (row_blocks + lanes - 1) / lanes;
  ThreadPool::Shared().Run(static_cast<int>(std::min(lanes, row_blocks)), [&](int i) {
    AmxPackX(mc, p.K, sums, static_cast<const float*>(p.x), p.K, i * per_lane,
             std::min(row_blocks, (i + 1) * per_lane), dst);
  });
  return dst;
}

// float32 x as the streaming kernel and the BLAS read it: x_ext for the split layout, built on this thread (with
// AMX these are the small-m gemms, for which a pool pass costs more than the copy), else x itself.
const float* RowsOfX(const Problem& p, int64_t mc) {
  if (!p.quant) return static_cast<const float*>(p.x);
  thread_local std::vector<float> x_ext;
  x_ext.resize(mc * p.KE);
  ExtendRows(static_cast<const float*>(p.x), mc, p.K, x_ext.data());
  return x_ext.data();
}

// Int8 activations on the block panels: x's rows [0, mc) as the int8 mode sees them, float32 d * q (exactly
// quant.fake_quantize's values: one rounding), in this thread's buffer.
const float* FakeQuantizeX(const Problem& p, int64_t mc, int64_t lanes) {
  const QuantRows q = QuantizeX(p, mc, lanes);
  thread_local std::vector<float> x;
  x.resize(mc * p.K);
  for (int64_t i = 0; i < mc * p.K; ++i) x[i] = static_cast<float>(q.q[i]) * q.d[i / kActGroup];
  return x.data();
}

// Rows [0, mc) of the result, in blocks of whole rows (split_rows; not with AMX, whose packed x is shared) or of
// kColumnAlign-aligned columns, one block per lane, each one single-threaded call of the kernel.
// copy, int8: the copy of the block kernels (GGUF blocks), of the int8 kernels (int8 activations).
void Compute(const Problem& p, const Tunables& t, GemmKernel kernel, const BlocksCopy* copy, const Int8Copy* int8,
             int64_t mc) {
  const int64_t N = p.N, KE = p.KE;
  const bool amx =
      kernel == GemmKernel::kAmx || kernel == GemmKernel::kAmxTiles || kernel == GemmKernel::kBlocksAmx;
  // float32: straight into the result. bfloat16: into float scratch, rounded once per lane's block.
  thread_local std::vector<float> scratch;  // reused across calls on this thread
  if (p.bf16 && scratch.size() < static_cast<size_t>(mc * N)) scratch.resize(mc * N);
  float* c = p.bf16 ? scratch.data() : reinterpret_cast<float*>(p.out);
  ThreadPool& pool = ThreadPool::Shared();
  const int64_t lanes = t.lanes == 0 ? pool.lanes() : std::min<int64_t>(t.lanes, pool.lanes());
  const bool split_panels = kernel == GemmKernel::kBlocksAmx && p.qtype == blocks::kQ4_1;
  const uint8_t* xb = amx ? PackX(p, mc, lanes, p.quant || split_panels) : nullptr;
  const float* x32 = amx || p.bf16 || p.int8 ? nullptr : RowsOfX(p, mc);
  const QuantRows xq = p.int8 ? QuantizeX(p, mc, lanes) : QuantRows{};
  const bool by_rows = t.split_rows && !amx;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(lanes, by_rows ? mc : N / kColumnAlign));
  const int64_t width = by_rows ? (mc + blocks - 1) / blocks
                                : ((N + blocks - 1) / blocks + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  const Sgemm sgemm = g_sgemm.load();
  const Bf16Gemm bf16_gemm = g_bf16_gemm.load();
  const int trans_b = p.transpose_w ? kTrans : kNoTrans;
  const int ldb = static_cast<int>(p.transpose_w ? KE : N);
  auto lane = [&](int i) {
    const int64_t r0 = by_rows ? i * width : 0, nr = by_rows ? std::min(mc, r0 + width) - r0 : mc;
    const int64_t n0 = by_rows ? 0 : i * width, n = by_rows ? N : std::min(N, n0 + width) - n0;
    if (n <= 0 || nr <= 0) return;
    const int64_t w_offset = p.layer * KE * N + (p.transpose_w ? n0 * KE : n0);  // w[layer]'s column n0
    float* c_block = c + r0 * N + n0;
    switch (kernel) {
      case GemmKernel::kAmxTiles:   // TileWeights' row n0
        AmxGemmTiles(nr, n, KE, xb,
                     static_cast<const uint8_t*>(p.w) + (p.layer * ((N + 15) / 16 * 16) + n0) * ((KE + 31) / 32 * 128),
                     c_block, N);
        break;
      case GemmKernel::kAmx:
        AmxGemm(nr, n, KE, p.quant ? 2 : 3, xb, static_cast<const float*>(p.w) + w_offset, c_block, N);
        break;
      case GemmKernel::kBlocksStream: {
        const uint8_t* wb = static_cast<const uint8_t*>(p.w) + (p.layer * N + n0) * p.row_bytes;
        copy->gemm(p.qtype, nr, n, p.K, x32 + r0 * p.K, p.K, wb, c_block, N);
        break;
      }
      case GemmKernel::kInt8: {
        const uint8_t* wb = static_cast<const uint8_t*>(p.w) + (p.layer * N + n0) * p.row_bytes;
        const int64_t g = p.K / kActGroup;
        const QuantRows rows{xq.q + r0 * p.K, xq.d + r0 * g, xq.dsum + r0 * g, xq.sum4 + r0 * (p.K / kActLane), p.K};
        int8->gemm(p.qtype, nr, n, rows, wb, c_block, N);
        break;
      }
      case GemmKernel::kBlocksPanel:   // panels of dequantized weight rows, each multiplied by the BLAS or AMX
      case GemmKernel::kBlocksAmx: {   // (Q4_1: the split layout [d * q | m], two exact bfloat16 parts)
        const uint8_t* wb = static_cast<const uint8_t*>(p.w) + (p.layer * N + n0) * p.row_bytes;
        const int64_t width = split_panels ? p.K + p.K / blocks::BlockInputs(blocks::kQ4_1) : p.K;
        const int64_t rows = std::min(n, PanelRows(width));
        thread_local std::vector<float> panel;
        panel.resize(rows * width);
        for (int64_t j = 0; j < n; j += rows) {
          const int64_t nj = std::min(rows, n - j);
          if (split_panels) {
            BlocksSplitAvx512(nj, p.K, wb + j * p.row_bytes, panel.data());
          } else {
            copy->dequant(p.qtype, nj, p.K, wb + j * p.row_bytes, panel.data());
          }
          if (kernel == GemmKernel::kBlocksAmx) {
            AmxGemm(nr, nj, width, split_panels ? 2 : 3, xb, panel.data(), c_block + j, N);
          } else {
            sgemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(nr), static_cast<int>(nj), static_cast<int>(p.K), 1.0f,
                  x32 + r0 * p.K, static_cast<int>(p.K), panel.data(), static_cast<int>(p.K), 0.0f, c_block + j,
                  static_cast<int>(N));
          }
        }
        break;
      }
      case GemmKernel::kStream:
        StreamGemmAvx512(nr, n, KE, x32 + r0 * KE, KE, static_cast<const float*>(p.w) + w_offset, c_block, N);
        break;
      case GemmKernel::kBf16Gemm: {
        bf16_gemm(kRowMajor, kNoTrans, trans_b, static_cast<int>(nr), static_cast<int>(n), static_cast<int>(p.K), 1.0f,
                  static_cast<const uint16_t*>(p.x) + r0 * p.K, static_cast<int>(p.K),
                  static_cast<const uint16_t*>(p.w) + w_offset, ldb, 0.0f, c_block, static_cast<int>(N));
        uint16_t* dst = reinterpret_cast<uint16_t*>(p.out);
        for (int64_t r = r0; r < r0 + nr; ++r) {
          for (int64_t j = n0; j < n0 + n; ++j) dst[r * N + j] = FloatToBf16(c[r * N + j]);
        }
        break;
      }
      case GemmKernel::kSgemm:
        sgemm(kRowMajor, kNoTrans, trans_b, static_cast<int>(nr), static_cast<int>(n), static_cast<int>(KE), 1.0f,
              x32 + r0 * KE, static_cast<int>(KE), static_cast<const float*>(p.w) + w_offset, ldb, 0.0f, c_block,
              static_cast<int>(N));
        break;
    }
  };
  pool.Run(static_cast<int>(blocks), lane);
}

ffi::Error SmoothGemmCpu(ffi::AnyBuffer x, ffi::AnyBuffer w, Scalar32 m_buffer, Scalar32 layer_buffer,
                         bool transpose_w, int32_t lanes_attr, bool split_rows, int32_t m_align, int32_t stream_rows,
                         int32_t amx_rows, int32_t quant_block, bool w_tiles, int32_t gguf_qtype,
                         int32_t act_quant, ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  const Tunables t{lanes_attr, m_align, stream_rows, amx_rows, split_rows};
  if (ffi::Error e =
          Parse(x, w, m_buffer, layer_buffer, transpose_w, quant_block, w_tiles, gguf_qtype, act_quant, out, &p);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckBlasAndTunables(p, t); e.failure()) return e;
  const GemmKernel kernel = ChooseKernel(p, t);
  const BlocksCopy* copy = nullptr;
  const Int8Copy* int8 = nullptr;
  if (kernel == GemmKernel::kInt8) {
    if (ffi::Error e = ChooseCopy("XYJAX_GEMM_INT8_KERNEL", "int8 kernels", kInt8Copies, &int8); e.failure()) return e;
  } else if (p.qtype != 0) {
    if (ffi::Error e = ChooseCopy("XYJAX_GEMM_BLOCKS_KERNEL", "block kernels", kBlocksCopies, &copy); e.failure()) {
      return e;
    }
  }
  // Rows computed: m, rounded up to m_align (within T) for the BLAS, some of whose kernels are faster on
  // aligned row counts; the extra rows are zeroed again below.
  const bool blas = kernel == GemmKernel::kSgemm || kernel == GemmKernel::kBf16Gemm;
  const int64_t mc = p.m == 0 || !blas ? p.m : std::min<int64_t>(p.T, (p.m + m_align - 1) / m_align * m_align);
  if (mc > 0 && p.N > 0 && p.int8 && kernel != GemmKernel::kInt8) {   // the block panels on fake-quantized x
    Problem fq = p;
    const int64_t pool_lanes = ThreadPool::Shared().lanes();
    fq.x = FakeQuantizeX(p, mc, t.lanes == 0 ? pool_lanes : std::min<int64_t>(t.lanes, pool_lanes));
    fq.int8 = false;
    Compute(fq, t, kernel, copy, int8, mc);
  } else if (mc > 0 && p.N > 0) {
    Compute(p, t, kernel, copy, int8, mc);
  }
  const size_t elem = p.bf16 ? 2 : 4;
  std::memset(p.out + p.m * p.N * elem, 0, (p.T - p.m) * p.N * elem);   // rows >= m
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gemm
}  // namespace xyjax

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(XyjaxSmoothGemmCpu, xyjax::gemm::SmoothGemmCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()             // x
                                  .Arg<ffi::AnyBuffer>()             // w
                                  .Arg<xyjax::gemm::Scalar32>()      // m
                                  .Arg<xyjax::gemm::Scalar32>()      // layer
                                  .Attr<bool>("transpose_w")
                                  .Attr<int32_t>("lanes")
                                  .Attr<bool>("split_rows")
                                  .Attr<int32_t>("m_align")
                                  .Attr<int32_t>("stream_rows")
                                  .Attr<int32_t>("amx_rows")
                                  .Attr<int32_t>("quant_block")
                                  .Attr<bool>("w_tiles")
                                  .Attr<int32_t>("gguf_qtype")
                                  .Attr<int32_t>("act_quant")
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop

// The BLAS entry points the handler calls (from ascend_ffi.blas): row-major cblas_sgemm (required)
// and a bf16 x bf16 -> f32 gemm of the same signature (NULL: bfloat16 is rejected). Each must be
// single-threaded: the handler runs them on its own pool's lanes.
extern "C" __attribute__((visibility("default"))) void xyjax_gemm_set_blas(void* sgemm, void* bf16_gemm) {
  xyjax::gemm::g_bf16_gemm.store(reinterpret_cast<xyjax::gemm::Bf16Gemm>(bf16_gemm));
  xyjax::gemm::g_sgemm.store(reinterpret_cast<xyjax::gemm::Sgemm>(sgemm));
}

// The copies of the block kernels this CPU and build run, best first, comma-separated ("avx512,avx2,generic"):
// the values XYJAX_GEMM_BLOCKS_KERNEL takes here.
extern "C" __attribute__((visibility("default"))) const char* xyjax_gemm_blocks_copies(void) {
  static const std::string names = xyjax::gemm::CopiesRun(xyjax::gemm::kBlocksCopies);
  return names.c_str();
}

// The copies of the int8 kernels this CPU and build run, best first, comma-separated ("avx512vnni,avx2,generic"):
// the values XYJAX_GEMM_INT8_KERNEL takes here.
extern "C" __attribute__((visibility("default"))) const char* xyjax_gemm_int8_copies(void) {
  static const std::string names = xyjax::gemm::CopiesRun(xyjax::gemm::kInt8Copies);
  return names.c_str();
}

// 1 where the handler runs its AMX kernel (amx_rows > 0 has an effect), else 0.
extern "C" __attribute__((visibility("default"))) int32_t xyjax_gemm_amx(void) {
  return xyjax::gemm::AmxReady() ? 1 : 0;
}
