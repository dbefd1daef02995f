// Runtime ISA selection of the CPU backend (internal).
//
// The default path is decided once per process in three steps (cpu_isa_report() in include/nsa/cpu.h):
//   1. capability: cpuid + XCR0 give the best path the CPU and OS can run (cpu_detected_isa());
//   2. speed: where two paths can run bf16 inputs (avx512bf16's vdpbf16ps GEMM, or avx512's fp32 FMA GEMM on
//      widened inputs) a table keyed by vendor / family / model says which is faster (choose_from_table, pure);
//      a CPU the table does not know times both GEMMs once (calibrate_bf16) and keeps the faster
//      (choose_from_timings, pure);
//   3. override: NSA_CPU_ISA names the path (apply_isa_env, pure).
// Only bf16 inputs see the difference between avx512 and avx512bf16: fp32 and fp16 inputs run the same fp32
// kernels on both tables.
#pragma once

#include <string>

#include "nsa/cpu.h"

namespace nsa::cpu {

// Resolves CpuOptions::isa (-1 = active ISA) to a runnable path, or an error naming options.isa.
Status resolve_isa(int requested, CpuIsa* out);

enum class CpuVendor : int { kOther = 0, kIntel = 1, kAmd = 2 };

// What the decision looks at: the cpuid vendor, display family and display model (base + extended fields, the
// way Intel's and AMD's manuals combine them) and the best path this CPU and OS can run.
struct CpuIdentity {
  CpuVendor vendor = CpuVendor::kOther;
  int family = 0;
  int model = 0;
  CpuIsa detected = CpuIsa::kScalar;
};

// The identity of the CPU this process runs on (cpuid leaves 0 and 1; zero family / model off x86).
CpuIdentity host_identity();

// A speed decision: the preferred path, the basis (CpuIsaReport::basis values "single path", "table") and one
// sentence of why. known = false when the table does not know the CPU (the caller then calibrates).
struct IsaChoice {
  bool known = false;
  CpuIsa isa = CpuIsa::kScalar;
  const char* basis = "";
  std::string reason;
};

// Pure: the table decision for an identity. A CPU with a single candidate for bf16 inputs (no AVX-512 BF16)
// gets its detected path, basis "single path"; a CPU with AVX-512 BF16 that the table lists gets the listed path,
// basis "table"; any other CPU with AVX-512 BF16 gets known = false.
IsaChoice choose_from_table(const CpuIdentity& id);

// Pure: the calibration rule. Given the seconds of the same GEMM work on vdpbf16ps (bf16_s) and on fp32 FMA
// (fp32_s), avx512bf16 only if it is faster by more than kCalibrationMargin (the fp32 path also follows the
// reference on subnormal bf16 inputs, docs/spec/compress_attention.md §11, so it wins near-ties). Non-finite or
// non-positive times keep avx512.
constexpr double kCalibrationMargin = 0.10;
CpuIsa choose_from_timings(double bf16_s, double fp32_s);

// Times the candidate inner kernels of bf16 inputs on this CPU (needs cpu_detected_isa() == kAvx512Bf16): the
// bf16-pair GEMM of kernels_avx512bf16() and the fp32 GEMM of kernels_avx512() on the same product (48 x 256
// outputs, reduction 192: a q.k tile of the forward), interleaved, best of several runs each. Returns basis
// "calibration", the choice of choose_from_timings and a reason giving both rates in GFLOP/s. Off x86 (or
// without AVX-512 BF16) returns the detected path, basis "single path".
IsaChoice calibrate_bf16();

// Pure: NSA_CPU_ISA applied to the speed choice. env == nullptr (unset): `preferred`. A path name
// (scalar|avx2|avx512|avx512bf16): that path, or the detected one if it is lower (a path the CPU cannot run is
// never chosen); env_used is set. Any other value is ignored (preferred) and `bad_env` is set.
CpuIsa apply_isa_env(CpuIsa preferred, CpuIsa detected, const char* env, bool* env_used, bool* bad_env);

}  // namespace nsa::cpu
