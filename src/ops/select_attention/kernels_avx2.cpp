// Selected-attention row kernels (kernels.h) compiled with -mavx2 -mfma -mf16c (x86 only; called where cpuid and XCR0 allow it).
#include <cstdint>

#include "common/rounding.h"
#include "ops/select_attention/kernels.h"

namespace nsa::select_kernels::isa_avx2 {
#include "ops/select_attention/kernels_impl.h"
}  // namespace nsa::select_kernels::isa_avx2

namespace nsa::select_kernels {
const Table* Table::avx2() { return isa_avx2::make_table(CpuIsa::kAvx2); }
}  // namespace nsa::select_kernels
