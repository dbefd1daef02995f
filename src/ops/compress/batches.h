// Per-batch bookkeeping of a validated compression call (docs/spec/compress.md §2, §3).
#pragma once

#include <cstdint>
#include <vector>

#include "nsa/compress.h"

namespace nsa::compress_detail {

struct Batch {
  int64_t start = 0;      // first input row of the batch: actual_seq_len[b-1] (0 for b = 0)
  int64_t S = 0;          // S_b: input rows of the batch
  int64_t C = 0;          // C_b: compressed rows (§3), 0 when S_b < l
  int64_t row_begin = 0;  // R_b: first output row of the batch
};

// Requires a list that passed validation (non-decreasing, >= 0).
inline std::vector<Batch> make_batches(const IntList& lens, int64_t l, int64_t d) {
  std::vector<Batch> out(static_cast<size_t>(lens.size));
  int64_t prev = 0, rows = 0;
  for (int64_t b = 0; b < lens.size; ++b) {
    Batch& bt = out[static_cast<size_t>(b)];
    bt.start = prev;
    bt.S = lens.data[b] - prev;
    bt.C = compress_count(bt.S, l, d);
    bt.row_begin = rows;
    rows += bt.C;
    prev = lens.data[b];
  }
  return out;
}

// Windows covering position p (0 <= p < S) of a batch with C windows (§5): c in [first, last], empty when
// first > last. Window c covers positions [c*d, c*d + l).
inline void covering_windows(int64_t p, int64_t C, int64_t l, int64_t d, int64_t* first, int64_t* last) {
  // c*d <= p  <=>  c <= p / d;   p < c*d + l  <=>  c*d > p - l  <=>  c >= (p - l) / d + 1 for p >= l
  // (and every c >= 0 for p < l)
  *first = p >= l ? (p - l) / d + 1 : 0;
  const int64_t hi = p / d;
  *last = hi < C - 1 ? hi : C - 1;
}

// The end of the run of positions that share p's covering windows: the first q > p where a window starts (a
// multiple of d) or one ends (l + a multiple of d). covering_windows gives the same [first, last] for every
// position of [p, covering_run_end(p, l, d)) (a run may also end where nothing changes, past the last window).
inline int64_t covering_run_end(int64_t p, int64_t l, int64_t d) {
  const int64_t next_start = (p / d + 1) * d;
  const int64_t next_end = p < l ? l : l + ((p - l) / d + 1) * d;
  return next_start < next_end ? next_start : next_end;
}

}  // namespace nsa::compress_detail
