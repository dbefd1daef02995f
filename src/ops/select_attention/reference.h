// Internal entry points of the selected-attention reference (for the tests and for the CPU backend's fp64 path).
#pragma once

#include "nsa/select_attention.h"

namespace nsa::select_reference {

// The contract in code with float32 arithmetic exactly as §4 states it (the public reference for bf16 / fp16 /
// fp32; fp64 inputs use forward_fp64).
Status forward_fp32(const SelectAttentionParams& p);
// The same steps with every float32 quantity computed in float64 (dot products, softmax, P.V); P is still rounded
// to the input dtype (rha_T, from its float32 value) before P.V and the output is rounded once (rne_T). This is
// the fp64 model of the contract that tolerances are measured against (§10), and the result for fp64 inputs.
Status forward_fp64(const SelectAttentionParams& p);

// §8 with float32 arithmetic (P and dS not rounded) and the same in float64 (the fp64 model of the gradients;
// fp64 inputs use it). Outputs rounded once with rha_T.
Status backward_fp32(const SelectAttentionGradParams& p);
Status backward_fp64(const SelectAttentionGradParams& p);

}  // namespace nsa::select_reference
