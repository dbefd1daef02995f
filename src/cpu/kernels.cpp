// Kernel table of each CPU path (src/cpu/kernels.h). The x86 tables exist only in x86 builds.
#include "cpu/kernels.h"

namespace nsa::cpu {

const KernelTable* kernels_for(CpuIsa isa) {
  switch (isa) {
#if NSA_HAVE_X86_KERNELS
    case CpuIsa::kAvx512Bf16: return kernels_avx512bf16();
    case CpuIsa::kAvx512: return kernels_avx512();
    case CpuIsa::kAvx2: return kernels_avx2();
#endif
    default: break;
  }
#if NSA_HAVE_X86_KERNELS
  // the scalar table built with FMA: the same results, where the CPU (and OS) can run it
  if (cpu_detected_isa() >= CpuIsa::kAvx2) return kernels_scalar_fma();
#endif
  return kernels_scalar();
}

}  // namespace nsa::cpu
