// The torch.ops.nsa library: TORCH_LIBRARY once, with the library-wide ops. Each operator's schemas and
// kernels live in its own file (<operator>.cpp) as a TORCH_LIBRARY_FRAGMENT plus TORCH_LIBRARY_IMPL blocks.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "nsa/cpu.h"

namespace {
// The CPU backend's instruction-set paths: (detected by cpuid + XCR0, active after the NSA_CPU_ISA cap).
std::tuple<std::string, std::string> cpu_isa() {
  return {nsa::cpu_isa_name(nsa::cpu_detected_isa()), nsa::cpu_isa_name(nsa::cpu_active_isa())};
}
}  // namespace

TORCH_LIBRARY(nsa, m) { m.def("cpu_isa() -> (str detected, str active)", &cpu_isa); }
