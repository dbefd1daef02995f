// AVX-512F kernels (fp32 FMA GEMM). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq.
#include <immintrin.h>

#include <cstdint>

#include "common/group_sum.h"
#include "cpu/arch/x86/vectors.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_avx512 {
#include "cpu/arch/x86/avx512_traits.h"
#include "cpu/arch/x86/avx512_transpose.h"
#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_avx512

const nsa::cpu::KernelTable* nsa::cpu::kernels_avx512() {
  static const KernelTable t = isa_avx512::make_table(CpuIsa::kAvx512, nullptr, nullptr, isa_avx512::transpose_u16_impl,
                                                      isa_avx512::transpose_u32_avx512);
  return &t;
}
