// Internal entry points of the reference backend (for tests and for other backends' fallbacks).
#pragma once

#include "nsa/compress_attention.h"

namespace nsa::reference {

// The spec in code with float32 arithmetic exactly as §3 states it (the public reference for
// bf16/fp16/fp32; fp64 inputs use forward_fp64).
Status forward_fp32(const CompressAttentionParams& p);
// The same steps with every float32 quantity computed in float64 (dot products, softmax, P.V,
// selection scores); P is still rounded to the input dtype before P.V and the output is rounded
// once (§3.4). This is the "fp64 model of the spec" that tolerances are measured against.
Status forward_fp64(const CompressAttentionParams& p);

// The §3.6 group sum: pairwise over g in order, halving; an odd last element is carried up.
// Sums v[0..n) in place (destroys v) and returns the total.
template <typename T>
T pairwise_group_sum(T* v, int64_t n) {
  if (n <= 0) return T(0);
  while (n > 1) {
    const int64_t half = n / 2;
    for (int64_t i = 0; i < half; ++i) v[i] = v[2 * i] + v[2 * i + 1];
    if (n % 2) v[half] = v[n - 1];
    n = half + (n % 2);
  }
  return v[0];
}

// Order of §3.8: higher score first, equal scores by smaller index; NaN ranks below every number
// (a policy of ours: the NPU's order for NaN is undefined).
template <typename T>
bool topk_before(T sa, int64_t ia, T sb, int64_t ib) {
  const bool na = sa != sa, nb = sb != sb;
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// Backward (§7), see src/reference/backward.cpp: the spec in float32 arithmetic (the public reference for
// bf16/fp16/fp32) and the same steps in float64 (the fp64 model of the gradients; fp64 inputs use it).
Status backward_fp32(const CompressAttentionGradParams& p);
Status backward_fp64(const CompressAttentionGradParams& p);

}  // namespace nsa::reference
