// Internal entry points of the selected-attention reference (docs/spec/select_attention.md), for the tests and the
// CPU backend's fp64 path. forward_fp32: §4 with float32 arithmetic exactly as stated (the public reference for
// bf16 / fp16 / fp32); forward_fp64: every float32 quantity in float64 (dot products, softmax, P.V), P still rounded
// with rha_T from its float32 value before P.V and the output rounded once (rne_T): the fp64 model of §10 and the
// result for fp64 inputs. backward_fp32 / backward_fp64: §8 in float32 (P and dS not rounded) and in float64,
// outputs rounded once with rha_T. Defined in reference_forward.cpp / reference_backward.cpp
// (common/reference_entry.h).
#pragma once

#include "common/reference_entry.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/batches.h"

namespace nsa {
using select_reference =
    detail::ForwardBackwardReference<validate_select_attention, validate_select_attention_backward>;
}  // namespace nsa
