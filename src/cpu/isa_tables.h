// The per-ISA instances of an operator's own kernel table (internal). An operator with row kernels of its own,
// beside the shared KernelTable (src/cpu/kernels.h), builds them from its kernels_impl.h once per ISA path, each
// translation unit with that ISA's flags, into a table type Table (a struct of function pointers) that declares
// one static member per instance:
//   static const Table* scalar();  // kernels_scalar.cpp, baseline flags: every CPU of the target
//   static const Table* avx2();    // kernels_avx2.cpp: defined in x86 builds only (NSA_HAVE_X86_KERNELS)
//   static const Table* avx512();  // kernels_avx512.cpp: defined in x86 builds only
// table_for_isa<Table> is the choice of one instance for a resolved path.
#pragma once

#include "nsa/cpu.h"

namespace nsa::cpu {

// The instance for a runnable path (resolve_isa's result): avx2 for CpuIsa::kAvx2, avx512 for kAvx512 and
// kAvx512Bf16 (these tables use no bf16 dot product), scalar for kScalar and for every path of a build without
// the x86 sources (which never names avx2 / avx512).
template <class Table>
const Table* table_for_isa(CpuIsa isa) {
#if NSA_HAVE_X86_KERNELS
  switch (isa) {
    case CpuIsa::kAvx2: return Table::avx2();
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16: return Table::avx512();
    default: break;
  }
#else
  (void)isa;
#endif
  return Table::scalar();
}

}  // namespace nsa::cpu
