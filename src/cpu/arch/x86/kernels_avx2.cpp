// AVX2 + FMA + F16C kernels (fp32 FMA GEMM, 8 lanes). Compiled with -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <cstdint>

#include "common/group_sum.h"
#include "cpu/arch/x86/vectors.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_avx2 {

struct V : nsa::cpu::Avx2Vector<V> {
  // 6 x 16 micro-tile: 12 accumulators + 2 B vectors + broadcast (15 of 16 ymm registers); 12 independent
  // FMA chains cover the FMA latency (4-5 cycles x 2 ports), 8 loads per 12 FMAs
  static constexpr int kSliceVectors = 2;  // 16 columns: a quarter of a panel
  static constexpr int kMaxRows = 6;
  static constexpr bool kStream = true;
  // One 64-byte line of a row store: src[0..64 / element size) rounded to dt as store_row does (bf16 / fp16 nearest
  // even, fp32 as is), assembled in registers and written with two non-temporal stores to dst (64-byte aligned).
  static void stream_line(void* dst, const float* src, nsa::DType dt) {
    __m256i* out = static_cast<__m256i*>(dst);
    for (int h = 0; h < 2; ++h) {  // 32 bytes each
      __m256i half;
      if (dt == nsa::DType::kBF16) {  // 16 values: the high halves of two rounded vectors, packed (exact: <= 0xffff)
        const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(round_bf16(load(src + 16 * h))), 16);
        const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(round_bf16(load(src + 16 * h + 8))), 16);
        half = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);  // packus interleaves the 128-bit lanes
      } else if (dt == nsa::DType::kF16) {
        half = _mm256_set_m128i(_mm256_cvtps_ph(load(src + 16 * h + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                _mm256_cvtps_ph(load(src + 16 * h), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        half = _mm256_castps_si256(load(src + 8 * h));
      }
      _mm256_stream_si256(out + h, half);
    }
  }
  static void stream_fence() { _mm_sfence(); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // VectorBase::sum16 in registers: the same additions of the same pairs (acc[1] onto acc[0], then 4, 2, 1).
  static float sum16(const F* acc) {
    const __m256 a = _mm256_add_ps(acc[0], acc[1]);
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
  }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F rint(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2(F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  // p * 2^n with n split in two factors: p * 2^n1 is exact (normal range), the second product
  // rounds once, so the result equals a single-rounding scaling (as vscalefps).
  static F scale2(F p, F n) {
    const F n1 = rint(mul(n, set1(0.5f)));
    return mul(mul(p, pow2(n1)), pow2(sub(n, n1)));
  }
  static F keep_nan(F x, F r) { return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  static F inf_above(F x, F hi, F r) {
    return _mm256_blendv_ps(r, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  }
  static F round_bf16(F x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    return keep_nan(x, _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))));
  }
  static F round_f16(F x) { return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static void store_bf16_bits(uint16_t* p, F v) {
    alignas(32) uint32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_castps_si256(v));
    for (int i = 0; i < 8; ++i) p[i] = static_cast<uint16_t>(t[i] >> 16);
  }
  static void store_f16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // number of p[0..8) >= v (a NaN on either side never counts)
  static int count_ge(const float* p, float v) {
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(load(p), set1(v), _CMP_GE_OQ))));
  }
  // number of p[0..8) > v (a NaN on either side never counts)
  static int count_gt(const float* p, float v) {
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(load(p), set1(v), _CMP_GT_OQ))));
  }
  // x where keep[i] != 0, else +0 (backward: masked entries of a tile pair); reads 8 bytes
  static F keep_bytes(F x, const uint8_t* keep) {
    const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep)));
    return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, _mm256_setzero_si256())));
  }
  // value where b[i] != 0, else x (forced selection blocks); reads 8 bytes
  static F set_where_bytes(F x, const uint8_t* b, float value) {
    const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    return _mm256_blendv_ps(x, set1(value), _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, _mm256_setzero_si256())));
  }
};

#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_avx2

const nsa::cpu::KernelTable* nsa::cpu::kernels_avx2() {
  static const KernelTable t = isa_avx2::make_table(CpuIsa::kAvx2);
  return &t;
}
