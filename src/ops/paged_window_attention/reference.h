// Internal entry points of the paged_window_attention reference (docs/spec/decode.md §9), for the tests and the CPU
// backend's fp64 path. forward_fp32: §9 with float32 arithmetic (the public reference for bf16 / fp16 / fp32);
// forward_fp64: the same steps in float64 (P still rounded with rha_T from its float32 value, the output rounded
// once with rha_T): the fp64 model that tolerances are measured against, and the result for fp64 inputs. Defined in
// reference.cpp (common/reference_entry.h).
#pragma once

#include "common/reference_entry.h"
#include "nsa/paged_window_attention.h"

namespace nsa {
using paged_window_reference = detail::ForwardReference<validate_paged_window_attention>;
}  // namespace nsa
