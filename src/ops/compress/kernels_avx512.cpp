// Compression kernels, AVX-512 (16 fp32 lanes; F16C-style conversions and integer roundings in zmm registers).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -ffp-contract=off; called only
// where cpuid and XCR0 allow it (resolve_isa). Also serves the avx512bf16 path.
#include <immintrin.h>

#include <cstdint>

#include "common/numeric.h"
#include "ops/compress/kernels.h"
#include "ops/compress/rounding.h"

namespace nsa::compress_kernels::isa_avx512 {

struct V {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static F load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store_f32(float* p, F v) { _mm512_storeu_ps(p, v); }
  static __m512i c32(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static void store16(uint16_t* p, __m512i h) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
  }
  // rounding.h's f32_to_bf16_rha / _rne on 16 lanes
  static void store_bf16(uint16_t* p, F v, bool away) {
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, c32(0x7fffffffu)), c32(compress_detail::kF32Inf));
    const __m512i bias =
        away ? c32(0x8000u) : _mm512_add_epi32(c32(0x7fffu), _mm512_and_si512(_mm512_srli_epi32(u, 16), c32(1)));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    store16(p, _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), c32(0x40u))));
  }
  // f32_to_f16_round of common/rounding.h on 16 lanes (subnormal results through the exact scaling |x| 2^24: the same
  // integers as its shift formula)
  static void store_f16(uint16_t* p, F v, bool away) {
    namespace cd = compress_detail;
    const __m512i u = _mm512_castps_si512(v);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 16), c32(0x8000u));
    const __m512i a = _mm512_and_si512(u, c32(0x7fffffffu));
    // normal results
    __m512i n = _mm512_sub_epi32(a, c32(cd::kRebias));
    n = _mm512_add_epi32(n, away ? c32(0x1000u)
                                 : _mm512_add_epi32(c32(0xfffu), _mm512_and_si512(_mm512_srli_epi32(n, 13), c32(1))));
    n = _mm512_srli_epi32(n, 13);
    // subnormal results: |x| * 2^24 rounded to an integer
    const F s = _mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(16777216.0f));
    __m512i si;
    if (away) {
      const __m512i t = _mm512_cvttps_epi32(s);
      const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(s, _mm512_cvtepi32_ps(t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      si = _mm512_mask_add_epi32(t, up, t, c32(1));
    } else {
      si = _mm512_cvt_roundps_epi32(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    __m512i h = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(a, c32(cd::kF16MinNormal)), n, si);
    h = _mm512_mask_mov_epi32(h, _mm512_cmpge_epi32_mask(a, c32(cd::kF16Overflow)), c32(0x7c00u));
    h = _mm512_mask_mov_epi32(h, _mm512_cmpgt_epi32_mask(a, c32(cd::kF32Inf)), c32(0x7e00u));
    store16(p, _mm512_or_si512(h, sign));
  }
};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx512

namespace nsa::compress_kernels {
const KernelTable* kernels_avx512() {
  static const KernelTable t{CpuIsa::kAvx512, &isa_avx512::weighted_rows_impl, &isa_avx512::weighted_rows_shared_impl,
                             &isa_avx512::dot_lanes_impl,
                             &isa_avx512::widen_impl};
  return &t;
}
}  // namespace nsa::compress_kernels
