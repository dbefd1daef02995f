// The scalar table built with FMA enabled (x86 only; compiled with -mfma -ffp-contract=off): the source of
// kernels_scalar.cpp, where std::fma becomes one vfmadd instruction and the compiler may keep independent lanes
// in vector registers. Contraction is off, so the only fused operations are the explicit std::fma calls and
// every result is bitwise the baseline build's (tested by ScalarTables.FmaBuildEqualsBaseline). kernels_for()
// returns this table for CpuIsa::kScalar where cpu_detected_isa() >= kAvx2 (FMA and the OS's AVX state).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/group_sum.h"
#include "common/numeric.h"
#include "cpu/arch/scalar/scalar_vector.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_scalar_fma {
#include "cpu/arch/scalar/scalar_traits.h"
#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_scalar_fma

const nsa::cpu::KernelTable* nsa::cpu::kernels_scalar_fma() {
  static const KernelTable t = isa_scalar_fma::make_table(CpuIsa::kScalar);
  return &t;
}
