// Argument rules of docs/spec/decode.md §4 (select_attention_infer). Every failure names the argument and what was
// expected; no entry point writes anything when this fails (each calls it before its first write). Only what the
// call reads is checked (§4 "What is validated"): the indices of the rows q_b covers, and the block-table entries
// of the positions those rows' slots reach.
#include <cmath>
#include <string>
#include <vector>

#include "common/arg_checks.h"
#include "nsa/select_attention_infer.h"
#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa {

using detail::arg_error;
using detail::shape_str;

Status validate_select_attention_infer(const SelectAttentionInferParams& p, SelectAttentionInferShape* out_shape) {
  Status s;
  if (static_cast<int>(p.dtype) < 0 || static_cast<int>(p.dtype) > 3)
    return arg_error("dtype must be bfloat16, float16, float32 or float64");
  const Tensor3& q = p.query;
  for (int i = 0; i < 3; ++i)
    if (q.size[i] < (i == 0 ? 0 : 1))
      return arg_error("query [T, N1, D] must have sizes >= 1 in dims 1 and 2 (T >= 0), got ", shape_str(q.size, 3));
  if (q.data == nullptr && q.size[0] > 0) return arg_error("query must not be null");
  if (!(s = paged::check_cache(p.key, "key", "[num_pages, P, N2, D]")).ok()) return s;
  if (!(s = paged::check_cache(p.value, "value", "[num_pages, P, N2, Dv]")).ok()) return s;

  SelectAttentionInferShape sh;
  sh.T = q.size[0];
  sh.N1 = q.size[1];
  sh.D = q.size[2];
  sh.num_pages = p.key.size[0];
  sh.page = p.key.size[1];
  sh.N2 = p.key.size[2];
  sh.Dv = p.value.size[3];
  if (p.key.size[3] != sh.D)
    return arg_error("key must have the head dim D of query (", sh.D, "), got ", p.key.size[3]);
  for (int i = 0; i < 3; ++i)
    if (p.value.size[i] != p.key.size[i])
      return arg_error("value must have the pages, page size and heads of key ", shape_str(p.key.size, 3),
                       ", got ", shape_str(p.value.size, 3));
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
  if (p.select_block_size < 1) return arg_error("select_block_size must be >= 1, got ", p.select_block_size);
  if (p.select_block_count < 1) return arg_error("select_block_count must be >= 1, got ", p.select_block_count);
  sh.block = p.select_block_size;
  sh.K = p.select_block_count;
  const Tensor3& ti = p.topk_indices;
  if (ti.size[2] != sh.K)
    return arg_error("topk_indices must have select_block_count = ", sh.K, " as its last dimension, got shape ",
                     shape_str(ti.size, 3));
  if (ti.size[0] != sh.T || ti.size[1] != sh.N2)
    return arg_error("topk_indices must have shape [T, N2, K] = [", sh.T, ", ", sh.N2, ", ", sh.K, "], got ",
                     shape_str(ti.size, 3));
  if (ti.data == nullptr && sh.T > 0) return arg_error("topk_indices must not be null");
  if (!std::isfinite(p.scale_value) || !std::isfinite(static_cast<float>(p.scale_value)))
    return arg_error("scale_value must be finite (as a float32 too), got ", p.scale_value);

  // block table and lengths (§4: both required, per batch)
  const Tensor2& bt = p.block_table;
  if (bt.data == nullptr) return arg_error("block_table must be given: an int32 tensor [B, max_pages]");
  if (bt.size[0] < 1 || bt.size[1] < 1)
    return arg_error("block_table must be non-empty [B, max_pages], got ", shape_str(bt.size, 2));
  if (p.actual_seq_kvlen.data == nullptr)
    return arg_error("actual_seq_kvlen must be given: the per-batch raw lengths S_b (this step's tokens included)");
  sh.B = p.actual_seq_kvlen.size;
  if (sh.B < 1) return arg_error("actual_seq_kvlen must have one entry per batch (B >= 1), got none");
  if (bt.size[0] != sh.B)
    return arg_error("block_table must have one row per batch (B = len(actual_seq_kvlen) = ", sh.B, "), got ",
                     bt.size[0], " rows");
  sh.max_pages = bt.size[1];
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
    if (qb < 1) return arg_error("actual_seq_qlen[", b, "] must be >= 1 (q_b, this step's query tokens), got ", qb);
    if (p.batch_rows > 0 && qb > p.batch_rows)
      return arg_error("actual_seq_qlen[", b, "] = ", qb, " must be <= the query rows per batch Sq = ", p.batch_rows);
    if (sb < qb)
      return arg_error("actual_seq_kvlen[", b, "] = ", sb, " must be >= q_b = ", qb,
                       " (S_b counts this step's query tokens)");
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
          if (x != -1 && (x < 0 || x >= blocks))
            return arg_error("topk_indices[", t, "][", n2, "][", j, "] = ", x, " is out of range: query row ", t,
                             " belongs to batch ", b, " whose ", bb.s, " positions form ceil(", bb.s, " / ",
                             sh.block, ") = ", blocks, " blocks, so an index must be -1 (empty slot) or in [0, ",
                             blocks, ")");
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
  if (out_shape) *out_shape = sh;
  return Status::Ok();
}

}  // namespace nsa
