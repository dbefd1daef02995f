// Compression kernels, AVX2 (8 fp32 lanes; F16C conversions, integer roundings in ymm registers). Compiled with
// -mavx2 -mfma -mf16c -ffp-contract=off; called only where cpuid and XCR0 allow it (resolve_isa).
#include <immintrin.h>

#include <cstdint>

#include "common/numeric.h"
#include "ops/compress/kernels.h"
#include "ops/compress/rounding.h"

namespace nsa::compress_kernels::isa_avx2 {

struct V {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static F load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }
  static __m256i c32(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  // 8 values in [0, 0xffff] as uint16 (packus works per 128-bit half: gather the halves' low quadwords)
  static void store16(uint16_t* p, __m256i h) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // all-ones lanes where a > b (signed; our operands are magnitudes <= 0x7fffffff)
  static __m256i gt(__m256i a, __m256i b) { return _mm256_cmpgt_epi32(a, b); }
  static __m256i select(__m256i mask, __m256i if_false, __m256i if_true) {
    return _mm256_blendv_epi8(if_false, if_true, mask);
  }
  // rounding.h's f32_to_bf16_rha / _rne on 8 lanes
  static void store_bf16(uint16_t* p, F v, bool away) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan = gt(_mm256_and_si256(u, c32(0x7fffffffu)), c32(compress_detail::kF32Inf));
    const __m256i bias =
        away ? c32(0x8000u) : _mm256_add_epi32(c32(0x7fffu), _mm256_and_si256(_mm256_srli_epi32(u, 16), c32(1)));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    store16(p, select(nan, r, _mm256_or_si256(_mm256_srli_epi32(u, 16), c32(0x40u))));
  }
  // f32_to_f16_round of common/rounding.h on 8 lanes (subnormal results through the exact scaling |x| 2^24: the same
  // integers as its shift formula)
  static void store_f16(uint16_t* p, F v, bool away) {
    namespace cd = compress_detail;
    const __m256i u = _mm256_castps_si256(v);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 16), c32(0x8000u));
    const __m256i a = _mm256_and_si256(u, c32(0x7fffffffu));
    __m256i n = _mm256_sub_epi32(a, c32(cd::kRebias));
    n = _mm256_add_epi32(n, away ? c32(0x1000u)
                                 : _mm256_add_epi32(c32(0xfffu), _mm256_and_si256(_mm256_srli_epi32(n, 13), c32(1))));
    n = _mm256_srli_epi32(n, 13);
    const F s = _mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(16777216.0f));
    __m256i si;
    if (away) {
      const __m256i t = _mm256_cvttps_epi32(s);
      const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(s, _mm256_cvtepi32_ps(t)), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
      si = _mm256_sub_epi32(t, _mm256_castps_si256(up));  // + 1 where up (all-ones = -1)
    } else {
      si = _mm256_cvtps_epi32(s);  // the MXCSR mode: nearest even
    }
    __m256i h = select(gt(c32(cd::kF16MinNormal), a), n, si);
    h = select(gt(a, c32(cd::kF16Overflow - 1)), h, c32(0x7c00u));
    h = select(gt(a, c32(cd::kF32Inf)), h, c32(0x7e00u));
    store16(p, _mm256_or_si256(h, sign));
  }
};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx2

namespace nsa::compress_kernels {
const KernelTable* kernels_avx2() {
  static const KernelTable t{CpuIsa::kAvx2, &isa_avx2::weighted_rows_impl, &isa_avx2::weighted_rows_shared_impl,
                             &isa_avx2::dot_lanes_impl,
                             &isa_avx2::widen_impl};
  return &t;
}
}  // namespace nsa::compress_kernels
