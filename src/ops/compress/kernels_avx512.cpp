// Compression kernels, AVX-512 (16 fp32 lanes; fp16 widening by vcvtph2ps, the roundings of common/rounding.h on zmm
// registers).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -ffp-contract=off; called only
// where cpuid and XCR0 allow it (resolve_isa). Also serves the avx512bf16 path.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/rounding.h"
#include "cpu/arch/vector_base.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_avx512 {

// (__m512's may_alias attribute is dropped in the template argument: VectorBase loads and stores through memcpy)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
struct V : nsa::cpu::VectorBase<__m512, V> {
  // bf16 bits to float (exact): widened to 32 bits and shifted into the upper half, in registers (VectorBase's
  // generic loop keeps weighted_tile's accumulators from being unrolled into registers)
  static F load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
#pragma GCC diagnostic pop

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx512

namespace nsa::compress_kernels {
const KernelTable* kernels_avx512() { return isa_avx512::make_table(CpuIsa::kAvx512); }
}  // namespace nsa::compress_kernels
