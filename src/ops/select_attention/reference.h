// Internal entry points of the selected-attention reference (docs/spec/select_attention.md), for the tests and the
// CPU backend's fp64 path. forward_fp32: §4 with float32 arithmetic exactly as stated (the public reference for
// bf16 / fp16 / fp32); forward_fp64: every float32 quantity in float64 (dot products, softmax, P.V), P still rounded
// with rha_T from its float32 value before P.V and the output rounded once (rne_T): the fp64 model of §10 and the
// result for fp64 inputs. backward_fp32 / backward_fp64: §8 in float32 (P and dS not rounded) and in float64,
// outputs rounded once with rha_T. Defined in reference_forward.cpp / reference_backward.cpp
// (common/reference_entry.h).
#pragma once

#include <cstdint>
#include <vector>

#include "common/reference_entry.h"
#include "common/reference_rows.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/batches.h"

namespace nsa {
using select_reference =
    detail::ForwardBackwardReference<validate_select_attention, validate_select_attention_backward>;
}  // namespace nsa

namespace nsa::select_detail {

// The rows the forward and the backward reference visit: f(bi, s, n2, E) for every query row t = q0_b + s of every
// batch (s ascending) and KV head n2, with E the key rows (in T2) of the visible multiset E(t, n2) of §3 in slot
// order then r: slot j's block x = topk_indices[t, n2, j] covers the positions x l' + r, r < l', each visible when
// < Skv_b and, causal, <= s; -1 slots are empty; a duplicated index counts twice. E may be empty (§6).
template <typename F>
void for_each_visible_set(const SelectAttentionParams& p, const SelectAttentionShape& sh, F&& f) {
  std::vector<int64_t> E;
  ref::for_each_query_row(make_batches(p), [&](const BatchInfo& bi, int64_t s) {
    for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
      E.clear();
      for (int64_t j = 0; j < sh.K; ++j) {
        const int64_t x = index_at(p, bi.q_begin + s, n2, j);
        if (x == -1) continue;
        for (int64_t r = 0; r < sh.block; ++r) {
          const int64_t pos = x * sh.block + r;
          if (pos < bi.skv && (!p.causal || pos <= s)) E.push_back(bi.k_begin + pos);
        }
      }
      f(bi, s, n2, E);
    }
  });
}

}  // namespace nsa::select_detail
