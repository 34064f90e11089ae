// The AMX gemm of smooth_gemm_cpu.cc, for CPUs with AMX-BF16 and AVX512-BF16 (CMake adds -mamx-tile
// -mamx-bf16 -mavx512f -mavx512bw -mavx512bf16 to this file only): c [m, n] = x [m, K] @ w [n, K]^T in
// float32, with the weights stored as the rows of the outputs (the model's dense layers, a tied LM head).
//
// float32 accuracy from bfloat16 tiles (the "bf16x6" scheme of XLA's Precision.HIGHEST on TPUs): each
// float32 is split into three bfloat16 parts, v = v0 + v1 + v2 (v0 = bf16(v), v1 = bf16(v - v0), ...:
// 24 significant bits in all), and x @ w^T is the sum of the six part products whose order is at most
// two, x0w0 + x1w0 + x2w0 + x0w1 + x1w1 + x0w2. The three dropped ones are below 2^-24 of |x||w|, the
// products of bfloat16 pairs are exact in float32 and the tiles accumulate in float32, so the result is
// as close to the exact one as a float32 gemm's. Six tile products per output cost 6/16 of what AVX-512
// FMAs would (a TDPBF16PS does 16x16x32 multiply-adds in 16 cycles), hence ~2.7x a float32 core's peak.
// Weights already exact in two parts (w_parts = 2: the split Q4_1 layout, d * q and the float16 block
// minimums, see xyjax/ops/gemm/formats.py) drop x0w2: five products and 12 tile loads per K step instead of 14.
//
// Layout: every tile is 1 KiB, 16 rows of 64 bytes. The weights are the A operand: 16 weight rows x 32
// bf16 along K, converted from float32 as they are read (no transposes; Gemm below says how many rows at a
// time). x is the B operand, packed once per call by AmxPackX into the VNNI form the tile unit wants: tile
// row r holds, for each of 16 x rows, the pair (x[., k0 + 2r], x[., k0 + 2r + 1]). A 2 x 2 block of
// accumulator tiles (32 weight rows x 32 x rows) runs along K; its [n, m] result is transposed into c.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace xyjax {
namespace gemm {
namespace {

constexpr int64_t kTileK = 32;        // bf16 per tile row: the K step
constexpr int64_t kTileBytes = 1024;  // 16 rows x 64 bytes
constexpr int64_t kFloatBytes = 4;
constexpr int kParts = 3;             // bf16 parts per float32 (of x; of w unless w_parts = 2)
constexpr int64_t kSuperBytes = 864 << 10;  // converted weight rows reused across x chunks (in L2 with a chunk)
constexpr int64_t kChunkBytes = 768 << 10;  // packed x rows multiplied per pass over a superblock (in L2)

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The first P bf16 parts of 32 floats at src (lanes past `valid` read as 0), each 32 bf16 in one vector;
// their sum into *sum where given.
template <int P>
inline void Split32(const float* src, int64_t valid, __m512i parts[P], float* sum = nullptr) {
  const __mmask16 lo = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(valid, 0)) - 1);
  const __mmask16 hi = valid >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(valid - 16, 0)) - 1);
  __m512 a = _mm512_maskz_loadu_ps(lo, src), b = _mm512_maskz_loadu_ps(hi, src + 16);
  if (sum != nullptr) *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  for (int p = 0; p < P; ++p) {
    const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));   // a's 16 first, then b's
    parts[p] = h;
    // a - float(bf16(a)) is exact: the next part rounds what this one left.
    a = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(
                             _mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16)));
    b = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_slli_epi32(
                             _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16)));
  }
}

// r[j] = column j of the 16 x 16 matrix of 32-bit words whose rows are r[0..15].
inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q) {   // u[4q + c], lane L: column 4L + c of rows 4q .. 4q + 3
    u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i wlo = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), whi = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i ylo = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i yhi = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(wlo, ylo, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(wlo, ylo, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(whi, yhi, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(whi, yhi, 0xDD);
  }
}

// Rows [n0, n0 + 16 * row_blocks) of w [n, K] as A tiles in WP parts: dst[((b * KS + ks) * WP + p) tiles],
// rows past n zero.
template <int WP>
void PackWeights(const float* w, int64_t n, int64_t K, int64_t n0, int64_t row_blocks, uint8_t* dst) {
  const int64_t KS = (K + kTileK - 1) / kTileK;
  for (int64_t b = 0; b < row_blocks; ++b) {
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t row = n0 + b * 16 + i;
      for (int64_t ks = 0; ks < KS; ++ks) {
        __m512i parts[WP];
        Split32<WP>(row < n ? w + row * K + ks * kTileK : w, row < n ? K - ks * kTileK : 0, parts);
        for (int p = 0; p < WP; ++p) {
          _mm512_storeu_si512(dst + ((b * KS + ks) * WP + p) * kTileBytes + i * 64, parts[p]);
        }
      }
    }
  }
}

// The weights a Block pulls into the cache alongside its K steps (those multiplied next): at K step ks, `lines`
// 64-byte lines from base + r * stride + ks * step for each r < runs (runs = 0: none).
struct Prefetch {
  const char* base;
  int64_t runs, lines, stride, step;
};

// Where the weights' A tiles are: part p of 16-row block nb at K step ks is the tile of 16 rows `stride` bytes
// apart from base + nb * next + ks * step + p * part (packed here: contiguous 1 KiB tiles; TileWeights: rows
// of [KS, 2, 32] bfloat16).
struct ATiles {
  const uint8_t* base;
  int64_t next, step, part, stride;
  ATiles Block(int64_t nb) const { return {base + nb * next, next, step, part, stride}; }
};

// Accumulates the (NT x 16 weight rows) x (MT x 16 x rows) block along K and writes it, transposed, into
// c rows [0, m_valid) x columns [0, n_valid). a: the block's weight tiles; b: its first x (B) tiles, the next
// 16 rows' b_next bytes further. WP: the weights' parts (x always has three).
template <int NT, int MT, int WP>
void Block(const ATiles& a, const uint8_t* b, int64_t b_next, int64_t KS, float* c, int64_t ldc,
           int64_t n_valid, int64_t m_valid, const Prefetch& pf) {
  _tile_zero(0);
  if constexpr (MT == 2) _tile_zero(1);
  if constexpr (NT == 2) _tile_zero(2);
  if constexpr (NT == 2 && MT == 2) _tile_zero(3);
  // Tiles 4/5 hold a weight part, 6/7 an x part. A tile load costs about three TDPBF16PS here and tiles
  // are not renamed, so the six part products of a K step go in the order that reloads the fewest
  // tiles, 14 rather than 18: (w0 x2) (w0 x1) (w0 x0) (w2 x0) (w1 x0) (w1 x1). Before a weight reload
  // tile 4's products go first, before an x reload tile 6's, so the reload waits on the fewest products.
  auto tile4_first = [&] {
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NT == 2 && MT == 2) _tile_dpbf16ps(3, 5, 7);
  };
  auto tile6_first = [&] {
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NT == 2 && MT == 2) _tile_dpbf16ps(3, 5, 7);
  };
  auto load_a = [&](const uint8_t* ak, int part) {
    _tile_loadd(4, ak + part * a.part, a.stride);
    if constexpr (NT == 2) _tile_loadd(5, ak + a.next + part * a.part, a.stride);
  };
  auto load_b = [&](const uint8_t* bk, int part) {
    _tile_loadd(6, bk + part * kTileBytes, 64);
    if constexpr (MT == 2) _tile_loadd(7, bk + b_next + part * kTileBytes, 64);
  };
  for (int64_t ks = 0; ks < KS; ++ks) {
    const uint8_t* ak = a.base + ks * a.step;
    const uint8_t* bk = b + ks * kParts * kTileBytes;
    for (int64_t r = 0; r < pf.runs; ++r) {
      const char* run = pf.base + r * pf.stride + ks * pf.step;
      for (int64_t l = 0; l < pf.lines; ++l) _mm_prefetch(run + l * 64, _MM_HINT_T0);
    }
    if constexpr (WP == 3) {
      load_a(ak, 0);
      load_b(bk, 2);
      tile6_first();
      load_b(bk, 1);
      tile6_first();
      load_b(bk, 0);
      tile4_first();
      load_a(ak, 2);
      tile4_first();
      load_a(ak, 1);
      tile6_first();
      load_b(bk, 1);
      tile4_first();
    } else {   // (w0 x2) (w0 x1) (w0 x0) (w1 x0) (w1 x1): 12 loads, each weight tile once
      load_b(bk, 2);
      load_a(ak, 0);
      tile6_first();
      load_b(bk, 1);
      tile6_first();
      load_b(bk, 0);
      tile4_first();
      load_a(ak, 1);
      tile6_first();
      load_b(bk, 1);
      tile6_first();
    }
  }
  alignas(64) float tile[4][16 * 16];
  _tile_stored(0, tile[0], 64);
  if constexpr (MT == 2) _tile_stored(1, tile[1], 64);
  if constexpr (NT == 2) _tile_stored(2, tile[2], 64);
  if constexpr (NT == 2 && MT == 2) _tile_stored(3, tile[3], 64);
  for (int nt = 0; nt < NT; ++nt) {
    for (int mt = 0; mt < MT; ++mt) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(tile[nt * 2 + mt] + i * 16);
      Transpose16(r);   // r[j] = x row mt * 16 + j, weight rows nt * 16 ..
      const int64_t cols = std::min<int64_t>(16, n_valid - nt * 16), rows = std::min<int64_t>(16, m_valid - mt * 16);
      if (cols <= 0) continue;
      const __mmask16 mask = cols == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
      for (int64_t j = 0; j < rows; ++j) {
        _mm512_mask_storeu_ps(c + (mt * 16 + j) * ldc + nt * 16, mask, _mm512_castsi512_ps(r[j]));
      }
    }
  }
}

}  // namespace

// Whether this process may use the AMX tiles (the kernel asks Linux for the tile state once).
bool AmxReady() {
  static const bool ready = [] {
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;   // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

// Columns of x as packed by AmxPackX: K, plus one block sum per 32 columns with sums.
int64_t AmxPackedK(int64_t K, bool sums) { return sums ? K + K / kTileK : K; }

// Bytes of AmxPackX's result for m rows of K (AmxPackedK) columns.
int64_t AmxPackedBytes(int64_t m, int64_t K) {
  return (m + 15) / 16 * ((K + kTileK - 1) / kTileK) * kParts * kTileBytes;
}

// x rows [16 * b0, 16 * b1) (rows past m zero) as B tiles into dst: dst[((b * KS + ks) * kParts + p) tiles]
// over the AmxPackedK(K, sums) columns: with sums (K a multiple of 32), x's row is followed by the sums of
// its 32-column blocks, the x_ext that multiplies the split weights [d * q | m] (xyjax/ops/gemm/formats.py).
void AmxPackX(int64_t m, int64_t K, bool sums, const float* x, int64_t ldx, int64_t b0, int64_t b1, uint8_t* dst) {
  const int64_t KX = (K + kTileK - 1) / kTileK, KE = AmxPackedK(K, sums), KS = (KE + kTileK - 1) / kTileK;
  thread_local std::vector<float> block_sums;   // [16, KX]: each row's block sums, as its x steps are split
  if (sums) block_sums.resize(16 * KX);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t ks = 0; ks < KS; ++ks) {
      __m512i rows[kParts][16];   // per part: row i = x row 16b + i's 16 k pairs
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = b * 16 + i;
        __m512i parts[kParts];
        if (ks < KX) {
          Split32<kParts>(row < m ? x + row * ldx + ks * kTileK : x, row < m ? K - ks * kTileK : 0, parts,
                          sums ? &block_sums[i * KX + ks] : nullptr);
        } else {   // the block sums' steps (rows past m summed zeros)
          Split32<kParts>(&block_sums[i * KX + (ks - KX) * kTileK], KX - (ks - KX) * kTileK, parts);
        }
        for (int p = 0; p < kParts; ++p) rows[p][i] = parts[p];
      }
      for (int p = 0; p < kParts; ++p) {
        Transpose16(rows[p]);   // row r = k pair r of the 16 x rows
        uint8_t* tile = dst + ((b * KS + ks) * kParts + p) * kTileBytes;
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(tile + r * 64, rows[p][r]);
      }
    }
  }
}

namespace {

// AmxGemm with the weights in WP bf16 parts: float32 rows w converted as they are read, or (WP = 2)
// TileWeights rows [n, ceil(K / 32), 2, 32] bfloat16 read in place.
template <int WP>
void Gemm(int64_t m, int64_t n, int64_t K, const uint8_t* xb, const float* w, const uint8_t* tiles, float* c,
          int64_t ldc) {
  const int64_t KS = (K + kTileK - 1) / kTileK;
  const int64_t a_strip = KS * WP * kTileBytes, b_strip = KS * kParts * kTileBytes;  // one 16-row block's tiles
  const int64_t row_bytes = KS * 2 * 64;   // a TileWeights row
  const int64_t MB = (m + 15) / 16;
  const int64_t chunk = std::max<int64_t>(2, kChunkBytes / b_strip / 2 * 2);   // x blocks per pass, even
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  thread_local std::vector<__m512i> packed;   // a superblock of weight rows as A tiles (64-byte aligned)
  // One pass over x (a single chunk): 32 weight rows at a time, the next 32 prefetched while these multiply,
  // so the weights stream in once. Several chunks: as many 32-row pairs as fit kSuperBytes (256 rows at K = 576,
  // 96 at K = 1536), converted once for all chunks (TileWeights: read in place, kept in L2 for all chunks).
  const int64_t super = MB <= chunk ? 32 : std::max<int64_t>(1, kSuperBytes / (2 * a_strip)) * 32;
  for (int64_t s0 = 0; s0 < n; s0 += super) {
    const int64_t ns = std::min(super, n - s0), NB = (ns + 15) / 16;
    ATiles wa;
    if (tiles != nullptr) {
      wa = {tiles + s0 * row_bytes, 16 * row_bytes, 2 * 64, 64, row_bytes};
    } else {
      if (packed.size() * 64 < static_cast<size_t>(NB * a_strip)) packed.resize(NB * a_strip / 64);
      PackWeights<WP>(w, n, K, s0, NB, reinterpret_cast<uint8_t*>(packed.data()));
      wa = {reinterpret_cast<const uint8_t*>(packed.data()), a_strip, WP * kTileBytes, kTileBytes, 64};
    }
    // The next 32 rows (with one pass) per K step: two lines of each float32 or TileWeights row.
    const int64_t next = super == 32 ? std::max<int64_t>(0, std::min<int64_t>(32, n - s0 - 32)) : 0;
    const Prefetch none{nullptr, 0, 0, 0, 0};
    const Prefetch pf = next == 0 ? none
                        : tiles != nullptr ? Prefetch{reinterpret_cast<const char*>(wa.base + 32 * row_bytes), next, 2,
                                                      row_bytes, 2 * 64}
                                           : Prefetch{reinterpret_cast<const char*>(w + (s0 + 32) * K), next, 2,
                                                      K * kFloatBytes, kTileK * kFloatBytes};
    for (int64_t c0 = 0; c0 < MB; c0 += chunk) {
      for (int64_t nb = 0; nb < NB; nb += 2) {
        const ATiles a = wa.Block(nb);
        const int64_t n_valid = std::min<int64_t>(32, ns - nb * 16);
        for (int64_t mb = c0; mb < std::min(MB, c0 + chunk); mb += 2) {
          const uint8_t* b = xb + mb * b_strip;
          float* cb = c + mb * 16 * ldc + s0 + nb * 16;
          const int64_t m_valid = std::min<int64_t>(32, m - mb * 16);
          const Prefetch& p = mb == 0 ? pf : none;
          const bool two_n = nb + 1 < NB, two_m = mb + 1 < MB;
          if (two_n && two_m) {
            Block<2, 2, WP>(a, b, b_strip, KS, cb, ldc, n_valid, m_valid, p);
          } else if (two_n) {
            Block<2, 1, WP>(a, b, b_strip, KS, cb, ldc, n_valid, m_valid, p);
          } else if (two_m) {
            Block<1, 2, WP>(a, b, b_strip, KS, cb, ldc, n_valid, m_valid, p);
          } else {
            Block<1, 1, WP>(a, b, b_strip, KS, cb, ldc, n_valid, m_valid, p);
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

// c [m, n] (row stride ldc) = x @ w [n, K]^T, x packed by AmxPackX (K = its AmxPackedK), float32,
// single-threaded. w_parts: 3, or 2 where every weight is exact in two bfloat16 parts (the caller's promise).
void AmxGemm(int64_t m, int64_t n, int64_t K, int w_parts, const uint8_t* xb, const float* w, float* c,
             int64_t ldc) {
  if (w_parts == 2) {
    Gemm<2>(m, n, K, xb, w, nullptr, c, ldc);
  } else {
    Gemm<3>(m, n, K, xb, w, nullptr, c, ldc);
  }
}

// AmxGemm of weights stored as their two bfloat16 parts (xyjax.ops.gemm.TileWeights): tiles holds rows
// [0, 16 * ceil(n / 16)) as [., ceil(K / 32), 2, 32] bfloat16 (hi, lo per 32 inputs), rows past n zero; the A
// tiles are read from them in place, 16 rows apart.
void AmxGemmTiles(int64_t m, int64_t n, int64_t K, const uint8_t* xb, const uint8_t* tiles, float* c, int64_t ldc) {
  Gemm<2>(m, n, K, xb, nullptr, tiles, c, ldc);
}

}  // namespace gemm
}  // namespace xyjax
