// Roundings of the selected-attention operator (docs/spec/select_attention.md, "Rounding functions"):
//   rha_T: to nearest, ties AWAY from zero (AscendC CAST_ROUND): the probabilities P before P.V (§4 step 4), the
//          optional rounding of P and dS in the backward, and the gradients (§8);
//   rne_T: to nearest, ties to even: attention_out (§4 step 4); nsa::detail::f32_to_bf16 / f32_to_f16.
// For fp32 and fp64 both are the identity. NaN stays NaN (bf16: (u >> 16) | 0x40 as nsa::detail::f32_to_bf16;
// fp16: sign | 0x7e00 as nsa::detail::f32_to_f16); overflow gives +-inf.
//
// Integer operations on the fp32 bit pattern (plus one exact scaling for fp16 subnormal results), so that a loop
// over them vectorizes. (The compression operator keeps its own copy in src/ops/compress/rounding.h; a later
// clean-up merges both into src/common/numeric.h.)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.h"
#include "nsa/common.h"

namespace nsa::select_detail {

// bf16 bits of x rounded half away from zero: add half of the 16 dropped bits to the magnitude, keep the top 16 (a
// carry into the exponent is the correct result, up to inf).
inline uint16_t f32_to_bf16_rha(float x) {
  const uint32_t u = detail::f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x8000u) >> 16);
}

// fp16 bits of x rounded half away from zero, with integer operations only (so that loops over it vectorize and
// every ISA path gives the same bits):
//   |x| >= 2^-14, normal results: rebias the exponent (127 -> 15) and add half of the 13 dropped mantissa bits
//                      (a carry into the exponent is the correct result);
//   |x| <  2^-14, subnormal results: |x| 2^24 = mant 2^(e - 126) (mant with its implicit bit, e the biased fp32
//                      exponent) rounded half away to an integer by (mant + 2^(s-1)) >> s, s = 126 - e >= 14 (clamped
//                      to 31, where the result is 0 anyway); 1024 is the smallest normal, also correct; no flush to
//                      zero (docs/spec/select_attention.md §12 item 2);
//   |x| >= 65520:      inf (the tie between 65504 and 2^16 rounds up);
//   NaN:               sign | 0x7e00.
inline uint16_t f32_to_f16_rha(float x) {
  const uint32_t u = detail::f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const int32_t e = static_cast<int32_t>(a >> 23);
  // used where e <= 112 (126 - e >= 14); clamped to [1, 31] so that it is a valid shift for every x
  const int32_t sh = 126 - e < 1 ? 1 : (126 - e > 31 ? 31 : 126 - e);
  const uint32_t shift = static_cast<uint32_t>(sh);
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t sub = (mant + (1u << (shift - 1u))) >> shift;
  const uint32_t normal = (a - (112u << 23) + 0x1000u) >> 13;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? 0x7e00u : r;
  return static_cast<uint16_t>(sign | r);
}

// rha_T(x) as a float (the value P takes before P.V). fp32 / fp64: x.
inline float round_rha(float x, DType dt) {
  switch (dt) {
    case DType::kBF16: return detail::bf16_to_f32(f32_to_bf16_rha(x));
    case DType::kF16: return detail::f16_to_f32(f32_to_f16_rha(x));
    default: return x;
  }
}

// Stores x into element i of a dtype buffer rounded with rha_T (bf16 / fp16 from float(x); fp32: float(x) to
// nearest; fp64: x).
inline void store_rha(void* base, int64_t i, double x, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16_rha(static_cast<float>(x)); break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = f32_to_f16_rha(static_cast<float>(x)); break;
    case DType::kF32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kF64: static_cast<double*>(base)[i] = x; break;
  }
}

}  // namespace nsa::select_detail
