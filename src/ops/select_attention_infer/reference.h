// Internal entry points of the select_attention_infer reference (docs/spec/decode.md §4), for the tests and the CPU
// backend's fp64 path. forward_fp32: §4 with float32 arithmetic exactly as stated (the public reference for bf16 /
// fp16 / fp32); forward_fp64: every float32 quantity in float64, the unnormalised P still rounded with rha_T (from
// its float32 value) and the output rounded once as §4 step 4 says: the fp64 model of §6 that tolerances are
// measured against, and the result for fp64 inputs. Defined in reference.cpp (common/reference_entry.h).
// Also the paged-cache rows both decode references (this one and paged_window_attention's) read.
#pragma once

#include <cstdint>
#include <vector>

#include "common/reference_entry.h"
#include "common/reference_rows.h"
#include "nsa/select_attention_infer.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa {
using select_infer_reference = detail::ForwardReference<validate_select_attention_infer>;
}  // namespace nsa

namespace nsa::paged {

// The key and value rows of the entries of one decode row, in entry order (docs/spec/decode.md §4 step 2, §9):
// raw position pos of batch b is row pos % P of page block_table[b, pos / P]; the row of KV head n2 is
// (page, pos % P, n2, 0..) of the cache.
struct EntryRows {
  std::vector<ref::ElemRow> key, value;

  void clear() {
    key.clear();
    value.clear();
  }
  // Appends the positions [r.start, r.end) of batch b, ascending.
  void append(const Tensor2& block_table, int64_t b, const Run& r, int64_t P, const PagedCacheView& key_cache,
              const PagedCacheView& value_cache, int64_t n2) {
    for (int64_t pos = r.start; pos < r.end; ++pos) {
      const int64_t page = table_at(block_table, b, pos / P);
      key.push_back({key_cache.data, cache_offset(key_cache, page, pos % P, n2), key_cache.stride[3]});
      value.push_back({value_cache.data, cache_offset(value_cache, page, pos % P, n2), value_cache.stride[3]});
    }
  }
};

}  // namespace nsa::paged
