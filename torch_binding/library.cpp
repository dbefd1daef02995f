// The torch.ops.nsa library: TORCH_LIBRARY once, with the library-wide ops. Each operator's schemas and
// kernels live in its own file (<operator>.cpp) as a TORCH_LIBRARY_FRAGMENT plus TORCH_LIBRARY_IMPL blocks.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "nsa/cpu.h"
#include "output_cache.h"

namespace {
// The CPU backend's instruction-set paths: (detected by cpuid + XCR0, active after the NSA_CPU_ISA cap).
std::tuple<std::string, std::string> cpu_isa() {
  return {nsa::cpu_isa_name(nsa::cpu_detected_isa()), nsa::cpu_isa_name(nsa::cpu_active_isa())};
}

// How the active path was chosen (nsa::cpu_isa_report(), decided once per process): the detected path, the
// fastest path on this CPU before NSA_CPU_ISA, the active path, the CPU's vendor / family / model, the basis of
// the choice ("single path", "table", "calibration" or "NSA_CPU_ISA") and the reason in words.
std::tuple<std::string, std::string, std::string, std::string, std::string, std::string> cpu_isa_report() {
  const nsa::CpuIsaReport& r = nsa::cpu_isa_report();
  return {nsa::cpu_isa_name(r.detected), nsa::cpu_isa_name(r.preferred), nsa::cpu_isa_name(r.active), r.cpu,
          r.basis, r.reason};
}

// The cache of large CPU outputs (output_cache.h): (limit, cached bytes, cached blocks, blocks held by tensors, hits,
// misses).
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> cpu_output_cache_info() {
  const nsa_torch::OutputCacheStats s = nsa_torch::output_cache_stats();
  return {s.limit_bytes, s.cached_bytes, s.cached_blocks, s.live_blocks, s.hits, s.misses};
}
}  // namespace

TORCH_LIBRARY(nsa, m) {
  m.def("cpu_isa() -> (str detected, str active)", &cpu_isa);
  m.def("cpu_isa_report() -> (str detected, str preferred, str active, str cpu, str basis, str reason)",
        &cpu_isa_report);
  m.def("cpu_output_cache_info() -> (int limit_bytes, int cached_bytes, int cached_blocks, int live_blocks, int hits, "
        "int misses)",
        &cpu_output_cache_info);
  m.def("cpu_output_cache_clear() -> ()", &nsa_torch::output_cache_clear);
}
