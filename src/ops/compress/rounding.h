// Scalar roundings of fp32 values to bf16 / fp16 used by the compression operator (docs/spec/compress.md,
// "Rounding functions"): rha = to nearest, ties AWAY from zero (the forward's final rounding, §4; AscendC
// CAST_ROUND), and rne = to nearest, ties to even (the gradients, §6). NaN stays NaN, overflow gives +-inf
// (§11 item 5).
//
// All of them are integer operations on the fp32 bit pattern (plus one exact float scaling for fp16
// subnormal results), written so that the SIMD kernels (kernels_impl.h) can repeat them lane by lane and
// give identical bits: a NaN becomes the quiet NaN (u >> 16) | 0x40 in bf16 (sign and high payload kept,
// as nsa::detail::f32_to_bf16) and sign | 0x7e00 in fp16 (as nsa::detail::f32_to_f16).
//
// (Kept with the operator for now; shared rounding helpers live in src/common/numeric.h.)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.h"

namespace nsa::compress_detail {

// fp32 bit-pattern constants of the fp16 conversion.
constexpr uint32_t kF16MinNormal = 0x38800000u;  // 2^-14: smallest normal fp16, as fp32 bits
constexpr uint32_t kF16Overflow = 0x477ff000u;   // 65520 = 65504 + half an ulp: rounds to inf (both rules)
constexpr uint32_t kF32Inf = 0x7f800000u;
constexpr uint32_t kRebias = 112u << 23;         // fp32 exponent bias 127 -> fp16 bias 15

// bf16, ties away: add half of the 16 dropped bits to the 31 magnitude bits, keep the top 16 (a carry into
// the exponent is the correct result, up to inf).
inline uint16_t f32_to_bf16_rha(float f) {
  const uint32_t u = detail::f32_bits(f);
  if ((u & 0x7fffffffu) > kF32Inf) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x8000u) >> 16);
}

// bf16, ties to even (identical to nsa::detail::f32_to_bf16; repeated here beside its SIMD twin).
inline uint16_t f32_to_bf16_rne(float f) {
  const uint32_t u = detail::f32_bits(f);
  if ((u & 0x7fffffffu) > kF32Inf) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp16 with the tie rule `away` (true: half away from zero, false: half to even).
//   normal results:    rebias the exponent and round the 13 dropped mantissa bits with an integer add
//                      (a carry into the exponent is the correct result);
//   subnormal results: |x| * 2^24 (exact, < 1024) rounded to an integer: the subnormal's bits (1024 = the
//                      smallest normal, also correct);
//   |x| >= 65520:      inf (65520 is the tie between 65504 and 2^16; both rules round it up);
//   NaN:               sign | 0x7e00.
inline uint16_t f32_to_f16_round(float f, bool away) {
  const uint32_t u = detail::f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > kF32Inf) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= kF16Overflow) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < kF16MinNormal) {
    const float v = detail::bits_f32(a) * 16777216.0f;  // exact: |x| * 2^24 < 1024
    uint32_t r;
    if (away) {
      // integer part plus one when the (exact) fraction is >= 1/2: half rounds up in magnitude
      const float t = std::trunc(v);
      r = static_cast<uint32_t>(t) + (v - t >= 0.5f ? 1u : 0u);
    } else {
      r = static_cast<uint32_t>(std::nearbyint(v));  // the default rounding mode: ties to even
    }
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t v = a - kRebias;
  v += away ? 0x1000u : 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

inline uint16_t f32_to_f16_rha(float f) { return f32_to_f16_round(f, true); }
inline uint16_t f32_to_f16_rne(float f) { return f32_to_f16_round(f, false); }

}  // namespace nsa::compress_detail
