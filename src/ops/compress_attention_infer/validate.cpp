// Argument rules of docs/spec/decode.md §3 (npu_nsa_compress_attention_infer). Every failure names the argument and
// what was expected; no entry point writes anything when this fails. Pages are checked for the compressed tokens
// the call reads (c < C_b); S_b only where it is read (MTP causality: atten_mask given and some q_b > 1).
#include <algorithm>

#include "common/arg_checks.h"
#include "nsa/compress_attention_infer.h"

namespace nsa {

using detail::arg_error;
using detail::shape_str;

Status validate_compress_attention_infer(const CompressAttentionInferParams& p, CompressAttentionInferShape* shape) {
  CompressAttentionInferShape sh;
  const bool bsnd = p.layout == DecodeLayout::kBSND;
  if (p.layout != DecodeLayout::kTND && !bsnd) return arg_error("layout must be \"TND\" or \"BSND\"");
  for (int i = 0; i < 4; ++i)
    if (p.query_size[i] < 0) return arg_error("query sizes must be >= 0, got ", shape_str(p.query_size, 4));
  for (int i = 0; i < 3; ++i) {
    if (p.key.size[i] < 0) return arg_error("key sizes must be >= 0, got ", shape_str(p.key.size, 3));
    if (p.value.size[i] < 0) return arg_error("value sizes must be >= 0, got ", shape_str(p.value.size, 3));
  }
  if (!bsnd && p.query_size[0] != 1)
    return arg_error("query (TND) must be passed as the view [1, T, N1, D], got ", shape_str(p.query_size, 4));
  sh.N1 = p.query_size[2];
  sh.D = p.query_size[3];
  sh.Sq = bsnd ? p.query_size[1] : 1;
  // §3 "Kept": head counts
  if (p.head_num != sh.N1)
    return arg_error("head_num (", p.head_num, ") must equal the number of query heads N1 = query.shape[-2] (", sh.N1, ")");
  if (p.key_value_head_num < 1) return arg_error("key_value_head_num must be >= 1, got ", p.key_value_head_num);
  sh.N2 = p.key_value_head_num;
  if (sh.N1 % sh.N2 != 0)
    return arg_error("head_num (", sh.N1, ") must be a multiple of key_value_head_num (", sh.N2, ")");
  sh.G = sh.N1 / sh.N2;
  if (sh.D < 1) return arg_error("query's head dim D must be >= 1, got ", sh.D);
  if (p.key.size[2] != sh.N2 * sh.D)
    return arg_error("key must have shape [num_pages, page_block_size, N2 * D] with N2 * D = ", sh.N2, " * ", sh.D,
                     " = ", sh.N2 * sh.D, " in its last dim, got ", shape_str(p.key.size, 3));
  if (p.value.size[2] % sh.N2 != 0 || p.value.size[2] == 0)
    return arg_error("value must have shape [num_pages, page_block_size, N2 * Dv]: its last dim (", p.value.size[2],
                     ") must be a positive multiple of key_value_head_num (", sh.N2, ")");
  sh.Dv = p.value.size[2] / sh.N2;
  if (sh.Dv > sh.D) return arg_error("value's head dim Dv (", sh.Dv, ") must be <= query's head dim D (", sh.D, ")");
  if (p.key.size[0] != p.value.size[0] || p.key.size[1] != p.value.size[1])
    return arg_error("key and value must have the same [num_pages, page_block_size], got key ", shape_str(p.key.size, 3),
                     " and value ", shape_str(p.value.size, 3));
  if (p.page_block_size < 1) return arg_error("page_block_size must be >= 1, got ", p.page_block_size);
  if (p.key.size[1] != p.page_block_size)
    return arg_error("page_block_size (", p.page_block_size, ") must equal key.shape[1] (the rows per page of key ",
                     shape_str(p.key.size, 3), ")");
  sh.num_pages = p.key.size[0];
  sh.P = p.page_block_size;
  // block sizes: d <= l <= l', l' % d == 0, K >= 1 (§3 "Wider")
  const int64_t l = p.compress_block_size, d = p.compress_stride, lp = p.select_block_size;
  if (d < 1) return arg_error("compress_stride must be >= 1, got ", d);
  if (l < d) return arg_error("compress_block_size (", l, ") must be >= compress_stride (", d, ")");
  if (lp < l) return arg_error("select_block_size (", lp, ") must be >= compress_block_size (", l, ")");
  if (lp % d != 0)
    return arg_error("select_block_size (", lp, ") must be a multiple of compress_stride (", d, ")");
  if (p.select_block_count < 1) return arg_error("select_block_count must be >= 1, got ", p.select_block_count);
  sh.l = l;
  sh.d = d;
  sh.lp = lp;
  sh.K = p.select_block_count;
  sh.M = lp / d;
  sh.N = l / d;

  // tables and lengths
  if (p.actual_cmp_seq_kvlen.data == nullptr)
    return arg_error("actual_cmp_seq_kvlen must be given: the B per-batch compressed lengths C_b (not prefix sums)");
  if (p.block_table == nullptr)
    return arg_error("block_table must be given: [B, max_pages] int32 pages of the compressed cache");
  const int64_t B = p.actual_cmp_seq_kvlen.size;
  if (B < 1) return arg_error("actual_cmp_seq_kvlen must have at least one element (one per batch)");
  sh.B = B;
  if (p.block_table_rows != B)
    return arg_error("block_table must have B = ", B, " rows (one per batch of actual_cmp_seq_kvlen), got ",
                     p.block_table_rows);
  if (p.block_table_cols < 0) return arg_error("block_table must have >= 0 columns, got ", p.block_table_cols);
  sh.max_pages = p.block_table_cols;
  const bool has_q = p.actual_seq_qlen.data != nullptr;
  if (has_q && p.actual_seq_qlen.size != B)
    return arg_error("actual_seq_qlen must have B = ", B, " entries (one per batch of actual_cmp_seq_kvlen), got ",
                     p.actual_seq_qlen.size);
  int64_t total_q = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q = has_q ? p.actual_seq_qlen.data[b] : 1;
    if (q < 1) return arg_error("actual_seq_qlen[", b, "] must be >= 1 (query tokens of batch ", b, "), got ", q);
    if (bsnd && q > sh.Sq)
      return arg_error("actual_seq_qlen[", b, "] (", q, ") must be <= Sq = query.shape[1] (", sh.Sq, ") for layout BSND");
    total_q += q;
    sh.max_q = std::max(sh.max_q, q);
  }
  if (bsnd) {
    if (p.query_size[0] != B)
      return arg_error("query (BSND) must have B = ", B, " batches in dim 0 (the entries of actual_cmp_seq_kvlen), got ",
                       shape_str(p.query_size, 4));
    if (!has_q && sh.Sq != 1)
      return arg_error("actual_seq_qlen must be given for layout BSND when Sq = query.shape[1] (", sh.Sq,
                       ") is not 1");
    sh.rows = B * sh.Sq;
  } else {
    if (p.query_size[1] != total_q)
      return arg_error("query (TND) must have T = ", has_q ? "sum(actual_seq_qlen) = " : "B (one token per batch) = ",
                       total_q, " rows, got T = ", p.query_size[1]);
    sh.rows = total_q;
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t C = p.actual_cmp_seq_kvlen.data[b];
    if (C < 1) return arg_error("actual_cmp_seq_kvlen[", b, "] must be >= 1 (compressed tokens of batch ", b, "), got ", C);
    sh.max_c = std::max(sh.max_c, C);
    sh.max_sel = std::max(sh.max_sel, decode_selection_blocks(C, l, d, lp));
  }
  // MTP causality (§3 step 3): S_b is read, and must agree with C_b
  sh.mtp = p.has_atten_mask && sh.max_q > 1;
  if (sh.mtp) {
    if (p.actual_sel_seq_kvlen.data == nullptr)
      return arg_error("actual_sel_seq_kvlen must be given (the B raw lengths S_b) when atten_mask is given and some "
                       "actual_seq_qlen[b] > 1 (MTP causality)");
    if (p.actual_sel_seq_kvlen.size != B)
      return arg_error("actual_sel_seq_kvlen must have B = ", B, " entries, got ", p.actual_sel_seq_kvlen.size);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t S = p.actual_sel_seq_kvlen.data[b], q = has_q ? p.actual_seq_qlen.data[b] : 1;
      const int64_t C = p.actual_cmp_seq_kvlen.data[b];
      if (S < q)
        return arg_error("actual_sel_seq_kvlen[", b, "] (", S, ") must be >= actual_seq_qlen[", b, "] (", q,
                         "): S_b counts this step's query tokens");
      if (S < l || (S - l) / d + 1 != C)
        return arg_error("actual_cmp_seq_kvlen[", b, "] (", C, ") must equal (S_b - l) / d + 1 = ",
                         S < l ? int64_t(0) : (S - l) / d + 1, " for actual_sel_seq_kvlen[", b, "] = ", S,
                         " (MTP causality needs consistent lengths)");
    }
  }
  // pages of the compressed tokens c < C_b
  for (int64_t b = 0; b < B; ++b) {
    const int64_t C = p.actual_cmp_seq_kvlen.data[b], last = (C - 1) / sh.P;
    if (last >= sh.max_pages)
      return arg_error("block_table has max_pages = ", sh.max_pages, " columns, but batch ", b, " has C_b = ", C,
                       " compressed tokens which need page index ", last, " (page_block_size ", sh.P, ")");
    const int32_t* row = p.block_table + b * p.block_table_row_stride;
    for (int64_t i = 0; i <= last; ++i)
      if (row[i] < 0 || row[i] >= sh.num_pages)
        return arg_error("block_table[", b, ", ", i, "] = ", row[i], " must be a page of key/value in [0, ",
                         sh.num_pages, ") (batch ", b, " reads compressed tokens [0, ", C, "))");
  }
  if (p.query == nullptr && sh.rows > 0) return arg_error("query must not be null");
  if (p.key.data == nullptr || p.value.data == nullptr) return arg_error("key and value must not be null");
  if (p.attention_out == nullptr) return arg_error("attention_out must not be null");
  if (p.topk_indices == nullptr) return arg_error("topk_indices must not be null");
  return detail::publish_shape(Status::Ok(), sh, shape);
}

}  // namespace nsa
