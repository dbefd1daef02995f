// Argument rules of docs/spec/decode.md §9 (paged_window_attention: "as §4": required block table and lengths,
// valid pages, errors naming the argument). No entry point writes anything when this fails. Only what the call
// reads is checked: the block-table entries of the positions some query token's window covers.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/arg_checks.h"
#include "nsa/paged_window_attention.h"
#include "ops/paged_window_attention/batches.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa {

using detail::arg_error;
using detail::shape_str;

Status validate_paged_window_attention(const PagedWindowAttentionParams& p, PagedWindowAttentionShape* out_shape) {
  Status s;
  if (static_cast<int>(p.dtype) < 0 || static_cast<int>(p.dtype) > 3)
    return arg_error("dtype must be bfloat16, float16, float32 or float64");
  const Tensor3& q = p.query;
  for (int i = 0; i < 3; ++i)
    if (q.size[i] < (i == 0 ? 0 : 1))
      return arg_error("query [T, N1, D] must have sizes >= 1 in dims 1 and 2 (T >= 0), got ", shape_str(q.size, 3));
  if (q.data == nullptr && q.size[0] > 0) return arg_error("query must not be null");
  if (!(s = paged::check_cache(p.key_cache, "key_cache", "[num_pages, P, N2, D]")).ok()) return s;
  if (!(s = paged::check_cache(p.value_cache, "value_cache", "[num_pages, P, N2, Dv]")).ok()) return s;

  PagedWindowAttentionShape sh;
  sh.T = q.size[0];
  sh.N1 = q.size[1];
  sh.D = q.size[2];
  sh.num_pages = p.key_cache.size[0];
  sh.page = p.key_cache.size[1];
  sh.N2 = p.key_cache.size[2];
  sh.Dv = p.value_cache.size[3];
  if (p.key_cache.size[3] != sh.D)
    return arg_error("key_cache must have the head dim D of query (", sh.D, "), got ", p.key_cache.size[3]);
  for (int i = 0; i < 3; ++i)
    if (p.value_cache.size[i] != p.key_cache.size[i])
      return arg_error("value_cache must have the pages, page size and heads of key_cache ",
                       shape_str(p.key_cache.size, 3), ", got ", shape_str(p.value_cache.size, 3));
  if (sh.N1 % sh.N2 != 0)
    return arg_error("the number of query heads (", sh.N1, ") must be a multiple of the number of key/value heads "
                     "key_cache.size(2) = ", sh.N2);
  sh.G = sh.N1 / sh.N2;
  if (p.window < 1) return arg_error("window must be >= 1 (the positions a query token sees, itself included), got ",
                                     p.window);
  if (!std::isfinite(p.scale) || !std::isfinite(static_cast<float>(p.scale)))
    return arg_error("scale must be finite (as a float32 too), got ", p.scale);

  const Tensor2& bt = p.block_table;
  if (bt.data == nullptr) return arg_error("block_table must be given: an int32 tensor [B, max_pages]");
  if (bt.size[0] < 1 || bt.size[1] < 1)
    return arg_error("block_table must be non-empty [B, max_pages], got ", shape_str(bt.size, 2));
  if (p.seq_lens.data == nullptr)
    return arg_error("seq_lens must be given: the per-batch raw lengths S_b (this step's tokens included)");
  sh.B = p.seq_lens.size;
  if (sh.B < 1) return arg_error("seq_lens must have one entry per batch (B >= 1), got none");
  if (bt.size[0] != sh.B)
    return arg_error("block_table must have one row per batch (B = len(seq_lens) = ", sh.B, "), got ", bt.size[0],
                     " rows");
  sh.max_pages = bt.size[1];
  if (p.query_lens.data != nullptr && p.query_lens.size != sh.B)
    return arg_error("query_lens must have one entry per batch (B = ", sh.B, "), got ", p.query_lens.size);
  int64_t total_q = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t qb = paged_window::q_len(p, b), sb = p.seq_lens.data[b];
    if (qb < 1) return arg_error("query_lens[", b, "] must be >= 1 (q_b, this step's query tokens), got ", qb);
    if (sb < qb)
      return arg_error("seq_lens[", b, "] = ", sb, " must be >= q_b = ", qb, " (S_b counts this step's query tokens)");
    total_q += qb;
  }
  if (total_q != sh.T)
    return arg_error("query must have sum(query_lens) = ", total_q, " rows (one per query token), got T = ", sh.T);

  // the pages of every query token's window
  const std::vector<paged_window::Batch> batches = paged_window::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const paged_window::Batch& bb = batches[static_cast<size_t>(b)];
    for (int64_t i = 0; i < bb.q; ++i) {
      const paged::Run r = paged_window::token_window(bb, i, p.window);
      if (!(s = paged::check_pages(bt, b, r.start, r.end, sh.page, sh.num_pages, "query row", bb.row0 + i)).ok())
        return s;
      sh.max_entries = std::max(sh.max_entries, r.end - r.start);
    }
  }
  if (sh.T > 0 && p.attention_out == nullptr) return arg_error("attention_out must not be null");
  if (out_shape) *out_shape = sh;
  return Status::Ok();
}

}  // namespace nsa
