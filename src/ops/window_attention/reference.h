// Internal entry points of the window-attention reference (docs/spec/window_attention.md), for the tests and as the
// fp64 path of the CPU backend. forward_fp32: §5 / §6 with float32 arithmetic exactly as stated (the public
// reference for bf16/fp16/fp32 inputs); forward_fp64: every float32 quantity in float64 (dot products, softmax,
// P.V), P still rounded to the input dtype (rha) before P.V and the output rounded once: the fp64 model that
// tolerances are measured against. backward_fp32 / backward_fp64: §7 line by line in float32 and in float64 (the
// path of fp64 inputs). Defined in reference_forward.cpp / reference_backward.cpp (common/reference_entry.h).
#pragma once

#include "common/reference_entry.h"
#include "nsa/window_attention.h"
#include "ops/window_attention/batches.h"

namespace nsa {
using window_reference =
    detail::ForwardBackwardReference<validate_window_attention, validate_window_attention_backward>;
}  // namespace nsa
