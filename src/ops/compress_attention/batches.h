// Per-batch bookkeeping derived from the prefix-sum lists of a validated call (§2, §4).
#pragma once

#include <cstdint>
#include <vector>

#include "nsa/compress_attention.h"

namespace nsa::detail {

struct BatchInfo {
  int64_t q_begin = 0;   // first query row (in T) of the batch
  int64_t sq = 0;        // Sq_b: query rows of the batch
  int64_t c_begin = 0;   // first compressed key/value row (in T2) of the batch
  int64_t c = 0;         // C_b: compressed tokens of the batch (>= 1)
  int64_t sel = 0;       // Sel_b = ceil(C_b / M)
  int64_t stat_begin = 0;  // first float of the batch in softmax_max/softmax_sum: 8*N1*q_begin
};

// Requires a validated call (the lists are consistent).
inline std::vector<BatchInfo> make_batches(const CompressAttentionParams& p, const CompressAttentionShape& sh) {
  std::vector<BatchInfo> out(static_cast<size_t>(sh.B));
  int64_t q_prev = 0, c_prev = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    BatchInfo& bi = out[static_cast<size_t>(b)];
    bi.q_begin = q_prev;
    bi.sq = p.actual_seq_qlen.data[b] - q_prev;
    bi.c_begin = c_prev;
    bi.c = p.actual_cmp_seq_kvlen.data[b] - c_prev;
    bi.sel = (bi.c + sh.M - 1) / sh.M;
    bi.stat_begin = 8 * sh.N1 * bi.q_begin;
    q_prev = p.actual_seq_qlen.data[b];
    c_prev = p.actual_cmp_seq_kvlen.data[b];
  }
  return out;
}

// Offset (in floats) of the 8 copies of the statistic of (batch, head h, row s) (§4 layout).
inline int64_t stat_offset(const BatchInfo& bi, int64_t h, int64_t s) {
  return bi.stat_begin + (h * bi.sq + s) * 8;
}

// Selection weights of §3.5: w_i = min(i+1, N, M+N-1-i), i in [0, M+N-1).
inline std::vector<int> selection_weights(int64_t M, int64_t N) {
  std::vector<int> w(static_cast<size_t>(M + N - 1));
  for (int64_t i = 0; i < M + N - 1; ++i) {
    int64_t v = i + 1;
    if (N < v) v = N;
    if (M + N - 1 - i < v) v = M + N - 1 - i;
    w[static_cast<size_t>(i)] = static_cast<int>(v);
  }
  return w;
}

}  // namespace nsa::detail
