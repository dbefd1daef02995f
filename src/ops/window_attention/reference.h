// Internal entry points of the window-attention reference (docs/spec/window_attention.md), for the tests and as the
// fp64 path of the CPU backend. forward_fp32: §5 / §6 with float32 arithmetic exactly as stated (the public
// reference for bf16/fp16/fp32 inputs); forward_fp64: every float32 quantity in float64 (dot products, softmax,
// P.V), P still rounded to the input dtype (rha) before P.V and the output rounded once: the fp64 model that
// tolerances are measured against. backward_fp32 / backward_fp64: §7 line by line in float32 and in float64 (the
// path of fp64 inputs). Defined in reference_forward.cpp / reference_backward.cpp (common/reference_entry.h).
#pragma once

#include <cstdint>
#include <vector>

#include "common/reference_entry.h"
#include "common/reference_rows.h"
#include "nsa/window_attention.h"
#include "ops/window_attention/batches.h"

namespace nsa {
using window_reference =
    detail::ForwardBackwardReference<validate_window_attention, validate_window_attention_backward>;
}  // namespace nsa

namespace nsa::window_detail {

// The query rows the forward and the backward reference visit, one by one: f(bi, i, keys) for row i of every batch
// bi (query row q0_b + i, i ascending), keys its visible keys j < Skv_b (the band and the mask, §4) ascending; keys
// may be empty (§6).
template <typename F>
void for_each_row_keys(const WindowAttentionParams& p, const WindowAttentionShape& sh, F&& f) {
  const Visibility vis(p, sh);
  std::vector<int64_t> keys;
  ref::for_each_query_row(make_batches(p), [&](const WBatch& bi, int64_t i) {
    keys.clear();
    for (int64_t j = 0; j < bi.skv; ++j)
      if (vis.visible(bi, i, j)) keys.push_back(j);
    f(bi, i, keys);
  });
}

}  // namespace nsa::window_detail
