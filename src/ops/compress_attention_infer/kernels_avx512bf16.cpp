// The in-place P.V kernel of kernels.h on bf16 pairs (vdpbf16ps). Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512bf16 (x86 only); run only on the avx512bf16 path.
//
// Lanes run over the values e. A pair step takes the value rows of tokens 2j and 2j + 1 (32 bf16 each per vector,
// masked past Dv, zeros for a missing odd token) and interleaves them with vpunpcklwd / vpunpckhwd into 32-bit
// pairs (V_2j[e], V_2j+1[e]), the even token in the low half as in the shared GEMM's B panels: within each 128-bit
// lane k, the low interleave holds e = 8k + 0..3 and the high one e = 8k + 4..7. Each accumulator lane therefore
// belongs to a fixed e (a permutation undone once, when the chunk is added to O); the query row's pair
// (P[r][2j], P[r][2j + 1]) is broadcast as one 32-bit word. Per (r, e) the chain of vdpbf16ps steps over the pairs
// is the shared GEMM's chain, in the same order, so the results are the same bits.
// Blocking: sub-blocks of 32 tokens (their value rows stay in L1) x blocks of 64 values (4 pair vectors) x blocks
// of up to 6 query rows (24 accumulators), the accumulators parked in `work` between sub-blocks.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ops/compress_attention_infer/kernels.h"

namespace nsa::cai_kernels {
namespace {

constexpr int64_t kSubTokens = 32;  // tokens per sub-block (even)
constexpr int kMaxRows = 6;         // query rows per register block

// Rows [0, MR) (P rows at P + r * ldp, accumulators at w + r * ldw) x values [e0, e0 + 64) (valid lanes m0 for
// e0 + 0..31 and m1 for e0 + 32..63) over the tokens [t0, t1) of the chunk (t0 even); accumulators start at +0
// when `first`, else they are reloaded from w. Stored order in w: lo(e0..31), hi(e0..31), lo(e0+32..), hi(e0+32..).
template <int MR>
void pv_block(const uint16_t* const* vrow, int64_t ntok, int64_t t0, int64_t t1, int64_t e0, __mmask32 m0,
              __mmask32 m1, const uint16_t* P, int64_t ldp, float* w, int64_t ldw, bool first) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(w + r * ldw + e0 + 16 * j);
  for (int64_t t = t0; t < t1; t += 2) {
    const uint16_t* va = vrow[t] + e0;
    const __m512i a0 = _mm512_maskz_loadu_epi16(m0, va), a1 = _mm512_maskz_loadu_epi16(m1, va + 32);
    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
    if (t + 1 < ntok) {
      const uint16_t* vb = vrow[t + 1] + e0;
      b0 = _mm512_maskz_loadu_epi16(m0, vb);
      b1 = _mm512_maskz_loadu_epi16(m1, vb + 32);
    }
    const __m512bh x[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0), (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                           (__m512bh)_mm512_unpacklo_epi16(a1, b1), (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, P + r * ldp + t, 4);
      const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], p, x[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(w + r * ldw + e0 + 16 * j, acc[r][j]);
}

inline __mmask32 lanes_below(int64_t n) {  // the first min(max(n, 0), 32) lanes
  return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : static_cast<__mmask32>((1u << n) - 1u);
}

}  // namespace

void pv_bf16_avx512bf16(const uint16_t* const* vrow, int64_t ntok, int64_t Dv, const uint16_t* P, int64_t ldp,
                        int64_t R, float* O, int64_t ldo, bool accumulate, float* work) {
  const int64_t ldw = (Dv + 63) / 64 * 64;
  for (int64_t t0 = 0; t0 < ntok; t0 += kSubTokens) {
    const int64_t t1 = std::min(t0 + kSubTokens, ntok);
    for (int64_t e0 = 0; e0 < Dv; e0 += 64) {
      const __mmask32 m0 = lanes_below(Dv - e0), m1 = lanes_below(Dv - e0 - 32);
      for (int64_t r0 = 0; r0 < R; r0 += kMaxRows) {
        const uint16_t* Pr = P + r0 * ldp;
        float* w = work + r0 * ldw;
        switch (std::min<int64_t>(kMaxRows, R - r0)) {
          case 6: pv_block<6>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
          case 5: pv_block<5>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
          case 4: pv_block<4>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
          case 3: pv_block<3>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
          case 2: pv_block<2>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
          default: pv_block<1>(vrow, ntok, t0, t1, e0, m0, m1, Pr, ldp, w, ldw, t0 == 0); break;
        }
      }
    }
  }
  // natural order: values e0 + 0..15 are lo lanes 0-3, hi 0-3, lo 4-7, hi 4-7; e0 + 16..31 the same with 8-15
  const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t e0 = 0; e0 < Dv; e0 += 32) {
      const __m512 lo = _mm512_loadu_ps(work + r * ldw + e0), hi = _mm512_loadu_ps(work + r * ldw + e0 + 16);
      __m512 v0 = _mm512_permutex2var_ps(lo, first_half, hi), v1 = _mm512_permutex2var_ps(lo, second_half, hi);
      float* o = O + r * ldo + e0;
      if (accumulate) {
        v0 = _mm512_add_ps(_mm512_loadu_ps(o), v0);
        v1 = _mm512_add_ps(_mm512_loadu_ps(o + 16), v1);
      }
      _mm512_storeu_ps(o, v0);
      _mm512_storeu_ps(o + 16, v1);
    }
}

}  // namespace nsa::cai_kernels
