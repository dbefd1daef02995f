// Compression kernels with baseline flags ("vectors" of one float): the path of non-x86 machines and of
// NSA_CPU_ISA=scalar, and the definition of the operation order that the SIMD paths repeat lane by lane.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/rounding.h"
#include "cpu/arch/vector_base.h"
#include "ops/compress/kernels.h"

namespace nsa::compress_kernels::isa_scalar {

struct V : nsa::cpu::VectorBase<float, V> {
  static F load_f16(const uint16_t* p) { return detail::f16_to_f32(*p); }
};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_scalar

namespace nsa::compress_kernels {

const KernelTable* kernels_scalar() { return isa_scalar::make_table(CpuIsa::kScalar); }

const KernelTable* kernels_for(CpuIsa isa) {
#if NSA_HAVE_X86_KERNELS
  switch (isa) {
    case CpuIsa::kAvx2: return kernels_avx2();
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16: return kernels_avx512();
    default: break;
  }
#else
  (void)isa;
#endif
  return kernels_scalar();
}

}  // namespace nsa::compress_kernels
