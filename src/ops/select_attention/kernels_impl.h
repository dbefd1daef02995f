// Bodies of the selected-attention row kernels (kernels.h), instantiated once per ISA: include this file inside a
// namespace unique to the ISA, after <cstdint>, <cstring> and "ops/select_attention/kernels.h" at global scope.
// Everything the bodies call is defined here, inside that namespace (no inline function is shared between
// translation units compiled with different flags). Plain loops over the integer formulas of rounding.h, written
// branch-free so that the compiler vectorizes them with the translation unit's flags; test_kernels.cpp checks
// every table against rounding.h.

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// rounding.h f32_to_bf16_rha
inline uint16_t bf16_rha_bits(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t nan = (u >> 16) | 0x40u;
  const uint32_t r = (u + 0x8000u) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : r);
}

// rounding.h f32_to_f16_rha
inline uint16_t f16_rha_bits(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const int32_t e = static_cast<int32_t>(a >> 23);
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

// The exact float value of fp16 bits h (normal, subnormal: man 2^-24, inf / NaN).
inline float f16_value(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;  // man 2^-24, exact
  const uint32_t normal = ((ex + 112u) << 23) | (man << 13);
  const uint32_t special = 0x7f800000u | (man << 13);
  const uint32_t mag = ex == 0 ? bits_of(sub) : (ex == 31 ? special : normal);
  return float_of(sign | mag);
}

inline void normalize_rha_impl(const float* x, int64_t n, float l, void* out, nsa::select_kernels::PMode mode) {
  using nsa::select_kernels::PMode;
  switch (mode) {
    case PMode::kBf16Bits: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = bf16_rha_bits(x[i] / l);
      break;
    }
    case PMode::kF32Bf16: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = float_of(static_cast<uint32_t>(bf16_rha_bits(x[i] / l)) << 16);
      break;
    }
    case PMode::kF32F16: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = f16_value(f16_rha_bits(x[i] / l));
      break;
    }
    case PMode::kF32: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = x[i] / l;
      break;
    }
  }
}

inline void pack_pairs_rha_impl(const float* a, const float* b, int64_t n, uint16_t* pairs) {
  if (b == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      pairs[2 * i] = bf16_rha_bits(a[i]);
      pairs[2 * i + 1] = 0;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    pairs[2 * i] = bf16_rha_bits(a[i]);
    pairs[2 * i + 1] = bf16_rha_bits(b[i]);
  }
}

inline void store_rha_impl(const float* x, int64_t n, float alpha, void* out, nsa::DType dt) {
  switch (dt) {
    case nsa::DType::kBF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = bf16_rha_bits(x[i] * alpha);
      break;
    }
    case nsa::DType::kF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = f16_rha_bits(x[i] * alpha);
      break;
    }
    default: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = x[i] * alpha;
      break;
    }
  }
}

inline const nsa::select_kernels::Table* make_table(nsa::CpuIsa isa) {
  static const nsa::select_kernels::Table t = {isa, normalize_rha_impl, pack_pairs_rha_impl, store_rha_impl};
  return &t;
}
