// Roundings of fp32 values to bf16 / fp16 with an explicit tie rule, shared by every operator:
//   rne = to nearest, ties to even (AscendC CAST_RINT; the same as nsa::detail::f32_to_bf16 / f32_to_f16);
//   rha = to nearest, ties AWAY from zero (AscendC CAST_ROUND).
// Which rule each output of an operator uses is the operator's contract (docs/spec/<op>.md, "Rounding functions");
// the operator's own rounding.h names them. For fp32 and fp64 both rules are the identity.
// NaN stays NaN (bf16: the quiet NaN (u >> 16) | 0x40, sign and high payload kept; fp16: sign | 0x7e00), overflow
// gives +-inf.
//
// The formulas (bf16_bits_of, f16_bits_of) are integer operations on the fp32 bit pattern with selects instead of
// branches, written once for one value and for the lanes of a SIMD vector: a loop over the scalar functions
// vectorizes with the baseline flags, and the per-ISA SIMD kernels apply the same template to their vectors, so that
// every path gives identical bits (their tests compare them with these functions). They are [[gnu::always_inline]]
// for the reason numeric.h gives: kernels compiled with their own instruction-set flags call them
// (select_attention/kernels_impl.h, compress/kernels_impl.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/numeric.h"
#include "nsa/common.h"

namespace nsa::detail {

// fp32 bit-pattern constants of the fp16 conversion.
constexpr uint32_t kF16MinNormal = 0x38800000u;  // 2^-14: smallest normal fp16, as fp32 bits
constexpr uint32_t kF16Overflow = 0x477ff000u;   // 65520 = 65504 + half an ulp: rounds to inf (both rules)
constexpr uint32_t kF32Inf = 0x7f800000u;
constexpr uint32_t kRebias = 112u << 23;         // fp32 exponent bias 127 -> fp16 bias 15

// The integer formulas on fp32 bit patterns u, one value (U = uint32_t) or every lane of a GCC vector of uint32
// (U = uint32_t __attribute__((vector_size(32 / 64))): the SIMD kernels' stores, e.g. compress/kernels_impl.h), with
// the tie rule `away` (true: rha, false: rne); the result is the 16-bit pattern in the low half of each lane. Only
// operators and selects (`c ? a : b` is a lane-wise blend on vectors), so every lane gets the bits of the scalar.

// Lanes of 32-bit floats and of signed 32-bit integers of the same width as U (float / int32_t for uint32_t), bit
// casts and value conversions (static_cast on one value, __builtin_convertvector on vectors). Magnitudes (bit
// patterns with the sign cleared, <= 0x7fffffff) are compared as signed lanes, and the integers converted to and from
// float are small: the signed forms are single instructions on every SIMD ISA.
template <typename U>
struct LaneTypes {
  typedef float F __attribute__((vector_size(sizeof(U))));
  typedef int32_t S __attribute__((vector_size(sizeof(U))));
};
template <>
struct LaneTypes<uint32_t> {
  using F = float;
  using S = int32_t;
};
template <typename To, typename From>
[[gnu::always_inline]] inline To lane_bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}
template <typename To, typename From>
[[gnu::always_inline]] inline To lane_convert(From x) {
  if constexpr (std::is_arithmetic_v<From>) return static_cast<To>(x);
  else return __builtin_convertvector(x, To);
}

// bf16: add half of the 16 dropped bits (rha: 0x8000; rne: 0x7fff + the lowest kept bit) to the 31 magnitude bits,
// keep the top 16 (a carry into the exponent is the correct result, up to inf); NaN: (u >> 16) | 0x40.
template <typename U>
[[gnu::always_inline]] inline U bf16_bits_of(U u, bool away) {
  const U nan = (u >> 16) | 0x40u;
  const U bias = away ? U{} + 0x8000u : 0x7fffu + ((u >> 16) & 1u);
  const U r = (u + bias) >> 16;
  return lane_bit_cast<typename LaneTypes<U>::S>(u & 0x7fffffffu) > static_cast<int32_t>(kF32Inf) ? nan : r;
}

// The same 16 bits in the HIGH half of each lane (the low half is unspecified): u + bias, or u | 0x00400000 for NaN
// (bit 22 of the fp32 pattern is bit 6 of its top half). SIMD stores narrow two vectors at once by gathering the high
// halves with one shuffle (compress/kernels_impl.h).
template <typename U>
[[gnu::always_inline]] inline U bf16_bits_high_of(U u, bool away) {
  const U bias = away ? U{} + 0x8000u : 0x7fffu + ((u >> 16) & 1u);
  return lane_bit_cast<typename LaneTypes<U>::S>(u & 0x7fffffffu) > static_cast<int32_t>(kF32Inf) ? (u | 0x00400000u)
                                                                                                    : u + bias;
}

// fp16:
//   |x| >= 2^-14, normal results: rebias the exponent (127 -> 15) and add half of the 13 dropped mantissa bits
//                      (rha: 0x1000; rne: 0xfff + the lowest kept bit; a carry into the exponent is the correct
//                      result);
//   |x| <  2^-14, subnormal results: s = |x| 2^24 (exact, a power-of-two scaling; s < 2^10) rounded to an integer,
//                      the result's bits: rha, t = trunc(s) plus 1 where s - t >= 1/2 (s - t is exact); rne, the
//                      low mantissa bits of s + 2^23 (one fp32 addition in the default rounding mode rounds s to an
//                      integer, ties to even); 1024 is the smallest normal, also correct; no flush to zero (the other
//                      lanes enter this path as 0, so every conversion is in range);
//   |x| >= 65520:      inf (the tie between 65504 and 2^16 rounds up under both rules);
//   NaN:               sign | 0x7e00.
template <typename U>
[[gnu::always_inline]] inline U f16_bits_of(U u, bool away) {
  using Fl = typename LaneTypes<U>::F;
  using S = typename LaneTypes<U>::S;
  const U sign = (u >> 16) & 0x8000u;
  const U a = u & 0x7fffffffu;
  const S as = lane_bit_cast<S>(a);
  const auto is_small = as < static_cast<int32_t>(kF16MinNormal);
  const Fl s = lane_bit_cast<Fl>(is_small ? a : U{}) * 16777216.0f;
  U sub;
  if (away) {
    const S t = lane_convert<S>(s);
    sub = lane_bit_cast<U>(s - lane_convert<Fl>(t) >= 0.5f ? t + 1 : t);
  } else {
    sub = lane_bit_cast<U>(s + 8388608.0f) - 0x4b000000u;
  }
  const U n = a - kRebias;
  const U normal = away ? (n + 0x1000u) >> 13 : (n + 0xfffu + ((n >> 13) & 1u)) >> 13;
  U r = is_small ? sub : normal;
  r = as >= static_cast<int32_t>(kF16Overflow) ? U{} + 0x7c00u : r;
  r = as > static_cast<int32_t>(kF32Inf) ? U{} + 0x7e00u : r;
  return sign | r;
}

// bf16 / fp16, ties away, of one value.
[[gnu::always_inline]] inline uint16_t f32_to_bf16_rha(float x) {
  return static_cast<uint16_t>(bf16_bits_of(f32_bits(x), true));
}
[[gnu::always_inline]] inline uint16_t f32_to_f16_rha(float x) {
  return static_cast<uint16_t>(f16_bits_of(f32_bits(x), true));
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
