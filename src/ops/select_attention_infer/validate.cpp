// Argument rules of docs/spec/decode.md §4 (select_attention_infer). Every failure names the argument and what was
// expected; no entry point writes anything when this fails (each calls it before its first write). Only what the
// call reads is checked (§4 "What is validated"): the indices of the rows q_b covers, and the block-table entries
// of the positions those rows' slots reach.
#include <string>
#include <vector>

#include "common/arg_checks.h"
#include "nsa/select_attention_infer.h"
#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention/validate.h"
#include "ops/select_attention_infer/paged.h"
#include "ops/select_attention_infer/paged_checks.h"

namespace nsa {

using detail::arg_error;

Status validate_select_attention_infer(const SelectAttentionInferParams& p, SelectAttentionInferShape* out_shape) {
  SelectAttentionInferShape sh;
  Status s = paged::check_query_and_caches(p.dtype, p.query, p.key, p.value, "key", "value", &sh);
  if (!s.ok()) return s;
  if (p.head_num != sh.N1)
    return arg_error("head_num must equal the number of query heads N1 = ", sh.N1, ", got ", p.head_num);
  if (p.key_value_head_num != sh.N2)
    return arg_error("key_value_head_num must equal the number of key/value heads of key N2 = ", sh.N2, ", got ",
                     p.key_value_head_num);
  if (sh.N1 % sh.N2 != 0)
    return arg_error("head_num (", sh.N1, ") must be a multiple of key_value_head_num (", sh.N2, ")");
  sh.G = sh.N1 / sh.N2;
  if (p.page_block_size != sh.page)
    return arg_error("page_block_size must equal the page size of key (key.size(1) = ", sh.page, "), got ",
                     p.page_block_size);
  if (!(s = select_detail::check_selection(p.select_block_size, p.select_block_count)).ok()) return s;
  sh.block = p.select_block_size;
  sh.K = p.select_block_count;
  if (!(s = select_detail::check_topk_indices(p.topk_indices, "[T, N2, K]", sh.T, sh.N2, sh.K)).ok()) return s;
  if (!(s = paged::check_decode_scale(p.scale_value, "scale_value")).ok()) return s;

  // block table and lengths (§4: both required, per batch)
  const Tensor2& bt = p.block_table;
  if (!(s = paged::check_block_table(bt, p.actual_seq_kvlen, "actual_seq_kvlen", &sh)).ok()) return s;
  if (p.batch_rows < 0) return arg_error("batch_rows must be >= 0, got ", p.batch_rows);
  if (p.actual_seq_qlen.data == nullptr) {
    if (p.batch_rows == 0)
      return arg_error("actual_seq_qlen must be given for layout TND: the per-batch query counts q_b");
  } else if (p.actual_seq_qlen.size != sh.B) {
    return arg_error("actual_seq_qlen must have one entry per batch (B = ", sh.B, "), got ", p.actual_seq_qlen.size);
  }
  int64_t total_q = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t qb = select_infer::q_len(p, b), sb = p.actual_seq_kvlen.data[b];
    if (!(s = paged::check_query_len(b, qb, "actual_seq_qlen")).ok()) return s;
    if (p.batch_rows > 0 && qb > p.batch_rows)
      return arg_error("actual_seq_qlen[", b, "] = ", qb, " must be <= the query rows per batch Sq = ", p.batch_rows);
    if (!(s = paged::check_seq_len(b, sb, qb, "actual_seq_kvlen")).ok()) return s;
    total_q += qb;
  }
  if (p.batch_rows == 0 && total_q != sh.T)
    return arg_error("actual_seq_qlen must sum to the query rows T = ", sh.T, " (layout TND), got ", total_q);
  if (p.batch_rows > 0 && sh.B * p.batch_rows != sh.T)
    return arg_error("query must have B = ", sh.B, " batches of Sq = ", p.batch_rows, " rows, got T = ", sh.T);

  // every index of the rows q_b covers, and the pages its entries need
  std::vector<paged::Run> runs;
  const std::vector<select_infer::Batch> batches = select_infer::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const select_infer::Batch& bb = batches[static_cast<size_t>(b)];
    const int64_t blocks = detail::ceil_div(bb.s, sh.block);
    for (int64_t i = 0; i < bb.q; ++i) {
      const int64_t t = bb.row0 + i;
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        for (int64_t j = 0; j < sh.K; ++j) {
          const int64_t x = select_infer::index_at(p, t, n2, j);
          if (x < -1 || x >= blocks)
            return select_detail::index_range_error(t, n2, j, x, b, bb.s, "positions", sh.block, blocks);
        }
        select_infer::token_runs(p, bb, i, n2, runs);
        int64_t ne = 0;
        for (const paged::Run& r : runs) {
          if (!(s = paged::check_pages(bt, b, r.start, r.end, sh.page, sh.num_pages, "query row", t)).ok()) return s;
          ne += r.end - r.start;
        }
        sh.max_entries = ne > sh.max_entries ? ne : sh.max_entries;
      }
    }
  }
  if (sh.T > 0 && p.attention_out == nullptr) return arg_error("attention_out must not be null");
  return detail::publish_shape(Status::Ok(), sh, out_shape);
}

}  // namespace nsa
