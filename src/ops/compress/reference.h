// Internal entry points of the compression reference (docs/spec/compress.md): the fp64 model that tests measure
// the other backends' errors against.
#pragma once

#include <vector>

#include "nsa/compress.h"

namespace nsa::compress_ref {

// §4 with every quantity in float64 and no final rounding: value[(r*N + n)*D + j] is the exact-ish sum of
// output element (r, n, j) (products of the dtype's values are exact in fp64 for bf16/fp16, one fp64 rounding
// per product and per addition otherwise), abs_sum the sum of the absolute values of its l terms (the scale of
// its summation error). Validates first; resizes the vectors to R*N*D.
Status forward_model(const CompressParams& p, std::vector<double>* value, std::vector<double>* abs_sum);

// §6 in float64 without the final rounding: input_grad [T*N*D] and weight_grad [l*N] (row-major, as the
// outputs), each with the sum of the absolute values of its terms. Validates first.
Status backward_model(const CompressGradParams& p, std::vector<double>* input_grad, std::vector<double>* input_grad_abs,
                      std::vector<double>* weight_grad, std::vector<double>* weight_grad_abs);

}  // namespace nsa::compress_ref
