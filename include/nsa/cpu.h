// nsa-ops public C++ API: execution options of the CPU backend (torch-free), passed to every *_cpu entry
// point beside the operator's description, as the CUDA entry points take their stream.
#pragma once

#include "nsa/common.h"

namespace nsa {

// CPU instruction-set paths of the CPU backend, in increasing order of capability.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* cpu_isa_name(CpuIsa isa);
// Best path this CPU and OS support (cpuid + XCR0), ignoring NSA_CPU_ISA. kScalar on non-x86 machines.
CpuIsa cpu_detected_isa();
// Path used by default: min(detected, cap from NSA_CPU_ISA=scalar|avx2|avx512|avx512bf16), read once.
CpuIsa cpu_active_isa();
// Whether `isa` can run here (isa <= cpu_detected_isa()).
bool cpu_isa_supported(CpuIsa isa);

struct CpuOptions {
  // -1 uses the active ISA (cpu_active_isa()); otherwise a CpuIsa value to force (an error naming `isa` if this
  // CPU/OS cannot run it). Lets tests run every compiled path on one host.
  int isa = -1;
  // Worker threads; <= 0 means "default" (environment NSA_NUM_THREADS if set, otherwise the number of cores).
  // Results do not depend on this value.
  int num_threads = 0;
};

}  // namespace nsa
