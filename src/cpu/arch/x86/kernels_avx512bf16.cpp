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
#include "cpu/kernels_impl.h"

// C[MR][NV*16] (+)= alpha * sum_p A[r][pair p] . B[p][..][2] (one slice of a panel)
template <int MR, int NV>
inline void ukernel_bf16(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t P, float* C, int64_t ldc,
                         float alpha, bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* bp = B + p * (kPanel * 2);
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp + j * 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, b[j]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      float* dst = C + r * ldc + j * 16;
      __m512 v = _mm512_mul_ps(c[r][j], va);
      if (accumulate) v = _mm512_add_ps(_mm512_loadu_ps(dst), v);
      _mm512_storeu_ps(dst, v);
    }
}

template <int NV>
inline void gemm_bf16_rows(const uint16_t* A, int64_t lda, int64_t R, const uint16_t* B, int64_t P, float* C,
                           int64_t ldc, float alpha, bool acc) {
  int64_t r = 0;
  if constexpr (NV == 1)  // one B vector: 16 rows give 16 independent vdpbf16ps chains (6 would wait on latency)
    for (; r + 16 <= R; r += 16) ukernel_bf16<16, 1>(A + r * lda, lda, B, P, C + r * ldc, ldc, alpha, acc);
  for (; r + 6 <= R; r += 6) ukernel_bf16<6, NV>(A + r * lda, lda, B, P, C + r * ldc, ldc, alpha, acc);
  A += r * lda;
  C += r * ldc;
  switch (R - r) {
    case 1: ukernel_bf16<1, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 2: ukernel_bf16<2, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 3: ukernel_bf16<3, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 4: ukernel_bf16<4, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 5: ukernel_bf16<5, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    default: break;
  }
}

inline void gemm_bf16_impl(const uint16_t* A, int64_t lda, int64_t R, const uint16_t* B, int64_t panel_stride,
                           int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha,
                           bool accumulate) {
  // whole panels at a time (up to 64 columns: 4 vectors)
  for_each_block(P, kc, col0, ncols, kPanel, accumulate, [&](int64_t p0, int64_t pk, int64_t c, int64_t w, bool acc) {
    const uint16_t* Bs = B + (c / kPanel) * panel_stride + p0 * kPanel * 2 + (c % kPanel) * 2;
    const uint16_t* As = A + 2 * p0;
    float* Cs = C + (c - col0);
    switch (w / 16) {
      case 4: gemm_bf16_rows<4>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
      case 3: gemm_bf16_rows<3>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
      case 2: gemm_bf16_rows<2>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
      default: gemm_bf16_rows<1>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
    }
  });
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

// In-register transpose of a 16 x 16 matrix of 32-bit words (w[row] -> w[column]).
inline void transpose16x16_epi32(__m512i w[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(w[2 * i], w[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(w[2 * i], w[2 * i + 1]);
  }
  // u[4k + j]: rows 4k..4k+3, columns j, j + 4, j + 8, j + 12 (one per 128-bit lane)
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  // t[j], j < 4: rows 0..7, columns j and j + 8 ([r0-3 cj | r0-3 cj+8 | r4-7 cj | r4-7 cj+8]); t[j + 4]: columns
  // j + 4, j + 12; t[8 + ...]: the same for rows 8..15
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_i32x4(u[8 * h + j], u[8 * h + 4 + j], 0x88);
      t[8 * h + 4 + j] = _mm512_shuffle_i32x4(u[8 * h + j], u[8 * h + 4 + j], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    w[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
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
}  // namespace nsa::cpu::isa_avx512bf16

const nsa::cpu::KernelTable* nsa::cpu::kernels_avx512bf16() {
  namespace k = isa_avx512bf16;
  static const KernelTable t =
      k::make_table(CpuIsa::kAvx512Bf16, k::gemm_bf16_impl, k::pack_rows_bf16_impl, k::transpose_u16_avx512);
  return &t;
}
