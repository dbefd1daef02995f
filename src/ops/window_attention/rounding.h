// Roundings of fp32 values to the storage dtypes used by sliding-window attention (docs/spec/window_attention.md):
// rha = to nearest, ties AWAY from zero (AscendC CAST_ROUND: the output of §5 step 4, the gradients of §7) and
// the row stores built on it. NaN stays NaN (bf16: quiet (u >> 16) | 0x40, fp16: sign | 0x7e00, as
// nsa::detail::f32_to_bf16 / f32_to_f16), overflow gives +-inf.
//
// Written as integer operations on the fp32 bit pattern with selects instead of branches, so that the row loops
// vectorize with the baseline flags of the library (they run once per output element: no per-ISA copy needed).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/numeric.h"
#include "nsa/common.h"

namespace nsa::window_detail {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16, ties away: add half of the 16 dropped bits to the magnitude and keep the top 16 bits (a carry into the
// exponent is the correct result, up to inf).
inline uint16_t f32_to_bf16_rha(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t nan = static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint16_t r = static_cast<uint16_t>((u + 0x8000u) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? nan : r;
}

// fp16, ties away.
//   normal results (|x| >= 2^-14): rebias the exponent (127 -> 15) and add half of the 13 dropped mantissa bits;
//   subnormal results: |x| * 2^24 (exact, < 1024) rounded half away to an integer, which is the subnormal's bit
//     pattern (1024 = the smallest normal, also correct);
//   |x| >= 65520 (65504 + half an ulp): inf; NaN: sign | 0x7e00.
inline uint16_t f32_to_f16_rha(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a - (112u << 23) + 0x1000u) >> 13;
  const float v = float_of(a < 0x38800000u ? a : 0u) * 16777216.0f;  // exact
  const float t = static_cast<float>(static_cast<int32_t>(v));     // trunc (v < 1024)
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(t)) + (v - t >= 0.5f ? 1u : 0u);
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? 0x7e00u : r;
  return static_cast<uint16_t>(sign | r);
}

inline float bf16_bits_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// x rounded to the dtype with ties away (and back to float): rha_T of §5. fp32 / fp64: unchanged.
inline float round_rha(float x, DType dt) {
  switch (dt) {
    case DType::kBF16: return bf16_bits_to_f32(f32_to_bf16_rha(x));
    case DType::kF16: return detail::f16_to_f32(f32_to_f16_rha(x));
    default: return x;
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

}  // namespace nsa::window_detail
