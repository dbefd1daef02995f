// Internal entry points of the window-attention reference (for tests and as the fp64 path of the CPU backend).
#pragma once

#include "nsa/window_attention.h"

namespace nsa::window_reference {

// The contract in code with float32 arithmetic exactly as docs/spec/window_attention.md §5/§6 state it (the public
// reference for bf16/fp16/fp32 inputs; fp64 inputs use forward_fp64).
Status forward_fp32(const WindowAttentionParams& p);
// The same steps with every float32 quantity computed in float64 (dot products, softmax, P.V); P is still rounded
// to the input dtype (rha) before P.V and the output is rounded once. The "fp64 model" that tolerances are
// measured against.
Status forward_fp64(const WindowAttentionParams& p);

// §7 line by line: float32 arithmetic (the public reference for bf16/fp16/fp32), and the same in float64 (the fp64
// model of the gradients; the path of fp64 inputs).
Status backward_fp32(const WindowAttentionGradParams& p);
Status backward_fp64(const WindowAttentionGradParams& p);

}  // namespace nsa::window_reference
