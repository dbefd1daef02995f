// Per-batch bookkeeping and visibility of the selected-attention operator (docs/spec/select_attention.md §2, §3),
// shared by the reference and the CPU backend. Requires a validated call.
#pragma once

#include <cstdint>
#include <vector>

#include "common/reference_rows.h"
#include "nsa/select_attention.h"

namespace nsa::select_detail {

struct BatchInfo {
  int64_t q_begin = 0;  // q0_b: first query row (in T1) of the batch
  int64_t sq = 0;       // Sq_b
  int64_t k_begin = 0;  // k0_b: first key/value row (in T2) of the batch
  int64_t skv = 0;      // Skv_b
  int64_t blocks = 0;   // ceil(Skv_b / l'): indices of the batch lie in [0, blocks) or are -1
};

// ceil(a / b) for a >= 0, b > 0 without overflow.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

inline std::vector<BatchInfo> make_batches(const SelectAttentionParams& p) {
  const int64_t B = p.actual_seq_qlen.size;
  std::vector<BatchInfo> out(static_cast<size_t>(B));
  int64_t q_prev = 0, k_prev = 0;
  for (int64_t b = 0; b < B; ++b) {
    BatchInfo& bi = out[static_cast<size_t>(b)];
    bi.q_begin = q_prev;
    bi.sq = p.actual_seq_qlen.data[b] - q_prev;
    bi.k_begin = k_prev;
    bi.skv = p.actual_seq_kvlen.data[b] - k_prev;
    bi.blocks = ceil_div(bi.skv, p.select_block_size);
    q_prev = p.actual_seq_qlen.data[b];
    k_prev = p.actual_seq_kvlen.data[b];
  }
  return out;
}

// Index of (query row t, KV head n2, slot j), as int64 (index_dtype int32 or int64).
inline int64_t index_at(const SelectAttentionParams& p, int64_t t, int64_t n2, int64_t j) {
  const Tensor3& x = p.topk_indices;
  const int64_t off = t * x.stride[0] + n2 * x.stride[1] + j * x.stride[2];
  if (p.index_dtype == IndexDType::kInt64) return static_cast<const int64_t*>(x.data)[off];
  return static_cast<const int32_t*>(x.data)[off];
}

// §3: number of visible entries of a slot holding block x (x != -1, validated) for local query position s: the
// entries r < l' with p = x l' + r < Skv_b and, when causal, p <= s. Both limits bound r from above, so the
// visible entries of a slot are always its first `visible_count` positions.
inline int64_t visible_count(int64_t x, int64_t s, int64_t skv, int64_t lp, bool causal) {
  if (x < 0) return 0;
  const int64_t start = x * lp;
  int64_t n = lp;
  if (skv - start < n) n = skv - start;
  if (causal && s - start + 1 < n) n = s - start + 1;
  return n > 0 ? n : 0;
}

// Offset (in floats) of the first of the 8 copies of the statistic of (row t, head h) (§5: true TND layout).
inline int64_t stat_offset(int64_t t, int64_t h, int64_t N1) { return (t * N1 + h) * 8; }

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
