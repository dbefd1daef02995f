// Internal entry points of the paged_window_attention reference (for the tests and the CPU backend's fp64 path).
#pragma once

#include "nsa/paged_window_attention.h"

namespace nsa::paged_window_reference {

// docs/spec/decode.md §9 with float32 arithmetic (the public reference for bf16 / fp16 / fp32).
Status forward_fp32(const PagedWindowAttentionParams& p);
// The same steps in float64 (P still rounded with rha_T from its float32 value, the output rounded once with
// rha_T): the fp64 model that tolerances are measured against, and the result for fp64 inputs.
Status forward_fp64(const PagedWindowAttentionParams& p);

}  // namespace nsa::paged_window_reference
