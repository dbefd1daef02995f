// Small row helpers shared by the CPU backends (internal).
#pragma once

#include <cstdint>
#include <cstring>

#include "nsa/common.h"

namespace nsa::detail {

// dst[0..n) = the raw 16-bit elements (bf16 / fp16 bits) of row (row, head) of a 3-D view, any innermost stride.
inline void load_bits_row(const Tensor3& t, int64_t row, int64_t head, int64_t n, uint16_t* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + row * t.stride[0] + head * t.stride[1];
  if (t.stride[2] == 1) {
    std::memcpy(dst, src, sizeof(uint16_t) * static_cast<size_t>(n));
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = src[k * t.stride[2]];
  }
}

// sum_k a[k] * b[k] in a fixed order, the same on every ISA and thread count: 8 interleaved partial sums (k % 8),
// then ((0+1)+(2+3))+((4+5)+(6+7)).
inline float dot_fixed(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[k + j] * b[k + j];
  for (int j = 0; k < n; ++k, ++j) part[j] += a[k] * b[k];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The largest k in [from, to) with row[k * stride] != 0, or from - 1 when there is none (a byte mask row; 8 bytes
// at a time from the end when the row is contiguous).
inline int64_t last_nonzero_byte(const uint8_t* row, int64_t stride, int64_t from, int64_t to) {
  int64_t k = to;
  if (stride == 1) {
    for (; k - 8 >= from; k -= 8) {
      uint64_t word;
      std::memcpy(&word, row + k - 8, sizeof(word));
      if (word != 0) break;
    }
  }
  for (; k > from; --k)
    if (row[(k - 1) * stride] != 0) return k - 1;
  return from - 1;
}

// fn(i0, i1) for each maximal run [i0, i1) of consecutive i in [0, n) with keep(i), in order.
template <typename Keep, typename Fn>
inline void for_each_run(int64_t n, Keep keep, Fn fn) {
  for (int64_t i0 = 0; i0 < n;) {
    if (!keep(i0)) {
      ++i0;
      continue;
    }
    int64_t i1 = i0 + 1;
    while (i1 < n && keep(i1)) ++i1;
    fn(i0, i1);
    i0 = i1;
  }
}

}  // namespace nsa::detail
