// Compression kernels, AVX-512 (16 fp32 lanes; fp16 widening by vcvtph2ps, the roundings of common/rounding.h on zmm
// registers).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -ffp-contract=off; called only
// where cpuid and XCR0 allow it (resolve_isa). Also serves the avx512bf16 path.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/rounding.h"
#include "cpu/arch/x86/vectors.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_avx512 {

struct V : nsa::cpu::Avx512Vector<V> {};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx512

const nsa::compress_kernels::KernelTable* nsa::compress_kernels::KernelTable::avx512() {
  return isa_avx512::make_table(CpuIsa::kAvx512);
}
