// Selected-attention row kernels (kernels.h) compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (x86 only; also the avx512bf16 path).
#include <cstdint>

#include "common/rounding.h"
#include "ops/select_attention/kernels.h"

namespace nsa::select_kernels::isa_avx512 {
#include "ops/select_attention/kernels_impl.h"
}  // namespace nsa::select_kernels::isa_avx512

namespace nsa::select_kernels {
const Table* Table::avx512() { return isa_avx512::make_table(CpuIsa::kAvx512); }
}  // namespace nsa::select_kernels
