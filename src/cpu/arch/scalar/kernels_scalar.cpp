// The scalar table: kernels_impl.h on the portable traits of scalar_traits.h, built for the baseline of the
// target. On x86 the same source is also built with FMA enabled (kernels_scalar_fma.cpp), which kernels_for()
// prefers where the CPU has it: std::fma is then an instruction instead of a call into libm's fmaf (about 30x
// faster), with the same results (a fused multiply-add rounds once, however it is computed).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/group_sum.h"
#include "common/numeric.h"
#include "cpu/arch/scalar/scalar_vector.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_scalar {
#include "cpu/arch/scalar/scalar_traits.h"
#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_scalar

const nsa::cpu::KernelTable* nsa::cpu::kernels_scalar() {
  static const KernelTable t = isa_scalar::make_table(CpuIsa::kScalar);
  return &t;
}
