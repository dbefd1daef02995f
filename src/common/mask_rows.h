// Row analysis of a 2-D mask (internal): which columns of row s in [0, C) are visible (mask entry 0), in the form
// the tiled drivers use to skip work: the span [lo, hi) from the first to the last visible column, and whether
// every column of the span is visible. A null mask makes every row one full span.
#pragma once

#include <cstdint>
#include <cstring>

#include "nsa/common.h"

namespace nsa::detail {

// Entry (r, c) of a mask; false (visible) where there is no mask.
inline bool mask_at(const Mask2& m, int64_t r, int64_t c) {
  return m.data != nullptr && m.data[r * m.stride[0] + c * m.stride[1]] != 0;
}

enum class MaskRowKind : uint8_t {
  kRange = 0,        // the visible columns are exactly [lo, hi)
  kScattered = 1,    // [lo, hi) has masked columns inside: read the mask per column there
  kFullyMasked = 2,  // nothing visible (lo = hi = 0)
};

struct MaskRow {
  int64_t lo = 0, hi = 0;  // first visible column, last visible column + 1
  MaskRowKind kind = MaskRowKind::kRange;
};

// Row s of m over the columns [0, C).
inline MaskRow analyse_mask_row(const Mask2& m, int64_t s, int64_t C) {
  MaskRow ri;
  if (m.data == nullptr) {
    ri.hi = C;
    return ri;
  }
  const uint8_t* row = m.data + s * m.stride[0];
  const int64_t cs = m.stride[1];
  if (cs == 1 && C > 0) {  // contiguous row: library scans for the first and last 0 byte, an OR over the span
    const void* f = std::memchr(row, 0, static_cast<size_t>(C));
    if (f == nullptr) {
      ri.kind = MaskRowKind::kFullyMasked;
      return ri;
    }
    ri.lo = static_cast<const uint8_t*>(f) - row;
    ri.hi = static_cast<const uint8_t*>(memrchr(row, 0, static_cast<size_t>(C))) - row + 1;
    uint8_t any_masked = 0;
    for (int64_t c = ri.lo; c < ri.hi; ++c) any_masked |= row[c];
    ri.kind = any_masked == 0 ? MaskRowKind::kRange : MaskRowKind::kScattered;
    return ri;
  }
  int64_t first = -1, last = -1, visible = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (row[c * cs] == 0) {
      if (first < 0) first = c;
      last = c;
      ++visible;
    }
  }
  if (first < 0) {
    ri.kind = MaskRowKind::kFullyMasked;
    return ri;
  }
  ri.lo = first;
  ri.hi = last + 1;
  ri.kind = visible == last + 1 - first ? MaskRowKind::kRange : MaskRowKind::kScattered;
  return ri;
}

}  // namespace nsa::detail
