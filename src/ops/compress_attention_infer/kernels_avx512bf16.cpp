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
// Prefetch: the value rows lie in pages anywhere in the cache, which the hardware prefetchers do not follow; while a
// sub-block's first (value block, row block) runs, each pair step prefetches the rows of the tokens kAhead places
// later (any of the nvalid rows that vrow lists, so across the chunk's end too).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ops/compress_attention_infer/kernels.h"

namespace nsa::cai_kernels {
namespace {

constexpr int64_t kSubTokens = 32;  // tokens per sub-block (even)
constexpr int64_t kAhead = 64;      // tokens between a pair step and the rows it prefetches

// The register-block loops carry `GCC unroll` pragmas: without them GCC 12 at -O3 stores every accumulator to the
// stack on each pair step (one store per vdpbf16ps), and at -O2 keeps them in memory.
// One pair step of pv_block: acc[r][j] += the pair (P[r][t], P[r][t + 1]) times the interleaved values of rows va
// (token t) and vb (token t + 1) over the block's 32 NH values, m[h]: valid lanes of the h-th 32.
#define NSA_PV_STEP(va, vb)                                                                                       \
  do {                                                                                                            \
    __m512bh x[2 * NH];                                                                                           \
    _Pragma("GCC unroll 4") for (int h = 0; h < NH; ++h) {                                                                      \
      const __m512i a_ = _mm512_maskz_loadu_epi16(m[h], (va) + 32 * h), b_ = _mm512_maskz_loadu_epi16(m[h], (vb) + 32 * h); \
      x[2 * h] = (__m512bh)_mm512_unpacklo_epi16(a_, b_);                                                         \
      x[2 * h + 1] = (__m512bh)_mm512_unpackhi_epi16(a_, b_);                                                     \
    }                                                                                                             \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                                                      \
      int32_t pair;                                                                                               \
      std::memcpy(&pair, P + r * ldp + t, 4);                                                                     \
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);                                                      \
      _Pragma("GCC unroll 8") for (int j = 0; j < 2 * NH; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, x[j]);                          \
    }                                                                                                             \
  } while (0)

// Rows [0, MR) (P rows at P + r * ldp, accumulators at w + r * ldw) x values [e0, e0 + 32 NH) (valid lanes m[h] of
// e0 + 32h..) over the tokens [t0, t1) of the chunk (t0 even); accumulators start at +0 when `first`, else they are
// reloaded from w. Stored order in w, per 32 values: lo(e..e+31), hi(e..e+31). A missing odd token (t1 == ntok odd)
// is paired with zeros (its partner is `zero_row`, one block of zeros). With PF, pair step t prefetches the block's
// values of tokens min(t + kAhead, nvalid - 1) and the one after (rows past ntok belong to the next chunk).
template <int MR, int NH, bool PF>
void pv_block(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t t0, int64_t t1, int64_t e0,
              const __mmask32* m, const uint16_t* P, int64_t ldp, float* w, int64_t ldw, bool first,
              const uint16_t* zero_row) {
  __m512 acc[MR][2 * NH];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < 2 * NH; ++j)
      acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(w + r * ldw + e0 + 16 * j);
  const int64_t tp = std::min(t1, ntok & ~int64_t(1));  // end of the whole pairs
  int64_t t = t0;
  for (; t < tp; t += 2) {
    if constexpr (PF) {
      for (int k = 0; k < 2; ++k) {
        const char* row = reinterpret_cast<const char*>(vrow[std::min(t + kAhead + k, nvalid - 1)] + e0);
        for (int i = 0; i <= NH; ++i) _mm_prefetch(row + std::min(64 * i, 64 * NH - 2), _MM_HINT_T0);
      }
    }
    NSA_PV_STEP(vrow[t] + e0, vrow[t + 1] + e0);
  }
  if (t < t1) NSA_PV_STEP(vrow[t] + e0, zero_row);  // the odd last token
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < 2 * NH; ++j) _mm512_storeu_ps(w + r * ldw + e0 + 16 * j, acc[r][j]);
}
#undef NSA_PV_STEP

inline __mmask32 lanes_below(int64_t n) {  // the first min(max(n, 0), 32) lanes
  return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : static_cast<__mmask32>((1u << n) - 1u);
}

// Register blocks: kRows query rows x 32 kNh values (24 accumulators; of 4x2, 6x2, 8x1, 8x2 and 16x1 the fastest on
// Zen 5 at 128k compressed tokens).
constexpr int kRows = 6;
constexpr int kNh = 2;

template <int MR>
void pv_rows(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, bool pf, int64_t t0, int64_t t1, int64_t e0,
             const __mmask32* m, const uint16_t* P, int64_t ldp, float* w, int64_t ldw, int64_t R,
             const uint16_t* zero_row) {
  int64_t r0 = 0;
  for (; r0 + MR <= R; r0 += MR, pf = false) {
    if (pf) pv_block<MR, kNh, true>(vrow, ntok, nvalid, t0, t1, e0, m, P + r0 * ldp, ldp, w + r0 * ldw, ldw, t0 == 0, zero_row);
    else pv_block<MR, kNh, false>(vrow, ntok, nvalid, t0, t1, e0, m, P + r0 * ldp, ldp, w + r0 * ldw, ldw, t0 == 0, zero_row);
  }
  if constexpr (MR > 1)
    if (r0 < R)
      pv_rows<MR - 1>(vrow, ntok, nvalid, pf, t0, t1, e0, m, P + r0 * ldp, ldp, w + r0 * ldw, ldw, R - r0, zero_row);
}

}  // namespace

void pv_bf16_avx512bf16(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t Dv, const uint16_t* P,
                        int64_t ldp, int64_t R, float* O, int64_t ldo, bool accumulate, float* work) {
  const int64_t ldw = (Dv + 63) / 64 * 64, eb = 32 * kNh;
  alignas(64) static const uint16_t zero_row[32 * kNh] = {};  // the partner of an odd last token (one value block)
  for (int64_t t0 = 0; t0 < ntok; t0 += kSubTokens) {
    const int64_t t1 = std::min(t0 + kSubTokens, ntok);
    for (int64_t e0 = 0; e0 < Dv; e0 += eb) {
      __mmask32 m[kNh];
      for (int h = 0; h < kNh; ++h) m[h] = lanes_below(Dv - e0 - 32 * h);
      pv_rows<kRows>(vrow, ntok, nvalid, true, t0, t1, e0, m, P, ldp, work, ldw, R, zero_row);
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
