// Query-row bookkeeping of npu_nsa_compress_attention_infer (internal; docs/spec/decode.md §3): q_b per batch and
// where token i of batch b lives in the query view and in the outputs for the two layouts. TND: query view
// [1, T, N1, D], token i of batch b is row q_off_b + i of the query and of the outputs [T, ...]. BSND: query view
// [B, Sq, N1, D], row (b, i), output row b * Sq + i; rows i >= q_b of a batch are padding (zero attention_out,
// indices -1).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "nsa/common.h"
#include "nsa/compress_attention_infer.h"

namespace nsa {

struct DecodeRows {
  bool bsnd = false;
  int64_t Sq = 1;
  std::vector<int64_t> q, q_off;  // per batch: q_b and (TND) the first row of batch b

  // element offset of query row (b, i), head 0, element 0
  int64_t query_offset(const CompressAttentionInferParams& p, int64_t b, int64_t i) const {
    return bsnd ? b * p.query_stride[0] + i * p.query_stride[1] : (q_off[static_cast<size_t>(b)] + i) * p.query_stride[1];
  }
  // output row of (b, i): attention_out row [.., N1, Dv], topk_indices row [.., N2, K]
  int64_t out_row(int64_t b, int64_t i) const { return bsnd ? b * Sq + i : q_off[static_cast<size_t>(b)] + i; }

  // BSND rows i in [q_b, Sq): zero attention_out and -1 topk_indices (header's decision)
  void clear_padding(const CompressAttentionInferParams& p, const CompressAttentionInferShape& sh) const {
    if (!bsnd) return;
    const size_t esz = dtype_size(p.dtype);
    for (int64_t b = 0; b < sh.B; ++b)
      for (int64_t i = q[static_cast<size_t>(b)]; i < Sq; ++i) {
        const int64_t r = out_row(b, i);
        std::memset(static_cast<unsigned char*>(p.attention_out) + r * sh.N1 * sh.Dv * static_cast<int64_t>(esz), 0,
                    static_cast<size_t>(sh.N1 * sh.Dv) * esz);  // +0.0 in every dtype
        std::fill(p.topk_indices + r * sh.N2 * sh.K, p.topk_indices + (r + 1) * sh.N2 * sh.K, -1);
      }
  }
};

// The rows of a validated call.
inline DecodeRows decode_rows(const CompressAttentionInferParams& p, const CompressAttentionInferShape& sh) {
  DecodeRows r;
  r.bsnd = p.layout == DecodeLayout::kBSND;
  r.Sq = sh.Sq;
  r.q.resize(static_cast<size_t>(sh.B));
  r.q_off.resize(static_cast<size_t>(sh.B));
  int64_t off = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t q = p.actual_seq_qlen.data != nullptr ? p.actual_seq_qlen.data[b] : 1;
    r.q[static_cast<size_t>(b)] = q;
    r.q_off[static_cast<size_t>(b)] = off;
    off += q;
  }
  return r;
}

}  // namespace nsa
