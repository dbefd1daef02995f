// Scalar conversions between the storage dtypes and float32, in one place (docs/CONTRIBUTING.md rule 3): the bit-level
// conversions, the element type of each dtype (Element<dtype>: its stored type and conversions, for code that is
// a template over the dtype) and the run-time-dtype helpers built on them.
// bf16 and fp16 are rounded to nearest even; NaN stays NaN; overflow gives +-inf.
//
// The bit casts and the widenings are [[gnu::always_inline]]: the per-ISA kernels (sources compiled with their own
// instruction-set flags, e.g. select_attention/kernels_impl.h) call them, and a call is then always expanded in the
// caller with the caller's flags, never linked to an out-of-line copy that another ISA's translation unit emitted.
// (Taking their address, as Element<> does, still yields an ordinary function.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "nsa/common.h"

namespace nsa::detail {

[[gnu::always_inline]] inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
[[gnu::always_inline]] inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

[[gnu::always_inline]] inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// The exact value of fp16 bits h: zero / subnormal man 2^-24 (exact in fp32: man < 2^10), normal
// 2^(exp-15) (1 + man 2^-10) (exponent rebiased 15 -> 127), inf / NaN (payload kept); the sign bit is OR-ed in.
// Selects instead of branches, so that a loop over it vectorizes.
[[gnu::always_inline]] inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;  // man 2^-24
  const uint32_t normal = ((exp + 112u) << 23) | (man << 13);
  const uint32_t special = 0x7f800000u | (man << 13);
  const uint32_t mag = exp == 0 ? f32_bits(sub) : (exp == 31 ? special : normal);
  return bits_f32(sign | mag);
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal or zero: value / 2^-24 rounded to nearest even integer
    const float v = bits_f32(a) * 16777216.0f;  // exact scaling by 2^24
    const float r = std::nearbyint(v);           // default rounding mode: nearest even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  // normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even
  uint32_t v = a - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

// The element type of a dtype: Raw, the stored type; Value, the arithmetic type of its values (float, double
// for fp64); get(), the exact value of a stored element; put(), a value rounded to the dtype (nearest even).
template <typename RawT, typename ValueT, DType kDt, ValueT (*kGet)(RawT), RawT (*kPut)(ValueT)>
struct ElementOf {
  using Raw = RawT;
  using Value = ValueT;
  static constexpr DType kType = kDt;
  static Value get(Raw v) { return kGet(v); }
  static Raw put(Value x) { return kPut(x); }
};
template <typename T>
inline T same_value(T x) { return x; }

template <DType>
struct Element;
template <>
struct Element<DType::kBF16> : ElementOf<uint16_t, float, DType::kBF16, bf16_to_f32, f32_to_bf16> {};
template <>
struct Element<DType::kF16> : ElementOf<uint16_t, float, DType::kF16, f16_to_f32, f32_to_f16> {};
template <>
struct Element<DType::kF32> : ElementOf<float, float, DType::kF32, same_value<float>, same_value<float>> {};
template <>
struct Element<DType::kF64> : ElementOf<double, double, DType::kF64, same_value<double>, same_value<double>> {};

// Element i (an element offset) of a dtype buffer.
template <DType dt>
inline typename Element<dt>::Value load_elem(const void* base, int64_t i) {
  return Element<dt>::get(static_cast<const typename Element<dt>::Raw*>(base)[i]);
}

// Load element i (an element offset) of a dtype buffer as float / double.
inline float load_f32(const void* base, int64_t i, DType dt) {
  switch (dt) {
    case DType::kBF16: return load_elem<DType::kBF16>(base, i);
    case DType::kF16: return load_elem<DType::kF16>(base, i);
    case DType::kF32: return load_elem<DType::kF32>(base, i);
    case DType::kF64: return static_cast<float>(load_elem<DType::kF64>(base, i));
  }
  return 0.0f;
}
inline double load_f64(const void* base, int64_t i, DType dt) {
  if (dt == DType::kF64) return load_elem<DType::kF64>(base, i);
  return static_cast<double>(load_f32(base, i, dt));
}

// Element (i, j, k) of a 3-D tensor view of a dtype, as Acc (float: load_f32, double: load_f64).
template <typename Acc>
inline Acc load_at(const Tensor3& t, int64_t i, int64_t j, int64_t k, DType dt) {
  const int64_t off = i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
  if constexpr (std::is_same_v<Acc, double>) return load_f64(t.data, off, dt);
  else return load_f32(t.data, off, dt);
}

// Round a float to the dtype and back (the "cast" of §3.4). fp32/fp64: unchanged.
inline float round_to_dtype(float x, DType dt) {
  switch (dt) {
    case DType::kBF16: return Element<DType::kBF16>::get(Element<DType::kBF16>::put(x));
    case DType::kF16: return Element<DType::kF16>::get(Element<DType::kF16>::put(x));
    default: return x;
  }
}

// Store a value into element i of a dtype buffer (rounding to nearest even).
inline void store_f64(void* base, int64_t i, double x, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = Element<DType::kBF16>::put(static_cast<float>(x)); break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = Element<DType::kF16>::put(static_cast<float>(x)); break;
    case DType::kF32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kF64: static_cast<double*>(base)[i] = x; break;
  }
}

}  // namespace nsa::detail
