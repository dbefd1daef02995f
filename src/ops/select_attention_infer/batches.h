// Per-batch bookkeeping of select_attention_infer (docs/spec/decode.md §4), shared by the argument checks, the
// reference and the CPU backend (internal).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nsa/select_attention_infer.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa::select_infer {

struct Batch {
  int64_t row0 = 0;  // first query row of the batch in query / topk_indices / attention_out
  int64_t rows = 0;  // rows the batch owns: q_b (packed) or Sq (batch-major; rows >= q_b are zeros)
  int64_t q = 0;     // q_b
  int64_t s = 0;     // S_b
};

// q_b of batch b: actual_seq_qlen[b], or Sq (batch-major without actual_seq_qlen).
inline int64_t q_len(const SelectAttentionInferParams& p, int64_t b) {
  return p.actual_seq_qlen.data != nullptr ? p.actual_seq_qlen.data[b] : p.batch_rows;
}

// The batches of a call whose lengths have been checked (B = actual_seq_kvlen.size).
inline std::vector<Batch> make_batches(const SelectAttentionInferParams& p) {
  std::vector<Batch> out(static_cast<size_t>(p.actual_seq_kvlen.size));
  int64_t row = 0;
  for (size_t b = 0; b < out.size(); ++b) {
    Batch& bt = out[b];
    bt.q = q_len(p, static_cast<int64_t>(b));
    bt.s = p.actual_seq_kvlen.data[b];
    bt.rows = p.batch_rows > 0 ? p.batch_rows : bt.q;
    bt.row0 = row;
    row += bt.rows;
  }
  return out;
}

// topk_indices[t][n2][j] as int64.
inline int64_t index_at(const SelectAttentionInferParams& p, int64_t t, int64_t n2, int64_t j) {
  const Tensor3& x = p.topk_indices;
  const int64_t off = t * x.stride[0] + n2 * x.stride[1] + j * x.stride[2];
  return p.index_int64 ? static_cast<const int64_t*>(x.data)[off] : static_cast<const int32_t*>(x.data)[off];
}

// §4 step 1: the positions query token i of batch bt sees through its slots (KV head n2), one run per slot
// with an entry, in slot order: slot x covers [x l', min((x + 1) l', L_i)), L_i = S_b - (q_b - 1 - i); -1 slots
// are empty wherever they appear.
inline void token_runs(const SelectAttentionInferParams& p, const Batch& bt, int64_t i, int64_t n2,
                       std::vector<paged::Run>& runs) {
  runs.clear();
  const int64_t L = bt.s - (bt.q - 1 - i), lp = p.select_block_size;
  for (int64_t j = 0; j < p.select_block_count; ++j) {
    const int64_t x = index_at(p, bt.row0 + i, n2, j);
    if (x == -1) continue;
    const int64_t start = x * lp, end = std::min(start + lp, L);
    if (start < end) runs.push_back({start, end});
  }
}

}  // namespace nsa::select_infer
