// Compression kernels, AVX2 (8 fp32 lanes; F16C widening, the roundings of common/rounding.h on ymm registers).
// Compiled with -mavx2 -mfma -mf16c -ffp-contract=off; called only where cpuid and XCR0 allow it (resolve_isa).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/rounding.h"
#include "cpu/arch/x86/vectors.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_avx2 {

struct V : nsa::cpu::Avx2Vector<V> {};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx2

const nsa::compress_kernels::KernelTable* nsa::compress_kernels::KernelTable::avx2() {
  return isa_avx2::make_table(CpuIsa::kAvx2);
}
