// Selected-attention row kernels (kernels.h) compiled with baseline flags (every CPU of the target architecture).
#include <cstdint>

#include "common/rounding.h"
#include "ops/select_attention/kernels.h"

namespace nsa::select_kernels::isa_scalar {
#include "ops/select_attention/kernels_impl.h"
}  // namespace nsa::select_kernels::isa_scalar

namespace nsa::select_kernels {
const Table* table_scalar() { return isa_scalar::make_table(CpuIsa::kScalar); }

const Table* table_for(CpuIsa isa) {
  switch (isa) {
#if NSA_HAVE_X86_KERNELS
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512: return table_avx512();
    case CpuIsa::kAvx2: return table_avx2();
#endif
    default: return table_scalar();
  }
}
}  // namespace nsa::select_kernels
