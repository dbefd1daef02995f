// Argument rules of docs/spec/decode.md §2 (npu_nsa_compress_infer). Every failure names the argument and what was
// expected; no entry point writes anything when this fails. Only what the call reads is checked (§4, "What is
// validated"): the pages of the eligible batches' windows and the eligible batches' slots.
#include <algorithm>
#include <utility>
#include <vector>

#include "common/arg_checks.h"
#include "nsa/compress_infer.h"

namespace nsa {

using detail::arg_error;
using detail::shape_str;

Status validate_compress_infer(const CompressInferParams& p, CompressInferShape* shape) {
  CompressInferShape sh;
  for (int i = 0; i < 4; ++i)
    if (p.input_size[i] < 0) return arg_error("input sizes must be >= 0, got ", shape_str(p.input_size, 4));
  for (int i = 0; i < 3; ++i)
    if (p.cache_size[i] < 0) return arg_error("cache sizes must be >= 0, got ", shape_str(p.cache_size, 3));
  sh.num_pages = p.input_size[0];
  sh.P = p.input_size[1];
  sh.N = p.input_size[2];
  sh.D = p.input_size[3];
  sh.num_slots = p.cache_size[0];
  if (p.weight.data == nullptr) return arg_error("weight must not be null");
  if (p.input == nullptr && sh.num_pages * sh.P * sh.N * sh.D != 0) return arg_error("input must not be null");
  if (p.cache == nullptr && sh.num_slots * sh.N * sh.D != 0) return arg_error("cache must not be null");

  // §2 "Kept": l >= d (and the wider rule l >= d >= 1)
  const int64_t l = p.compress_block_size, d = p.compress_stride;
  if (l < 1) return arg_error("compress_block_size must be >= 1, got ", l);
  if (d < 1) return arg_error("compress_stride must be >= 1, got ", d);
  if (d > l) return arg_error("compress_stride (", d, ") must be <= compress_block_size (", l, ")");
  sh.l = l;
  sh.d = d;
  // page_block_size: P = input.shape[1], any P >= 1
  if (p.page_block_size < 1) return arg_error("page_block_size must be >= 1, got ", p.page_block_size);
  if (p.page_block_size != sh.P)
    return arg_error("page_block_size (", p.page_block_size, ") must equal input.shape[1] (the rows per page of input ",
                     shape_str(p.input_size, 4), ")");
  if (p.weight.size[0] != l || p.weight.size[1] != sh.N)
    return arg_error("weight must have shape [compress_block_size, N] = [", l, ", ", sh.N, "], got ",
                     shape_str(p.weight.size, 2));
  if (p.cache_size[1] != sh.N || p.cache_size[2] != sh.D)
    return arg_error("cache must have shape [num_slots, N, D] with [N, D] = [", sh.N, ", ", sh.D,
                     "] (input's last two dims), got ", shape_str(p.cache_size, 3));

  // §2 "Stricter": block_table and actual_seq_len are required; B agrees everywhere
  if (p.actual_seq_len.data == nullptr)
    return arg_error("actual_seq_len must be given: the B per-batch lengths S_b (not prefix sums)");
  if (p.block_table == nullptr)
    return arg_error("block_table must be given: [B, max_pages] int32 page numbers of each batch");
  if (p.slot_mapping == nullptr) return arg_error("slot_mapping must be given: [B] int32 cache rows");
  const int64_t B = p.actual_seq_len.size;
  if (B < 1) return arg_error("actual_seq_len must have at least one element (one per batch)");
  if (p.slot_mapping_size != B)
    return arg_error("slot_mapping must have B = ", B, " entries (one per batch of actual_seq_len), got ",
                     p.slot_mapping_size);
  if (p.block_table_rows != B)
    return arg_error("block_table must have B = ", B, " rows (one per batch of actual_seq_len), got ", p.block_table_rows);
  if (p.block_table_cols < 0) return arg_error("block_table must have >= 0 columns, got ", p.block_table_cols);
  sh.B = B;
  sh.max_pages = p.block_table_cols;
  for (int64_t b = 0; b < B; ++b)
    if (p.actual_seq_len.data[b] < 0)
      return arg_error("actual_seq_len[", b, "] must be >= 0 (a per-batch length), got ", p.actual_seq_len.data[b]);

  // the pages of every eligible batch's window [S_b - l, S_b), then its slot
  std::vector<std::pair<int32_t, int64_t>> slots;  // (slot, batch) of the eligible batches
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = p.actual_seq_len.data[b];
    if (!compress_infer_eligible(S, l, d)) continue;
    const int32_t* row = p.block_table + b * p.block_table_row_stride;
    for (int64_t i = (S - l) / sh.P; i <= (S - 1) / sh.P; ++i) {
      if (i >= sh.max_pages)
        return arg_error("block_table has max_pages = ", sh.max_pages, " columns, but batch ", b, " (S_b = ", S,
                         ") compresses tokens [", S - l, ", ", S, ") which need page index ", i, " (page_block_size ",
                         sh.P, ")");
      const int64_t page = row[i];
      if (page < 0 || page >= sh.num_pages)
        return arg_error("block_table[", b, ", ", i, "] = ", page, " must be a page of input in [0, ", sh.num_pages,
                         ") (batch ", b, " compresses tokens [", S - l, ", ", S, "))");
    }
    const int32_t slot = p.slot_mapping[b];
    if (slot < 0 || slot >= sh.num_slots)
      return arg_error("slot_mapping[", b, "] = ", slot, " must be a row of cache in [0, ", sh.num_slots, ") (batch ",
                       b, " writes a compressed token this step)");
    slots.emplace_back(slot, b);
  }
  std::sort(slots.begin(), slots.end());
  for (size_t i = 1; i < slots.size(); ++i)
    if (slots[i].first == slots[i - 1].first)
      return arg_error("slot_mapping must name distinct cache rows for the batches that write this step, but batches ",
                       slots[i - 1].second, " and ", slots[i].second, " both write row ", slots[i].first);
  sh.eligible = static_cast<int64_t>(slots.size());
  return detail::publish_shape(Status::Ok(), sh, shape);
}

}  // namespace nsa
