// The part of the vector traits V of kernels_impl.h that every ISA writes the same way (internal). F is float (the
// scalar traits) or a GCC/Clang vector of floats (__m256, __m512), for which the C++ operators and memcpy compile to
// the plain vector instructions (vaddps, vmovups, vbroadcastss, ...). A traits struct V derives from it through the
// vector of its ISA, which adds the fp16 widening (and, on x86, a bf16 widening in registers): ScalarVector<V>
// (scalar/scalar_vector.h), Avx2Vector<V> or Avx512Vector<V> (x86/vectors.h). Naming V makes each instantiation
// belong to one ISA's translation unit, so none is shared between files compiled with different instruction-set
// flags.
#pragma once

#include <cstdint>
#include <cstring>

namespace nsa::cpu {

template <typename FT, typename Self>
struct VectorBase {
  using F = FT;
  static constexpr int W = static_cast<int>(sizeof(F) / sizeof(float));  // fp32 lanes
  static F zero() { return F{}; }
  static F set1(float x) { return x - F{}; }  // x - 0 == x exactly for every x (signed zeros, inf, NaN): a broadcast
  static F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(F));
    return v;
  }
  static void store(float* p, F v) { std::memcpy(p, &v, sizeof(F)); }
  // bf16 bits to float: the bits are the upper half of the float's (exact)
  static F load_bf16(const uint16_t* p) {
    uint32_t u[W];
    for (int i = 0; i < W; ++i) u[i] = static_cast<uint32_t>(p[i]) << 16;
    F v;
    std::memcpy(&v, u, sizeof(F));
    return v;
  }
  // x rounded to bf16 (nearest even, NaN kept) and its bits stored: W values to p[0..W)
  static void store_bf16(uint16_t* p, F x) { Self::store_bf16_bits(p, Self::round_bf16(x)); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  // row_max's lane reduction: the largest of init and the lanes of v (none NaN), ties kept by the first of init,
  // lane 0, lane 1, ... (which only the sign of a zero shows).
  static float max_lanes(F v, float init) {
    float lane[W];
    std::memcpy(lane, &v, sizeof(F));
    float r = init;
    for (int i = 0; i < W; ++i) r = lane[i] > r ? lane[i] : r;
    return r;
  }
  // exp_sum's canonical sum of 16 partial sums held in 16 / W vectors (part[a W + j] in lane j of acc[a]): the
  // halving tree part[j] += part[j + s] for s = 8, 4, 2, 1.
  static float sum16(const F* acc) {
    float part[16];
    std::memcpy(part, acc, sizeof(part));
    for (int s = 8; s >= 1; s /= 2)
      for (int j = 0; j < s; ++j) part[j] = part[j] + part[j + s];
    return part[0];
  }
  // The K-th largest of gm[0..32) (1 <= K <= 32, no NaN): the largest gm[j] with at least K values >= it (any larger
  // value has at most K - 1). Selects, not branches: whether a value qualifies is data-dependent.
  static float kth_largest32(const float* gm, int K) {
    float t = -__builtin_inff();
    for (int j = 0; j < 32; ++j) {
      int ge = 0;
      for (int c = 0; c < 32; c += W) ge += Self::count_ge(gm + c, gm[j]);
      const float q = ge >= K ? gm[j] : -__builtin_inff();
      t = q > t ? q : t;
    }
    return t;
  }
  // top_k's step 3 for at most 32 candidates where the ISA has a kernel for it (AVX-512): here none.
  static bool rank_top32(const float*, int64_t, const int32_t*, int, int32_t*) { return false; }
  // KernelTable::select.block_scores where the ISA has no kernel of its own: none.
  static bool block_scores(const float*, int64_t, int64_t, int, int, float*) { return false; }
  // The i < n with p[i] > t, in index order: i into idx[0..count), the bits of p[i] into bits[0..count); returns
  // count (branch-free; writes idx[0..n) and bits[0..n) at most).
  static int64_t compact_gt(const float* p, int64_t n, float t, int32_t* idx, int32_t* bits) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = p[i];
      idx[count] = static_cast<int32_t>(i);
      std::memcpy(bits + count, &v, sizeof(float));
      count += v > t;
    }
    return count;
  }
};

}  // namespace nsa::cpu
