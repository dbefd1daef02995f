// Selected-attention row kernels (kernels.h) compiled with baseline flags (every CPU of the target architecture).
#include <cstdint>

#include "common/rounding.h"
#include "cpu/isa_tables.h"
#include "ops/select_attention/kernels.h"

namespace nsa::select_kernels::isa_scalar {
#include "ops/select_attention/kernels_impl.h"
}  // namespace nsa::select_kernels::isa_scalar

namespace nsa::select_kernels {
const Table* Table::scalar() { return isa_scalar::make_table(CpuIsa::kScalar); }

const Table* table_for(CpuIsa isa) { return cpu::table_for_isa<Table>(isa); }
}  // namespace nsa::select_kernels
