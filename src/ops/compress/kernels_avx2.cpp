// Compression kernels, AVX2 (8 fp32 lanes; F16C widening, the roundings of common/rounding.h on ymm registers).
// Compiled with -mavx2 -mfma -mf16c -ffp-contract=off; called only where cpuid and XCR0 allow it (resolve_isa).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/rounding.h"
#include "cpu/arch/vector_base.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_avx2 {

// (__m256's may_alias attribute is dropped in the template argument: VectorBase loads and stores through memcpy)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
struct V : nsa::cpu::VectorBase<__m256, V> {
  // bf16 bits to float (exact): widened to 32 bits and shifted into the upper half, in registers (VectorBase's
  // generic loop keeps weighted_tile's accumulators from being unrolled into registers)
  static F load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
#pragma GCC diagnostic pop

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx2

namespace nsa::compress_kernels {
const KernelTable* kernels_avx2() { return isa_avx2::make_table(CpuIsa::kAvx2); }
}  // namespace nsa::compress_kernels
