// Compression kernels with baseline flags ("vectors" of one float): the path of non-x86 machines and of
// NSA_CPU_ISA=scalar, and the definition of the operation order that the SIMD paths repeat lane by lane.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/rounding.h"
#include "cpu/arch/scalar/scalar_vector.h"
#include "cpu/isa_tables.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_scalar {

struct V : nsa::cpu::ScalarVector<V> {};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_scalar

namespace nsa::compress_kernels {

const KernelTable* KernelTable::scalar() { return isa_scalar::make_table(CpuIsa::kScalar); }

const KernelTable* kernels_for(CpuIsa isa) {
#if NSA_HAVE_X86_KERNELS
  if (isa == CpuIsa::kAvx512Bf16) return KernelTable::avx512bf16();
#endif
  return cpu::table_for_isa<KernelTable>(isa);
}

}  // namespace nsa::compress_kernels
