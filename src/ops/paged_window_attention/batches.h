// Per-batch bookkeeping of paged_window_attention (docs/spec/decode.md §9), shared by the argument checks, the
// reference and the CPU backend (internal).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nsa/paged_window_attention.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa::paged_window {

struct Batch {
  int64_t row0 = 0;  // first query row of the batch (rows are packed: TND)
  int64_t q = 0;     // q_b
  int64_t s = 0;     // S_b
};

// q_b: query_lens[b], or 1 when query_lens is absent.
inline int64_t q_len(const PagedWindowAttentionParams& p, int64_t b) {
  return p.query_lens.data != nullptr ? p.query_lens.data[b] : 1;
}

inline std::vector<Batch> make_batches(const PagedWindowAttentionParams& p) {
  std::vector<Batch> out(static_cast<size_t>(p.seq_lens.size));
  int64_t row = 0;
  for (size_t b = 0; b < out.size(); ++b) {
    out[b].row0 = row;
    out[b].q = q_len(p, static_cast<int64_t>(b));
    out[b].s = p.seq_lens.data[b];
    row += out[b].q;
  }
  return out;
}

// §9: query token i of batch bt (L_i = S_b - (q_b - 1 - i)) sees the positions [max(0, L_i - window), L_i).
inline paged::Run token_window(const Batch& bt, int64_t i, int64_t window) {
  const int64_t L = bt.s - (bt.q - 1 - i);
  return {std::max<int64_t>(0, L - window), L};
}

}  // namespace nsa::paged_window
