// Argument rules of docs/spec/decode.md §9 (paged_window_attention: "as §4": required block table and lengths,
// valid pages, errors naming the argument). No entry point writes anything when this fails. Only what the call
// reads is checked: the block-table entries of the positions some query token's window covers.
#include <algorithm>
#include <vector>

#include "common/arg_checks.h"
#include "nsa/paged_window_attention.h"
#include "ops/paged_window_attention/batches.h"
#include "ops/select_attention_infer/paged.h"
#include "ops/select_attention_infer/paged_checks.h"

namespace nsa {

using detail::arg_error;

Status validate_paged_window_attention(const PagedWindowAttentionParams& p, PagedWindowAttentionShape* out_shape) {
  PagedWindowAttentionShape sh;
  Status s =
      paged::check_query_and_caches(p.dtype, p.query, p.key_cache, p.value_cache, "key_cache", "value_cache", &sh);
  if (!s.ok()) return s;
  if (sh.N1 % sh.N2 != 0)
    return arg_error("the number of query heads (", sh.N1, ") must be a multiple of the number of key/value heads "
                     "key_cache.size(2) = ", sh.N2);
  sh.G = sh.N1 / sh.N2;
  if (p.window < 1) return arg_error("window must be >= 1 (the positions a query token sees, itself included), got ",
                                     p.window);
  if (!(s = paged::check_decode_scale(p.scale, "scale")).ok()) return s;

  const Tensor2& bt = p.block_table;
  if (!(s = paged::check_block_table(bt, p.seq_lens, "seq_lens", &sh)).ok()) return s;
  if (p.query_lens.data != nullptr && p.query_lens.size != sh.B)
    return arg_error("query_lens must have one entry per batch (B = ", sh.B, "), got ", p.query_lens.size);
  int64_t total_q = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t qb = paged_window::q_len(p, b), sb = p.seq_lens.data[b];
    if (!(s = paged::check_query_len(b, qb, "query_lens")).ok()) return s;
    if (!(s = paged::check_seq_len(b, sb, qb, "seq_lens")).ok()) return s;
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
  return detail::publish_shape(Status::Ok(), sh, out_shape);
}

}  // namespace nsa
