// The §10 causal extension (CompressAttentionParams::causal): the masks of §9 without a [maxSq, maxC] tensor.
//
// atten_mask of §9: entry (s, c) = 1 when c·d + l - 1 > s. It depends on c·d - s only, so it is a strided view of
// one byte row: with row stride -1 and column stride d, entry (s, c) is byte (max_sq - 1) - s + c·d of a buffer of
// max_sq + (max_c - 1)·d bytes, and byte x holds 1 exactly when x > max_sq - l. The backends read this view as they
// read any atten_mask (same values, hence bitwise the results of the materialised mask), in O(T) bytes instead of
// O(T · C).
//
// topk_mask of §9 (the defaults of make_topk_mask): row s forces block 0 and the local blocks s/l' - 1 and s/l'.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "nsa/compress_attention.h"

namespace nsa::detail {

struct CausalMask {
  std::vector<uint8_t> bytes;
  Mask2 view;
};

// The view over [max_sq, max_c] (max_c >= 1).
inline void make_causal_atten_mask(int64_t max_sq, int64_t max_c, int64_t l, int64_t d, CausalMask* out) {
  const int64_t rows = max_sq > 0 ? max_sq : 1;
  const int64_t n = rows + (max_c - 1) * d;
  out->bytes.assign(static_cast<size_t>(n), 0);
  for (int64_t x = 0; x < n; ++x) out->bytes[static_cast<size_t>(x)] = x > rows - l ? 1 : 0;
  out->view.data = out->bytes.data() + (rows - 1);
  out->view.size[0] = max_sq;
  out->view.size[1] = max_c;
  out->view.stride[0] = -1;
  out->view.stride[1] = d;
}

// The blocks §9 forces for query row s: 0, s/l' - 1 and s/l' (the second is -1 for s < l'; the last two may be
// >= Sel_b, and then force nothing).
inline std::array<int64_t, 3> causal_forced_blocks(int64_t s, int64_t select_block_size) {
  const int64_t cur = s / select_block_size;
  return {0, cur - 1, cur};
}

// Whether §9 forces block k (0 <= k < Sel_b) for query row s: k is one of causal_forced_blocks(s, l').
inline bool causal_forced(int64_t s, int64_t k, int64_t select_block_size) {
  const std::array<int64_t, 3> forced = causal_forced_blocks(s, select_block_size);
  return k == forced[0] || k == forced[1] || k == forced[2];
}

// The params the backends run: for causal params, atten_mask replaced by the view (kept in *storage).
inline CompressAttentionParams with_causal_view(const CompressAttentionParams& p, const CompressAttentionShape& sh,
                                                CausalMask* storage) {
  CompressAttentionParams q = p;
  if (p.causal) {
    make_causal_atten_mask(sh.max_sq, sh.max_c, p.compress_block_size, p.compress_stride, storage);
    q.atten_mask = storage->view;
  }
  return q;
}

}  // namespace nsa::detail
