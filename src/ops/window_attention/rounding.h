// Roundings of sliding-window attention (docs/spec/window_attention.md): rha_T (ties away from zero) for the output of
// §5 step 4 and the gradients of §7; defined once in src/common/rounding.h.
#pragma once

#include "common/rounding.h"

namespace nsa::window_detail {
using detail::f32_to_bf16_rha;
using detail::f32_to_f16_rha;
using detail::round_rha;
using detail::store_row_rha;
}  // namespace nsa::window_detail
