// The pairwise group sum of docs/spec/compress_attention.md §3.6 (internal), the one implementation of its order:
// level by level, v[a] = v[2a] + v[2a + 1], an odd last element carried up unchanged, until one element is left
// (G = 4: (v0 + v1) + (v2 + v3); G = 5: ((v0 + v1) + (v2 + v3)) + v4).
//
// pairwise_reduce runs that tree over any element: numbers (the reference), SIMD vectors (the kernels' fused
// normalize + group sum), row pointers whose add() sums whole rows (the CPU forward). It is a template over the
// add functor: the per-ISA kernel files, compiled with their own instruction-set flags, pass lambdas of their own,
// so no instantiation is shared between translation units built with different flags.
#pragma once

#include <cstdint>

namespace nsa::detail {

// v[0..n) is overwritten with the partial sums; returns the total (n >= 1). add(x, y) returns x + y.
template <typename T, typename Add>
inline T pairwise_reduce(T* v, int64_t n, Add&& add) {
  while (n > 1) {
    const int64_t half = n / 2;
    for (int64_t a = 0; a < half; ++a) v[a] = add(v[2 * a], v[2 * a + 1]);
    if (n % 2) v[half] = v[n - 1];
    n = half + n % 2;
  }
  return v[0];
}

// The §3.6 sum of n numbers (0 for n <= 0); destroys v.
template <typename T>
T pairwise_group_sum(T* v, int64_t n) {
  if (n <= 0) return T(0);
  return pairwise_reduce(v, n, [](T a, T b) { return a + b; });
}

}  // namespace nsa::detail
