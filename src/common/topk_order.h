// The top-k order of docs/spec/compress_attention.md §3.8 (internal): higher score first, equal scores by smaller
// index; NaN ranks below every number (a policy of ours: the NPU's order for NaN is undefined). A strict total
// order on (score, index) pairs with distinct indices, so the K best of a set do not depend on the order in which
// the candidates are seen.
#pragma once

#include <cstdint>

namespace nsa::detail {

// Whether (sa, ia) comes before (sb, ib).
template <typename T>
bool topk_before(T sa, int64_t ia, T sb, int64_t ib) {
  const bool na = sa != sa, nb = sb != sb;
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// The K best of score[0..sel) in topk_before order into idx[0..K), 1 <= K <= 32, K <= sel, any scores (NaN
// included): a sorted buffer of the K best so far, a candidate displacing the last entry iff it comes before it.
inline void top_k_ordered(const float* score, int64_t sel, int64_t K, int32_t* idx) {
  float best[32];
  int32_t bidx[32];
  int64_t count = 0;
  for (int64_t k = 0; k < sel; ++k) {
    const float v = score[k];
    if (count == K && !topk_before(v, k, best[K - 1], static_cast<int64_t>(bidx[K - 1]))) continue;
    int64_t pos = count < K ? count++ : K - 1;
    while (pos > 0 && topk_before(v, k, best[pos - 1], static_cast<int64_t>(bidx[pos - 1]))) {
      best[pos] = best[pos - 1];
      bidx[pos] = bidx[pos - 1];
      --pos;
    }
    best[pos] = v;
    bidx[pos] = static_cast<int32_t>(k);
  }
  for (int64_t i = 0; i < K; ++i) idx[i] = bidx[i];
}

}  // namespace nsa::detail
