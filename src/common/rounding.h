// Roundings of fp32 values to bf16 / fp16 with an explicit tie rule, shared by every operator:
//   rne = to nearest, ties to even (AscendC CAST_RINT; the same as nsa::detail::f32_to_bf16 / f32_to_f16);
//   rha = to nearest, ties AWAY from zero (AscendC CAST_ROUND).
// Which rule each output of an operator uses is the operator's contract (docs/spec/<op>.md, "Rounding functions");
// the operator's own rounding.h names them. For fp32 and fp64 both rules are the identity.
// NaN stays NaN (bf16: the quiet NaN (u >> 16) | 0x40, sign and high payload kept; fp16: sign | 0x7e00), overflow
// gives +-inf.
//
// rha is written as integer operations on the fp32 bit pattern with selects instead of branches, so that a loop over
// it vectorizes with the baseline flags, and so that the per-ISA SIMD kernels can repeat the same formulas lane by
// lane and give identical bits (their tests compare them with these functions).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/numeric.h"
#include "nsa/common.h"

namespace nsa::detail {

// fp32 bit-pattern constants of the fp16 conversion.
constexpr uint32_t kF16MinNormal = 0x38800000u;  // 2^-14: smallest normal fp16, as fp32 bits
constexpr uint32_t kF16Overflow = 0x477ff000u;   // 65520 = 65504 + half an ulp: rounds to inf (both rules)
constexpr uint32_t kF32Inf = 0x7f800000u;
constexpr uint32_t kRebias = 112u << 23;         // fp32 exponent bias 127 -> fp16 bias 15

// bf16, ties away: add half of the 16 dropped bits to the 31 magnitude bits, keep the top 16 (a carry into the
// exponent is the correct result, up to inf).
inline uint16_t f32_to_bf16_rha(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t nan = (u >> 16) | 0x40u;
  const uint32_t r = (u + 0x8000u) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > kF32Inf ? nan : r);
}

// fp16, ties away:
//   |x| >= 2^-14, normal results: rebias the exponent (127 -> 15) and add half of the 13 dropped mantissa bits
//                      (a carry into the exponent is the correct result);
//   |x| <  2^-14, subnormal results: |x| 2^24 = mant 2^(e - 126) (mant with its implicit bit, e the biased fp32
//                      exponent) rounded half away to an integer by (mant + 2^(s-1)) >> s, s = 126 - e >= 14 (clamped
//                      to [1, 31]: at 31 the result is 0 anyway); 1024 is the smallest normal, also correct; no flush
//                      to zero;
//   |x| >= 65520:      inf (the tie between 65504 and 2^16 rounds up);
//   NaN:               sign | 0x7e00.
inline uint16_t f32_to_f16_rha(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const int32_t e = static_cast<int32_t>(a >> 23);
  const int32_t sh = 126 - e < 1 ? 1 : (126 - e > 31 ? 31 : 126 - e);
  const uint32_t shift = static_cast<uint32_t>(sh);
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t sub = (mant + (1u << (shift - 1u))) >> shift;
  const uint32_t normal = (a - kRebias + 0x1000u) >> 13;
  uint32_t r = a < kF16MinNormal ? sub : normal;
  r = a >= kF16Overflow ? 0x7c00u : r;
  r = a > kF32Inf ? 0x7e00u : r;
  return static_cast<uint16_t>(sign | r);
}

inline uint16_t f32_to_bf16_rne(float x) { return f32_to_bf16(x); }
inline uint16_t f32_to_f16_rne(float x) { return f32_to_f16(x); }

// fp16 with the tie rule `away` (true: rha, false: rne).
inline uint16_t f32_to_f16_round(float x, bool away) { return away ? f32_to_f16_rha(x) : f32_to_f16_rne(x); }

// rha_T(x) as a float. fp32 / fp64: x.
inline float round_rha(float x, DType dt) {
  switch (dt) {
    case DType::kBF16: return bf16_to_f32(f32_to_bf16_rha(x));
    case DType::kF16: return f16_to_f32(f32_to_f16_rha(x));
    default: return x;
  }
}

// Element i of a dtype buffer = x rounded with rha_T (bf16 / fp16 from float(x); fp32: float(x) to nearest;
// fp64: x).
inline void store_rha(void* base, int64_t i, double x, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16_rha(static_cast<float>(x)); break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = f32_to_f16_rha(static_cast<float>(x)); break;
    case DType::kF32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kF64: static_cast<double*>(base)[i] = x; break;
  }
}

// dst[k] = rha_T(src[k]) for k < n, stored in the dtype (fp32: copy; fp64: widened).
inline void store_row_rha(const float* src, void* dst, int64_t n, DType dt) {
  switch (dt) {
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t k = 0; k < n; ++k) d[k] = f32_to_bf16_rha(src[k]);
      break;
    }
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t k = 0; k < n; ++k) d[k] = f32_to_f16_rha(src[k]);
      break;
    }
    case DType::kF32: std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n)); break;
    case DType::kF64: {
      double* d = static_cast<double*>(dst);
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<double>(src[k]);
      break;
    }
  }
}

}  // namespace nsa::detail
