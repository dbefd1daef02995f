// CPU feature detection and the choice of the default path (the steps are listed in cpu/isa.h).
// Capability: cpuid for the instructions, XCR0 (xgetbv) for the OS saving the wide registers (the Highway rule:
// an ISA is usable only if both agree). Speed: a table keyed by vendor / family / model, a one-time calibration
// for CPUs it does not know. Override: NSA_CPU_ISA. Everything is decided once per process (cpu_isa_report()).
#include "cpu/isa.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define NSA_X86 1
#endif

namespace nsa {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

namespace {

#ifdef NSA_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuIsa detect() {
#ifdef NSA_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return CpuIsa::kScalar;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return CpuIsa::kScalar;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm) return CpuIsa::kScalar;
  if (__get_cpuid_max(0, nullptr) < 7) return CpuIsa::kScalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512bf16 = a1 & (1u << 5);
  if (!(avx2 && fma && f16c)) return CpuIsa::kScalar;
  if (!(os_zmm && avx512f && avx512dq && avx512bw && avx512vl)) return CpuIsa::kAvx2;
  if (!avx512bf16) return CpuIsa::kAvx512;
  return CpuIsa::kAvx512Bf16;
#else
  return CpuIsa::kScalar;
#endif
}

const char* vendor_name(cpu::CpuVendor v) {
  switch (v) {
    case cpu::CpuVendor::kIntel: return "Intel";
    case cpu::CpuVendor::kAmd: return "AMD";
    default: return "other vendor";
  }
}

std::string describe(const cpu::CpuIdentity& id) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s family 0x%x model 0x%x", vendor_name(id.vendor), id.family, id.model);
  return buf;
}

// One row of the speed table: CPUs with AVX-512 BF16 of this vendor and family, models [model_lo, model_hi].
struct TableRow {
  cpu::CpuVendor vendor;
  int family, model_lo, model_hi;
  CpuIsa isa;        // the faster path for bf16 inputs there
  const char* cpus;  // which CPUs these are
  const char* why;   // the measurement behind the row
};

// Rows are looked up in order; only CPUs whose cpuid + XCR0 allow avx512bf16 reach the table.
constexpr TableRow kSpeedTable[] = {
    {cpu::CpuVendor::kIntel, 6, 0x00, 0xff, CpuIsa::kAvx512,
     "Intel family 6 with AVX-512 BF16 (Cooper Lake, Sapphire / Emerald / Granite Rapids)",
     "vdpbf16ps zmm runs at half the rate of vfmadd231ps zmm there (Emerald Rapids, 2 cores: 160-172 against "
     "334-350 GFLOP/s; compressed attention bench-8k forward 336.6 ms on avx512bf16, 221.1 ms on avx512, "
     "backward 763.7 against 469.1 ms)"},
    {cpu::CpuVendor::kAmd, 0x19, 0x00, 0xff, CpuIsa::kAvx512Bf16,
     "AMD family 0x19 with AVX-512 BF16 (Zen 4: Genoa, Bergamo, Siena, Raphael, Phoenix)",
     "vdpbf16ps zmm does about 61 FLOP per cycle per core there, vfmadd231ps zmm 29 (EPYC Genoa, family 0x19 "
     "model 0x11); compressed attention bench-8k on 2 threads, CPU time per thread (best of 3 medians): forward "
     "155 ms on avx512bf16, 255 ms on avx512, 272 ms on avx2, backward 397, 655 and 761 ms; bench-8k G = 1 and "
     "varlen likewise 1.2-1.8x faster on avx512bf16"},
    {cpu::CpuVendor::kAmd, 0x1a, 0x00, 0xff, CpuIsa::kAvx512Bf16,
     "AMD family 0x1a (Zen 5: Turin, Granite Ridge, Strix)",
     "two 512-bit vdpbf16ps per cycle per core on Turin-class cores, twice the fp32 FMA rate (1141 against "
     "571 GFLOP/s on 2 cores); compressed attention bench-8k on one thread: 366 GFLOP/s on avx512bf16, 212 on "
     "avx512"},
};

}  // namespace

namespace cpu {

CpuIdentity host_identity() {
  CpuIdentity id;
  id.detected = cpu_detected_isa();
#ifdef NSA_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return id;
  char vendor[13] = {0};
  std::memcpy(vendor + 0, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  if (!std::strcmp(vendor, "GenuineIntel")) id.vendor = CpuVendor::kIntel;
  else if (!std::strcmp(vendor, "AuthenticAMD")) id.vendor = CpuVendor::kAmd;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return id;
  // display family / model: the extended family is added when the base family is 0xf; the extended model is
  // the high nibble when the base family is 6 or 0xf (Intel SDM vol. 2 CPUID; AMD APM vol. 3 CPUID Fn0000_0001)
  const int base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
  const int ext_family = (a >> 20) & 0xff, ext_model = (a >> 16) & 0xf;
  id.family = base_family == 0xf ? base_family + ext_family : base_family;
  id.model = (base_family == 6 || base_family == 0xf) ? (ext_model << 4) | base_model : base_model;
#endif
  return id;
}

IsaChoice choose_from_table(const CpuIdentity& id) {
  IsaChoice c;
  if (id.detected != CpuIsa::kAvx512Bf16) {
    c.known = true;
    c.isa = id.detected;
    c.basis = "single path";
    c.reason = std::string("the best path this CPU and OS support (cpuid + XCR0); without AVX-512 BF16 there is "
                           "no other candidate for bf16 inputs");
    return c;
  }
  for (const TableRow& row : kSpeedTable) {
    if (row.vendor == id.vendor && row.family == id.family && id.model >= row.model_lo && id.model <= row.model_hi) {
      c.known = true;
      c.isa = row.isa;
      c.basis = "table";
      c.reason = std::string(row.cpus) + ": " + (row.isa == CpuIsa::kAvx512Bf16 ? "the vdpbf16ps path" :
                                                 "the fp32 FMA path") + " is the faster; " + row.why;
      return c;
    }
  }
  c.known = false;
  c.isa = CpuIsa::kAvx512;
  c.basis = "";
  c.reason = describe(id) + " with AVX-512 BF16 is not in the speed table";
  return c;
}

CpuIsa choose_from_timings(double bf16_s, double fp32_s) {
  const bool valid = std::isfinite(bf16_s) && std::isfinite(fp32_s) && bf16_s > 0 && fp32_s > 0;
  if (valid && bf16_s < (1.0 - kCalibrationMargin) * fp32_s) return CpuIsa::kAvx512Bf16;
  return CpuIsa::kAvx512;
}

IsaChoice calibrate_bf16() {
  IsaChoice c;
  c.known = true;
#if NSA_HAVE_X86_KERNELS
  if (cpu_detected_isa() == CpuIsa::kAvx512Bf16) {
    // C[48][256] = A[48][192] . B[192][256]: a q.k tile of the forward (D = 192, 4 key panels). bf16 operands
    // as pairs (96 pairs of the reduction), fp32 operands as widened values; both from L1 / L2 as in the kernels.
    constexpr int64_t R = 48, N = 256, K = 192, kPanels = N / kPanel;
    std::vector<uint16_t> a16(R * K), b16(kPanels * (K / 2) * kPanel * 2);
    std::vector<float> a32(R * K), b32(kPanels * K * kPanel), out(R * N);
    for (size_t i = 0; i < a32.size(); ++i) a32[i] = static_cast<float>(static_cast<int>(i * 7 % 13) - 6) * 0.125f;
    for (size_t i = 0; i < b32.size(); ++i) b32[i] = static_cast<float>(static_cast<int>(i * 5 % 11) - 5) * 0.25f;
    auto bits = [](float f) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      return static_cast<uint16_t>(u >> 16);  // the values above are exact in bf16
    };
    for (size_t i = 0; i < a16.size(); ++i) a16[i] = bits(a32[i]);
    for (size_t i = 0; i < b16.size(); ++i) b16[i] = bits(b32[i % b32.size()]);
    const KernelTable* kb = kernels_avx512bf16();
    const KernelTable* kf = kernels_avx512();
    using Clock = std::chrono::steady_clock;
    constexpr int kCalls = 8, kTrials = 9;
    auto time_bf16 = [&] {
      const auto t0 = Clock::now();
      for (int i = 0; i < kCalls; ++i)
        kb->gemm.bf16(a16.data(), K, R, b16.data(), (K / 2) * kPanel * 2, 0, N, K / 2, K / 2, out.data(), N, 1.0f,
                      false);
      return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    auto time_fp32 = [&] {
      const auto t0 = Clock::now();
      for (int i = 0; i < kCalls; ++i)
        kf->gemm.f32(a32.data(), K, R, b32.data(), K * kPanel, 0, N, K, K, out.data(), N, 1.0f, false);
      return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    time_bf16();  // warm-up: caches, and the wide units' power-up
    time_fp32();
    double best_bf16 = 1e30, best_fp32 = 1e30;
    for (int t = 0; t < kTrials; ++t) {  // interleaved: a load change hits both alike
      best_bf16 = std::min(best_bf16, time_bf16());
      best_fp32 = std::min(best_fp32, time_fp32());
    }
    const double flop = 2.0 * R * N * K * kCalls;
    c.isa = choose_from_timings(best_bf16, best_fp32);
    c.basis = "calibration";
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "timed once in this process: the bf16-pair GEMM (vdpbf16ps) at %.1f GFLOP/s, the fp32 FMA GEMM at "
                  "%.1f GFLOP/s on one core (%dx%dx%d, best of %d); avx512bf16 is taken only when faster by more "
                  "than %.0f %%",
                  flop / best_bf16 * 1e-9, flop / best_fp32 * 1e-9, static_cast<int>(R), static_cast<int>(N),
                  static_cast<int>(K), kTrials, kCalibrationMargin * 100);
    c.reason = buf;
    return c;
  }
#endif
  c.isa = cpu_detected_isa();
  c.basis = "single path";
  c.reason = "no AVX-512 BF16 here: nothing to calibrate";
  return c;
}

CpuIsa apply_isa_env(CpuIsa preferred, CpuIsa detected, const char* env, bool* env_used, bool* bad_env) {
  *env_used = false;
  *bad_env = false;
  if (env == nullptr) return preferred;
  static const CpuIsa kAll[] = {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16};
  for (CpuIsa isa : kAll) {
    if (!std::strcmp(env, cpu_isa_name(isa))) {
      *env_used = true;
      return static_cast<int>(isa) < static_cast<int>(detected) ? isa : detected;
    }
  }
  *bad_env = true;
  return preferred;
}

}  // namespace cpu

namespace {

CpuIsaReport make_report() {
  CpuIsaReport r;
  const cpu::CpuIdentity id = cpu::host_identity();
  r.detected = id.detected;
  r.cpu = describe(id);
  cpu::IsaChoice choice = cpu::choose_from_table(id);
  if (!choice.known) {
    const std::string why = choice.reason;
    choice = cpu::calibrate_bf16();
    choice.reason = why + "; " + choice.reason;
  }
  r.preferred = choice.isa;
  r.basis = choice.basis;
  r.reason = choice.reason;
  const char* env = std::getenv("NSA_CPU_ISA");
  bool env_used = false, bad_env = false;
  r.active = cpu::apply_isa_env(r.preferred, r.detected, env, &env_used, &bad_env);
  if (env_used) {
    r.basis = "NSA_CPU_ISA";
    r.reason = std::string("NSA_CPU_ISA=") + env + " replaces the speed choice" +
               (std::strcmp(env, cpu_isa_name(r.active)) ? std::string(" (above this CPU's best path, ") +
                                                                cpu_isa_name(r.active) + ", which runs)"
                                                          : std::string()) +
               "; the speed choice is " + cpu_isa_name(r.preferred) + " (" + choice.basis + ": " + choice.reason + ")";
  } else if (bad_env) {
    r.reason += std::string("; NSA_CPU_ISA=") + env + " is not a path name (scalar|avx2|avx512|avx512bf16): ignored";
  }
  return r;
}

}  // namespace

const CpuIsaReport& cpu_isa_report() {
  static const CpuIsaReport report = make_report();
  return report;
}

CpuIsa cpu_detected_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa cpu_active_isa() { return cpu_isa_report().active; }

bool cpu_isa_supported(CpuIsa isa) {
  return static_cast<int>(isa) >= 0 && static_cast<int>(isa) <= static_cast<int>(cpu_detected_isa());
}

namespace cpu {
Status resolve_isa(int requested, CpuIsa* out) {
  if (requested == -1) {
    *out = cpu_active_isa();
    return Status::Ok();
  }
  if (requested < 0 || requested > static_cast<int>(CpuIsa::kAvx512Bf16))
    return Status::Error("options.isa must be -1 (auto) or a CpuIsa value, got " + std::to_string(requested));
  const CpuIsa isa = static_cast<CpuIsa>(requested);
  if (!cpu_isa_supported(isa))
    return Status::Error(std::string("options.isa ") + cpu_isa_name(isa) + " is not supported by this CPU/OS (best: " +
                         cpu_isa_name(cpu_detected_isa()) + ")");
  *out = isa;
  return Status::Ok();
}
}  // namespace cpu

}  // namespace nsa
