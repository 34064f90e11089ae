// GGUF's block formats as the block kernels of smooth_gemm read them (xyjax/ops/gemm/formats.py, GGUFBlocks,
// gives each block's byte layout): the ggml type ids the handler takes, each block's inputs and bytes, where
// each input of a K-quant super-block sits, and the scalar float16 -> float32 conversion of the block scales.
// Everything here has internal linkage (static, constexpr): the kernel files include it under their own
// instruction-set flags, and no copy may be shared.
#ifndef XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_
#define XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_

#include <cstdint>
#include <cstring>

namespace xyjax {
namespace gemm {
namespace blocks {

// Every kernel copy dequantizes each weight to the float32 that xyjax.ops.gemm.formats.GGUFBlocks.dense() (gguf's
// own numpy dequantization) gives, with d, m, dmin the block's float16 fields as float32 (exact) and integer q:
//   Q8_0 q * d; Q4_0 d * (q - 8); Q4_1 d * q + m; Q4_K (d * sc) * q - (dmin * mn); Q6_K (d * sc) * (q - 32).
// Every product is exact in float32: a float16 significand has 11 bits and |sc|, |mn| < 64 (6 bits), |Q6_K sc|
// <= 128, |q| <= 128, so d * q < 2^19, (d * sc) * q < 2^11 * 2^6 * 2^4 (Q4_K) or 2^11 * 2^7 * 2^5 (Q6_K) in units
// of the significand's last place: at most 23 bits, within float32's 24 (and float16 exponents are far inside
// float32's range). So each weight is rounded at most once, by Q4_1's + m or Q4_K's - (dmin * mn); a fused
// multiply-add (d * q + m, (d * sc) * q - dmin * mn) rounds that same exact value once too, and the kernels may use
// either: the same float32 weight.

// ggml type ids (gguf.GGMLQuantizationType) of the formats the block kernels read.
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;

// One format: type id, name, inputs per block (32, or 256 for a K-quant super-block), bytes per block.
struct Format {
  int qtype;
  const char* name;
  int64_t inputs, bytes;
};
constexpr Format kFormats[] = {
    {kQ8_0, "Q8_0", 32, 34}, {kQ4_0, "Q4_0", 32, 18}, {kQ4_1, "Q4_1", 32, 20},
    {kQ4_K, "Q4_K", 256, 144}, {kQ6_K, "Q6_K", 256, 210},
};

// qtype's format; inputs and bytes 0 (name null) for a qtype the kernels do not read.
static constexpr Format FormatOf(int qtype) {
  for (const Format& f : kFormats) {
    if (f.qtype == qtype) return f;
  }
  return Format{qtype, nullptr, 0, 0};
}
static constexpr int64_t BlockInputs(int qtype) { return FormatOf(qtype).inputs; }
static constexpr int64_t BlockBytes(int qtype) { return FormatOf(qtype).bytes; }

// Q4_0 / Q4_1 block: input j (< 32) is the nibble of byte j % 16 of the 16 nibble bytes at shift 4 (j / 16).
static constexpr int NibbleByte(int j) { return j % 16; }
static constexpr int NibbleShift(int j) { return 4 * (j / 16); }

// Q4_K super-block (144 B): d f16 | dmin f16 | 12 B packed 6-bit scales and mins | 128 B qs. Input j (< 256) is in
// sub-block j / 32; its 4-bit q is byte Q4KByte(j) of the block shifted right by Q4KShift(j), & 15 (runs of 32
// aligned inputs are consecutive bytes at one shift).
static constexpr int Q4KByte(int j) { return 16 + 32 * (j / 64) + j % 32; }
static constexpr int Q4KShift(int j) { return 4 * (j / 32 % 2); }
// The 6-bit scale and min of sub-block s (< 8), as gguf's Q4_K.get_scale_min unpacks them.
static inline int Q4KScale(const uint8_t* blk, int s) {
  const uint8_t* p = blk + 4;
  return s < 4 ? p[s] & 63 : (p[s + 4] & 15) | ((p[s - 4] >> 6) << 4);
}
static inline int Q4KMin(const uint8_t* blk, int s) {
  const uint8_t* p = blk + 4;
  return s < 4 ? p[s + 4] & 63 : (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
}

// Q6_K super-block (210 B): ql 128 B | qh 64 B | scales int8 x 16 | d f16. Input j (< 256): q = (low | high << 4)
// - 32 with low = byte Q6KLowByte(j) >> Q6KLowShift(j) & 15, high = byte Q6KHighByte(j) >> Q6KHighShift(j) & 3,
// scale int8 at Q6KScaleByte(j) (runs of 16 aligned inputs are consecutive bytes at one shift and one scale).
static constexpr int Q6KLowByte(int j) { return 64 * (j / 128) + j % 64; }
static constexpr int Q6KLowShift(int j) { return 4 * (j % 128 / 64); }
static constexpr int Q6KHighByte(int j) { return 128 + 32 * (j / 128) + j % 32; }
static constexpr int Q6KHighShift(int j) { return 2 * (j % 128 / 32); }
static constexpr int Q6KScaleByte(int j) { return 192 + j / 16; }
constexpr int kQ6KD = 208;   // byte offset of d

// IEEE float16 bits -> float32 (exact: every float16 is a float32), subnormals and inf/nan included.
static inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {   // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float LoadHalf(const uint8_t* p) { return HalfToFloat(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

}  // namespace blocks
}  // namespace gemm
}  // namespace xyjax

#endif  // XYJAX_SMOOTH_GEMM_BLOCKS_FORMAT_H_
