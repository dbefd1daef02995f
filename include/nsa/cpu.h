// nsa-ops public C++ API: execution options of the CPU backend (torch-free), passed to every *_cpu entry
// point beside the operator's description, as the CUDA entry points take their stream.
#pragma once

#include <string>

#include "nsa/common.h"

namespace nsa {

// CPU instruction-set paths of the CPU backend, in increasing order of capability.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* cpu_isa_name(CpuIsa isa);
// Best path this CPU and OS support (cpuid + XCR0), ignoring NSA_CPU_ISA. kScalar on non-x86 machines.
CpuIsa cpu_detected_isa();
// Path used by default, decided once per process (cpu_isa_report()): the fastest path for this CPU (for bf16
// inputs: the vdpbf16ps path or the fp32 FMA path, by a table of CPUs, else by a one-time calibration), or, when
// NSA_CPU_ISA=scalar|avx2|avx512|avx512bf16 is set, that path (capped at cpu_detected_isa()).
CpuIsa cpu_active_isa();
// Whether `isa` can run here (isa <= cpu_detected_isa()).
bool cpu_isa_supported(CpuIsa isa);

// How the default path was chosen; the same object for the whole process.
struct CpuIsaReport {
  CpuIsa detected = CpuIsa::kScalar;   // cpu_detected_isa(): the best path cpuid + XCR0 allow
  CpuIsa preferred = CpuIsa::kScalar;  // the fastest path on this CPU, before NSA_CPU_ISA (differs from detected
                                       // where vdpbf16ps is slower than fp32 FMA; only bf16 inputs see a difference
                                       // between avx512 and avx512bf16, fp32 and fp16 inputs run the same kernels)
  CpuIsa active = CpuIsa::kScalar;     // cpu_active_isa(): what runs when CpuOptions::isa is -1
  std::string cpu;     // cpuid vendor, display family and model, e.g. "AMD family 0x19 model 0x11"
  std::string basis;   // "single path" (no choice to make), "table" (a known CPU), "calibration" (an unknown CPU
                       // with AVX-512 BF16: both GEMMs timed once in this process) or "NSA_CPU_ISA" (the override)
  std::string reason;  // why, in words (the measurement behind the table row, or the calibration's rates)
};
const CpuIsaReport& cpu_isa_report();

struct CpuOptions {
  // -1 uses the active ISA (cpu_active_isa()); otherwise a CpuIsa value to force (an error naming `isa` if this
  // CPU/OS cannot run it). Lets tests run every compiled path on one host.
  int isa = -1;
  // Worker threads; <= 0 means "default" (environment NSA_NUM_THREADS if set, otherwise the number of cores).
  // Results do not depend on this value.
  int num_threads = 0;
};

}  // namespace nsa
