// Compression kernels, AVX-512 with AVX-512 BF16: the avx512 kernels, except that the round-to-nearest-even bf16
// stores of the gradients convert two fp32 vectors with one vcvtne2ps2bf16 (kernels_impl.h, store_pair_bf16). That
// instruction rounds like common/rounding.h's formula on every fp32 input except denormals, which it flushes to zero
// (checked on all 2^32 patterns on a Zen 5); vectors holding a denormal take the integer formula instead.
// Compiled with the avx512 flags plus -mavx512bf16 -ffp-contract=off; called only where cpuid and XCR0 allow it.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/rounding.h"
#include "cpu/arch/x86/vectors.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_avx512bf16 {

struct V : nsa::cpu::Avx512Vector<V> {};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_avx512bf16

const nsa::compress_kernels::KernelTable* nsa::compress_kernels::KernelTable::avx512bf16() {
  return isa_avx512bf16::make_table(CpuIsa::kAvx512Bf16);
}
