// Internal entry points of the select_attention_infer reference (for the tests and the CPU backend's fp64 path).
#pragma once

#include "nsa/select_attention_infer.h"

namespace nsa::select_infer_reference {

// docs/spec/decode.md §4 with float32 arithmetic exactly as stated (the public reference for bf16 / fp16 / fp32).
Status forward_fp32(const SelectAttentionInferParams& p);
// The same steps with every float32 quantity computed in float64; the unnormalised P is still rounded with rha_T
// (from its float32 value) and the output rounded once as §4 step 4 says: the fp64 model of §6 that tolerances are
// measured against, and the result for fp64 inputs.
Status forward_fp64(const SelectAttentionInferParams& p);

}  // namespace nsa::select_infer_reference
