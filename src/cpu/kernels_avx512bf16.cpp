// AVX-512 BF16 kernels: the fp32 kernels of AVX-512F plus a GEMM on bf16 pairs with vdpbf16ps
// (16 fp32 lanes, each += a[2i]*b[2i] + a[2i+1]*b[2i+1]; products exact, sums in fp32).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16.
#include <cstring>

#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace nsa::cpu::isa_avx512bf16 {
#include "cpu/kernels_avx512_traits.h"
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
  if (kc <= 0) kc = P;
  for (int64_t p0 = 0; p0 < P; p0 += kc) {
    const int64_t pk = P - p0 < kc ? P - p0 : kc;
    const bool acc = accumulate || p0 > 0;
    for (int64_t c = col0; c < col0 + ncols;) {
      const int64_t panel_end = (c / kPanel + 1) * kPanel;
      const int64_t end = panel_end < col0 + ncols ? panel_end : col0 + ncols;
      const uint16_t* Bs = B + (c / kPanel) * panel_stride + p0 * kPanel * 2 + (c % kPanel) * 2;
      const uint16_t* As = A + 2 * p0;
      float* Cs = C + (c - col0);
      switch ((end - c) / 16) {
        case 4: gemm_bf16_rows<4>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
        case 3: gemm_bf16_rows<3>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
        case 2: gemm_bf16_rows<2>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
        default: gemm_bf16_rows<1>(As, lda, R, Bs, pk, Cs, ldc, alpha, acc); break;
      }
      c = end;
    }
  }
}

// ------------------------------------------------------------------ backward (SPEC §7)
// out[2i] = bf16(a[i]), out[2i + 1] = bf16(b[i]): lane i of the result holds the pair (a[i], b[i]).
inline void pack_rows_bf16_impl(const float* a, const float* b, int64_t n, uint16_t* out) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i ra = _mm512_castps_si512(V::round_bf16(_mm512_loadu_ps(a + i)));
    const __m512i rb = _mm512_castps_si512(V::round_bf16(_mm512_loadu_ps(b + i)));
    // (rb & hi) | (ra >> 16)
    const __m512i w = _mm512_or_si512(_mm512_and_si512(rb, hi), _mm512_srli_epi32(ra, 16));
    _mm512_storeu_si512(out + 2 * i, w);
  }
}
}  // namespace nsa::cpu::isa_avx512bf16

namespace nsa::cpu {
const KernelTable* kernels_avx512bf16() {
  namespace k = isa_avx512bf16;
  static const KernelTable table = {CpuIsa::kAvx512Bf16, k::gemm_f32_impl, k::gemm_bf16_impl, k::row_max_impl,
                                    k::exp_sum_impl, k::normalize_row_impl, k::box_sum_impl, k::add_row_impl,
                                    k::store_row_impl, k::load_row_impl,
                                    k::softmax_grad_row_impl, k::pack_rows_bf16_impl, k::transpose_u16_impl,
                                    k::transpose_u32_impl};
  return &table;
}
}  // namespace nsa::cpu
