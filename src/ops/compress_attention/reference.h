// Internal entry points of the reference backend (for tests and for other backends' fallbacks).
#pragma once

#include <cstdint>

#include "common/numeric.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/batches.h"

namespace nsa::reference {

// The spec in code with float32 arithmetic exactly as §3 states it (the public reference for
// bf16/fp16/fp32; fp64 inputs use forward_fp64).
Status forward_fp32(const CompressAttentionParams& p);
// The same steps with every float32 quantity computed in float64 (dot products, softmax, P.V,
// selection scores); P is still rounded to the input dtype before P.V and the output is rounded
// once (§3.4). This is the "fp64 model of the spec" that tolerances are measured against.
Status forward_fp64(const CompressAttentionParams& p);

// Backward (§7), see reference_backward.cpp: the spec in float32 arithmetic (the public reference for
// bf16/fp16/fp32) and the same steps in float64 (the fp64 model of the gradients; fp64 inputs use it).
Status backward_fp32(const CompressAttentionGradParams& p);
Status backward_fp64(const CompressAttentionGradParams& p);

// §3.1 scores of query row t, head h (KV head n2 = h / G) of batch bi, before the mask, as the forward and the
// backward reference compute them: S[c] = (q . k_c, accumulated in Acc) * scale for c < C_b.
template <typename Acc>
void scores(const CompressAttentionParams& p, const detail::BatchInfo& bi, int64_t t, int64_t h, int64_t n2, Acc scale,
            Acc* S) {
  const int64_t D = p.query.size[2];
  for (int64_t c = 0; c < bi.c; ++c) {
    Acc dot = 0;
    for (int64_t j = 0; j < D; ++j)
      dot += detail::load_at<Acc>(p.query, t, h, j, p.dtype) * detail::load_at<Acc>(p.key, bi.c_begin + c, n2, j, p.dtype);
    S[c] = dot * scale;
  }
}

}  // namespace nsa::reference
