// Argument checks shared by the paged decode attention operators select_attention_infer (docs/spec/decode.md §4)
// and paged_window_attention (§9): the query, the two caches, the scale, the block table with its length list, and
// one batch's query / raw lengths. Header-only (beside paged.h's check_cache and check_pages), so that either
// operator builds without the other. Every failure names the argument and what was expected.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/arg_checks.h"
#include "nsa/common.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa::paged {

// The element type of query, caches and output, query [T, N1, D] (T >= 0 query tokens, N1 >= 1 heads, D >= 1) and
// the caches key [num_pages, P, N2, D] and value [num_pages, P, N2, Dv] (`key_name`, `value_name`: the operator's
// argument names). The value cache has the pages, page size and heads of the key cache. On success fills T, N1, D,
// num_pages, page (P), N2 and Dv of *sh (a SelectAttentionInferShape or PagedWindowAttentionShape).
template <typename Shape>
Status check_query_and_caches(DType dtype, const Tensor3& q, const PagedCacheView& key, const PagedCacheView& value,
                              const char* key_name, const char* value_name, Shape* sh) {
  Status s = detail::check_dtype(dtype);
  if (!s.ok()) return s;
  for (int i = 0; i < 3; ++i)
    if (q.size[i] < (i == 0 ? 0 : 1))
      return detail::arg_error("query [T, N1, D] must have sizes >= 1 in dims 1 and 2 (T >= 0), got ",
                               detail::shape_str(q.size, 3));
  if (q.data == nullptr && q.size[0] > 0) return detail::arg_error("query must not be null");
  if (!(s = check_cache(key, key_name, "[num_pages, P, N2, D]")).ok()) return s;
  if (!(s = check_cache(value, value_name, "[num_pages, P, N2, Dv]")).ok()) return s;
  if (key.size[3] != q.size[2])
    return detail::arg_error(key_name, " must have the head dim D of query (", q.size[2], "), got ", key.size[3]);
  for (int i = 0; i < 3; ++i)
    if (value.size[i] != key.size[i])
      return detail::arg_error(value_name, " must have the pages, page size and heads of ", key_name, " ",
                               detail::shape_str(key.size, 3), ", got ", detail::shape_str(value.size, 3));
  sh->T = q.size[0];
  sh->N1 = q.size[1];
  sh->D = q.size[2];
  sh->num_pages = key.size[0];
  sh->page = key.size[1];
  sh->N2 = key.size[2];
  sh->Dv = value.size[3];
  return Status::Ok();
}

// The softmax scale: finite, in float64 and once rounded to float32 (the scores are fp32).
inline Status check_decode_scale(double scale, const char* name) {
  if (!std::isfinite(scale) || !std::isfinite(static_cast<float>(scale)))
    return detail::arg_error(name, " must be finite (as a float32 too), got ", scale);
  return Status::Ok();
}

// block_table [B, max_pages] (int32 page numbers, required, non-empty) and the required list of the B per-batch raw
// lengths S_b (`lens_name`), one row of the table per batch. On success fills B and max_pages of *sh.
template <typename Shape>
Status check_block_table(const Tensor2& bt, const IntList& lens, const char* lens_name, Shape* sh) {
  if (bt.data == nullptr) return detail::arg_error("block_table must be given: an int32 tensor [B, max_pages]");
  if (bt.size[0] < 1 || bt.size[1] < 1)
    return detail::arg_error("block_table must be non-empty [B, max_pages], got ", detail::shape_str(bt.size, 2));
  if (lens.data == nullptr)
    return detail::arg_error(lens_name,
                             " must be given: the per-batch raw lengths S_b (this step's tokens included)");
  if (lens.size < 1) return detail::arg_error(lens_name, " must have one entry per batch (B >= 1), got none");
  if (bt.size[0] != lens.size)
    return detail::arg_error("block_table must have one row per batch (B = len(", lens_name, ") = ", lens.size,
                             "), got ", bt.size[0], " rows");
  sh->B = lens.size;
  sh->max_pages = bt.size[1];
  return Status::Ok();
}

// Batch b's query token count q_b >= 1 (`q_name`[b], this step's tokens).
inline Status check_query_len(int64_t b, int64_t qb, const char* q_name) {
  if (qb < 1) return detail::arg_error(q_name, "[", b, "] must be >= 1 (q_b, this step's query tokens), got ", qb);
  return Status::Ok();
}

// Batch b's raw length S_b = `s_name`[b] counts its q_b query tokens: S_b >= q_b.
inline Status check_seq_len(int64_t b, int64_t sb, int64_t qb, const char* s_name) {
  if (sb < qb)
    return detail::arg_error(s_name, "[", b, "] = ", sb, " must be >= q_b = ", qb,
                             " (S_b counts this step's query tokens)");
  return Status::Ok();
}

}  // namespace nsa::paged
