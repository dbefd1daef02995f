// Argument checks of the selected attention shared by select_attention (docs/spec/select_attention.md §7) and its
// decode form select_attention_infer (docs/spec/decode.md §4): the selection block size and count, the shape of
// topk_indices and the message of an index out of range. Header-only, so that either operator builds without the
// other.
#pragma once

#include <cstdint>
#include <string>

#include "common/arg_checks.h"
#include "nsa/common.h"

namespace nsa::select_detail {

// select_block_size l' >= 1 (positions per selection block) and select_block_count K >= 1 (slots per row).
inline Status check_selection(int64_t select_block_size, int64_t select_block_count) {
  if (select_block_size < 1) return detail::arg_error("select_block_size must be >= 1, got ", select_block_size);
  if (select_block_count < 1) return detail::arg_error("select_block_count must be >= 1, got ", select_block_count);
  return Status::Ok();
}

// topk_indices [T, N2, K]: K slots per (query row, KV head); `layout` names the dims in the message ("[T1, N2, K]").
// Its data may be null only when there is no row (T = 0).
inline Status check_topk_indices(const Tensor3& ti, const char* layout, int64_t T, int64_t N2, int64_t K) {
  if (ti.size[2] != K)
    return detail::arg_error("topk_indices must have select_block_count = ", K, " as its last dimension, got shape ",
                             detail::shape_str(ti.size, 3));
  const std::string what = std::string("have shape ") + layout;
  Status s = detail::check_sizes3(ti, "topk_indices", what.c_str(), T, N2, K);
  if (s.ok() && ti.data == nullptr && T > 0) return detail::arg_error("topk_indices must not be null");
  return s;
}

// The error of index x = topk_indices[t][n2][j] outside {-1} u [0, blocks): query row t belongs to batch b whose
// `len` keys (`unit`: "keys", "positions") form blocks = ceil(len / block) selection blocks.
inline Status index_range_error(int64_t t, int64_t n2, int64_t j, int64_t x, int64_t b, int64_t len, const char* unit,
                                int64_t block, int64_t blocks) {
  return detail::arg_error("topk_indices[", t, "][", n2, "][", j, "] = ", x, " is out of range: query row ", t,
                           " belongs to batch ", b, " whose ", len, " ", unit, " form ceil(", len, " / ", block,
                           ") = ", blocks, " blocks, so an index must be -1 (empty slot) or in [0, ", blocks, ")");
}

}  // namespace nsa::select_detail
