// Internal entry points of the compressed-attention reference (docs/spec/compress_attention.md), for the tests and
// the CPU backends' fp64 paths. forward_fp32 / backward_fp32: §3 / §7 with float32 arithmetic exactly as stated
// (the public reference for bf16 / fp16 / fp32); forward_fp64 / backward_fp64: the same steps with every float32
// quantity in float64 (dot products, softmax, P.V, selection scores; P still rounded to the input dtype before P.V,
// the output rounded once, §3.4): the fp64 model that tolerances are measured against, and the path of fp64 inputs.
// Defined in reference_forward.cpp / reference_backward.cpp (common/reference_entry.h).
#pragma once

#include "common/numeric.h"
#include "common/reference_entry.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/batches.h"

namespace nsa {
using reference = detail::ForwardBackwardReference<validate_compress_attention, validate_compress_attention_backward>;
}  // namespace nsa
