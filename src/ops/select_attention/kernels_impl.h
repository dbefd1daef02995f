// Bodies of the selected-attention row kernels (kernels.h), instantiated once per ISA: include this file inside a
// namespace unique to the ISA, after <cstdint>, "common/rounding.h" and "ops/select_attention/kernels.h" at global
// scope. The bodies are plain loops over the conversions of common/rounding.h (f32_to_bf16_rha, f32_to_f16_rha:
// integer formulas with selects) and common/numeric.h (bf16_to_f32, f16_to_f32: exact widenings), which are always
// inlined, so that the compiler vectorizes each loop with the translation unit's flags and nothing compiled with one
// ISA's flags is shared with another; test_kernels.cpp checks every table against rounding.h.

inline void normalize_rha_impl(const float* x, int64_t n, float l, void* out, nsa::select_kernels::PMode mode) {
  using nsa::select_kernels::PMode;
  switch (mode) {
    case PMode::kBf16Bits: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = nsa::detail::f32_to_bf16_rha(x[i] / l);
      break;
    }
    case PMode::kF32Bf16: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = nsa::detail::bf16_to_f32(nsa::detail::f32_to_bf16_rha(x[i] / l));
      break;
    }
    case PMode::kF32F16: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = nsa::detail::f16_to_f32(nsa::detail::f32_to_f16_rha(x[i] / l));
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
      pairs[2 * i] = nsa::detail::f32_to_bf16_rha(a[i]);
      pairs[2 * i + 1] = 0;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    pairs[2 * i] = nsa::detail::f32_to_bf16_rha(a[i]);
    pairs[2 * i + 1] = nsa::detail::f32_to_bf16_rha(b[i]);
  }
}

inline void store_rha_impl(const float* x, int64_t n, float alpha, void* out, nsa::DType dt) {
  switch (dt) {
    case nsa::DType::kBF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = nsa::detail::f32_to_bf16_rha(x[i] * alpha);
      break;
    }
    case nsa::DType::kF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = nsa::detail::f32_to_f16_rha(x[i] * alpha);
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
