// Roundings of the compression operator (docs/spec/compress.md, "Rounding functions"): rha_T (ties away from zero)
// for the forward's final rounding (§4), rne_T (ties to even) for the gradients (§6). Defined once in
// src/common/rounding.h, whose integer formulas the SIMD kernels (kernels_avx2.cpp, kernels_avx512.cpp,
// kernels_avx512bf16.cpp) repeat lane by lane (the last one converts the gradients' bf16 stores with vcvtne2ps2bf16,
// which gives the same bits except on denormals, where it falls back to the formula).
#pragma once

#include "common/rounding.h"

namespace nsa::compress_detail {
using detail::f32_to_bf16_rha;
using detail::f32_to_bf16_rne;
using detail::f32_to_f16_rha;
using detail::f32_to_f16_rne;
using detail::f32_to_f16_round;
using detail::kF16MinNormal;
using detail::kF16Overflow;
using detail::kF32Inf;
using detail::kRebias;
}  // namespace nsa::compress_detail
