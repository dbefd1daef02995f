// Roundings of the selected-attention operator (docs/spec/select_attention.md, "Rounding functions"):
//   rha_T (ties away from zero): the probabilities P before P.V (§4 step 4), the optional rounding of P and dS in
//          the backward, and the gradients (§8);
//   rne_T (ties to even): attention_out (§4 step 4).
// Defined once in src/common/rounding.h.
#pragma once

#include "common/rounding.h"

namespace nsa::select_detail {
using detail::f32_to_bf16_rha;
using detail::f32_to_f16_rha;
using detail::round_rha;
using detail::store_rha;
}  // namespace nsa::select_detail
