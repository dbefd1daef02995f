// CPU feature detection: cpuid for the instructions, XCR0 (xgetbv) for the OS saving the wide
// registers (the Highway rule: an ISA is usable only if both agree). NSA_CPU_ISA caps the choice.
#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>
#include <string>

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

CpuIsa active() {
  CpuIsa isa = cpu_detected_isa();
  if (const char* env = std::getenv("NSA_CPU_ISA")) {
    CpuIsa cap = isa;
    if (!std::strcmp(env, "scalar")) cap = CpuIsa::kScalar;
    else if (!std::strcmp(env, "avx2")) cap = CpuIsa::kAvx2;
    else if (!std::strcmp(env, "avx512")) cap = CpuIsa::kAvx512;
    else if (!std::strcmp(env, "avx512bf16")) cap = CpuIsa::kAvx512Bf16;
    if (static_cast<int>(cap) < static_cast<int>(isa)) isa = cap;
  }
  return isa;
}

}  // namespace

CpuIsa cpu_detected_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa cpu_active_isa() {
  static const CpuIsa isa = active();
  return isa;
}

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
