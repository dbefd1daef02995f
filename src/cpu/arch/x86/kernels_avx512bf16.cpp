// AVX-512 BF16 kernels: the fp32 kernels of AVX-512F plus a GEMM on bf16 pairs with vdpbf16ps
// (16 fp32 lanes, each += a[2i]*b[2i] + a[2i+1]*b[2i+1]; products exact, sums in fp32).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16.
#include <cstring>

#include <immintrin.h>

#include <cstdint>

#include "common/group_sum.h"
#include "cpu/arch/x86/vectors.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_avx512bf16 {
#include "cpu/arch/x86/avx512_traits.h"
#include "cpu/arch/x86/avx512_transpose.h"
#include "cpu/kernels_impl.h"

// C[MR][NV*16] (+)= alpha * sum_p A[r][pair p] . B[p][..][2] (one slice of a panel); rows (f0..f3) as in
// kernels_impl.h (StridedRows / PointerRows)
template <int MR, int NV, typename Rows>
inline void ukernel_bf16(typename Rows::F0 f0, int64_t f1, typename Rows::F2 f2, int64_t f3, const uint16_t* B,
                         int64_t P, float alpha, bool accumulate) {
  const Rows rows{f0, f1, f2, f3};
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* bp = B + p * (kPanel * 2);
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp + j * 32);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, rows.a(r) + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, b[j]);
    }
  }
  // alpha * acc (skipped for alpha = 1, where it is exact), then + C when accumulating
  if (alpha != 1.0f) {
    const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_mul_ps(c[r][j], va);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* dst = rows.c(r);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const __m512 v = accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst + j * 16), c[r][j]) : c[r][j];
      _mm512_storeu_ps(dst + j * 16, v);
    }
  }
}

// ukernel_bf16 on a row view
template <int MR, int NV, typename Rows>
inline void ukernel_bf16_on(const Rows& r, const uint16_t* B, int64_t P, float alpha, bool acc) {
  ukernel_bf16<MR, NV, Rows>(r.f0, r.f1, r.f2, r.f3, B, P, alpha, acc);
}

template <int NV, typename Rows>
inline void gemm_bf16_rows(const Rows& rows, int64_t R, const uint16_t* B, int64_t P, float alpha, bool acc) {
  int64_t r = 0;
  if constexpr (NV == 1)  // one B vector: 16 rows give 16 independent vdpbf16ps chains (6 would wait on latency)
    for (; r + 16 <= R; r += 16) ukernel_bf16_on<16, 1>(rows.at(r), B, P, alpha, acc);
  for (; r + 6 <= R; r += 6) ukernel_bf16_on<6, NV>(rows.at(r), B, P, alpha, acc);
  const Rows tail = rows.at(r);
  switch (R - r) {
    case 1: ukernel_bf16_on<1, NV>(tail, B, P, alpha, acc); break;
    case 2: ukernel_bf16_on<2, NV>(tail, B, P, alpha, acc); break;
    case 3: ukernel_bf16_on<3, NV>(tail, B, P, alpha, acc); break;
    case 4: ukernel_bf16_on<4, NV>(tail, B, P, alpha, acc); break;
    case 5: ukernel_bf16_on<5, NV>(tail, B, P, alpha, acc); break;
    default: break;
  }
}

template <typename Rows>
inline void gemm_bf16_blocks(const Rows& rows, int64_t R, const uint16_t* B, int64_t panel_stride, int64_t col0,
                             int64_t ncols, int64_t P, int64_t kc, float alpha, bool accumulate) {
  // whole panels at a time (up to 64 columns: 4 vectors)
  for_each_block(P, kc, col0, ncols, kPanel, accumulate, [&](int64_t p0, int64_t pk, int64_t c, int64_t w, bool acc) {
    const uint16_t* Bs = B + (c / kPanel) * panel_stride + p0 * kPanel * 2 + (c % kPanel) * 2;
    const Rows rs = rows.shifted(2 * p0, c - col0);
    switch (w / 16) {
      case 4: gemm_bf16_rows<4>(rs, R, Bs, pk, alpha, acc); break;
      case 3: gemm_bf16_rows<3>(rs, R, Bs, pk, alpha, acc); break;
      case 2: gemm_bf16_rows<2>(rs, R, Bs, pk, alpha, acc); break;
      default: gemm_bf16_rows<1>(rs, R, Bs, pk, alpha, acc); break;
    }
  });
}
inline void gemm_bf16_impl(const uint16_t* A, int64_t lda, int64_t R, const uint16_t* B, int64_t panel_stride,
                           int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha,
                           bool accumulate) {
  gemm_bf16_blocks(StridedRows<uint16_t>{A, lda, C, ldc}, R, B, panel_stride, col0, ncols, P, kc, alpha, accumulate);
}
inline void gemm_bf16_gather_impl(const uint16_t* const* a_rows, int64_t R, const uint16_t* B, int64_t panel_stride,
                                  int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* const* c_rows,
                                  float alpha, bool accumulate) {
  gemm_bf16_blocks(PointerRows<uint16_t>{a_rows, 0, c_rows, 0}, R, B, panel_stride, col0, ncols, P, kc, alpha,
                   accumulate);
}

// ------------------------------------------------------------------ backward (docs/spec/compress_attention.md §7)
// pairs: lane i of each 512-bit store holds the pair (a[i], b[i]); rows: the bf16 halves of the lanes.
inline void pack_rows_bf16_impl(const float* a, const float* b, int64_t n, uint16_t* pairs, uint16_t* row_a,
                                uint16_t* row_b) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i ra = _mm512_castps_si512(V::round_bf16(_mm512_loadu_ps(a + i)));
    const __m512i rb = _mm512_castps_si512(V::round_bf16(_mm512_loadu_ps(b + i)));
    const __m512i lo_a = _mm512_srli_epi32(ra, 16);
    _mm512_storeu_si512(pairs + 2 * i, _mm512_or_si512(_mm512_and_si512(rb, hi), lo_a));  // (rb & hi) | (ra >> 16)
    if (row_a != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_a + i), _mm512_cvtepi32_epi16(lo_a));
    if (row_b != nullptr)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_b + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rb, 16)));
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c]: blocks of 32 rows x 16 columns; row pairs are combined into
// 32-bit words (the low half the even row), a 16 x 16 word transpose, then one 64-byte (masked) store per column.
inline void transpose_u16_avx512(const uint16_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint16_t* dst,
                                 int64_t ld_dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t nc = cols - c0 < 16 ? cols - c0 : 16;
    const __mmask16 cm = static_cast<__mmask16>(nc == 16 ? 0xffffu : (1u << nc) - 1u);
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const int64_t nr = rows - r0 < 32 ? rows - r0 : 32;
      __m512i w[16];
      for (int p = 0; p < 16; ++p) {
        const int64_t ra = r0 + 2 * p;
        const __m256i a = ra < rows ? _mm256_maskz_loadu_epi16(cm, src + ra * ld_src + c0) : _mm256_setzero_si256();
        const __m256i b =
            ra + 1 < rows ? _mm256_maskz_loadu_epi16(cm, src + (ra + 1) * ld_src + c0) : _mm256_setzero_si256();
        w[p] = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      }
      transpose16x16_epi32(w);
      const __mmask32 rm = static_cast<__mmask32>(nr == 32 ? 0xffffffffu : (1u << nr) - 1u);
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_epi16(dst + (c0 + c) * ld_dst + r0, rm, w[c]);
    }
  }
}

// ------------------------------------------------------------------ in-place P.V (GemmKernels::pv_bf16)
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
namespace pv {
constexpr int64_t kSubTokens = 32;  // tokens per sub-block (even)
constexpr int64_t kAhead = 64;      // tokens between a pair step and the rows it prefetches

// The register-block loops carry `GCC unroll` pragmas: without them GCC 12 at -O3 stores every accumulator to the
// stack on each pair step (one store per vdpbf16ps), and at -O2 keeps them in memory.
// One pair step of pv_block: acc[r][j] += the pair (P[r][t], P[r][t + 1]) times the interleaved values of rows va
// (token t) and vb (token t + 1) over the block's 32 NH values, m[h]: valid lanes of the h-th 32.
#define NSA_PV_STEP(va, vb)                                                                       \
  do {                                                                                            \
    __m512bh x[2 * NH];                                                                           \
    _Pragma("GCC unroll 4") for (int h = 0; h < NH; ++h) {                                        \
      const __m512i a_ = _mm512_maskz_loadu_epi16(m[h], (va) + 32 * h);                           \
      const __m512i b_ = _mm512_maskz_loadu_epi16(m[h], (vb) + 32 * h);                           \
      x[2 * h] = (__m512bh)_mm512_unpacklo_epi16(a_, b_);                                         \
      x[2 * h + 1] = (__m512bh)_mm512_unpackhi_epi16(a_, b_);                                     \
    }                                                                                             \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                       \
      int32_t pair;                                                                               \
      std::memcpy(&pair, P + r * ldp + t, 4);                                                     \
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);                                      \
      _Pragma("GCC unroll 8") for (int j = 0; j < 2 * NH; ++j) acc[r][j] =                        \
          _mm512_dpbf16_ps(acc[r][j], pb, x[j]);                                                  \
    }                                                                                             \
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
    const uint16_t* Pr = P + r0 * ldp;
    float* wr = w + r0 * ldw;
    if (pf) pv_block<MR, kNh, true>(vrow, ntok, nvalid, t0, t1, e0, m, Pr, ldp, wr, ldw, t0 == 0, zero_row);
    else pv_block<MR, kNh, false>(vrow, ntok, nvalid, t0, t1, e0, m, Pr, ldp, wr, ldw, t0 == 0, zero_row);
  }
  if constexpr (MR > 1)
    if (r0 < R)
      pv_rows<MR - 1>(vrow, ntok, nvalid, pf, t0, t1, e0, m, P + r0 * ldp, ldp, w + r0 * ldw, ldw, R - r0, zero_row);
}

}  // namespace pv

inline void pv_bf16_impl(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t Dv, const uint16_t* P,
                        int64_t ldp, int64_t R, float* O, int64_t ldo, bool accumulate, float* work) {
  const int64_t ldw = (Dv + 63) / 64 * 64, eb = 32 * pv::kNh;
  alignas(64) static const uint16_t zero_row[32 * pv::kNh] = {};  // the partner of an odd last token (one value block)
  for (int64_t t0 = 0; t0 < ntok; t0 += pv::kSubTokens) {
    const int64_t t1 = std::min(t0 + pv::kSubTokens, ntok);
    for (int64_t e0 = 0; e0 < Dv; e0 += eb) {
      __mmask32 m[pv::kNh];
      for (int h = 0; h < pv::kNh; ++h) m[h] = pv::lanes_below(Dv - e0 - 32 * h);
      pv::pv_rows<pv::kRows>(vrow, ntok, nvalid, true, t0, t1, e0, m, P, ldp, work, ldw, R, zero_row);
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

}  // namespace nsa::cpu::isa_avx512bf16

const nsa::cpu::KernelTable* nsa::cpu::kernels_avx512bf16() {
  namespace k = isa_avx512bf16;
  static const KernelTable t = k::make_table(CpuIsa::kAvx512Bf16, k::gemm_bf16_impl, k::pack_rows_bf16_impl,
                                             k::transpose_u16_avx512, k::transpose_u32_avx512, k::pv_bf16_impl,
                                             k::gemm_bf16_gather_impl);
  return &t;
}
