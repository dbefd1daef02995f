// The x86 vectors of the ISA layer: VectorBase (src/cpu/arch/vector_base.h) on __m256 (AVX2, W = 8 fp32 lanes)
// and on __m512 (AVX-512, W = 16), with the exact widenings of W 16-bit values p[0..W) done in registers:
//   load_bf16: bf16 bits to float: zero-extended to 32 bits and shifted into the upper half (vpmovzxwd, vpslld),
//              where VectorBase's generic loop would keep a caller's accumulators (compress's weighted_tile) from
//              being unrolled into registers;
//   load_f16:  fp16 bits to float (vcvtph2ps).
// The base of every x86 traits struct V: the shared KernelTable's (src/cpu/arch/x86/kernels_avx2.cpp and
// avx512_traits.h) and the operators' own (src/ops/<op>/kernels_avx2.cpp, kernels_avx512.cpp). Avx2Vector is used
// only in sources compiled with -mavx2 -mf16c, Avx512Vector only in sources compiled with -mavx512f; each is
// instantiated with the traits struct of one such source (Self), so no instantiation is shared between sources
// compiled with different flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/arch/vector_base.h"

namespace nsa::cpu {

// (the may_alias attribute of __m256 and __m512 is dropped in the template argument: VectorBase loads and stores
// through memcpy)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"

template <typename Self>
struct Avx2Vector : VectorBase<__m256, Self> {
  static __m256 load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static __m256 load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

template <typename Self>
struct Avx512Vector : VectorBase<__m512, Self> {
  static __m512 load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static __m512 load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

#pragma GCC diagnostic pop

}  // namespace nsa::cpu
