// The choice of the CPU backend's default path (src/cpu/isa.h): the speed table on synthetic vendor / family /
// model identities, the calibration rule, the NSA_CPU_ISA override, and the process-wide report on this host.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>

#include "cpu/isa.h"
#include "nsa/cpu.h"
#include "test_util.h"

namespace {

using nsa::CpuIsa;
using nsa::cpu::CpuIdentity;
using nsa::cpu::CpuVendor;
using nsa::cpu::IsaChoice;

CpuIdentity ident(CpuVendor v, int family, int model, CpuIsa detected) {
  CpuIdentity id;
  id.vendor = v;
  id.family = family;
  id.model = model;
  id.detected = detected;
  return id;
}

std::string where(const CpuIdentity& id) {
  return "vendor " + std::to_string(static_cast<int>(id.vendor)) + " family " + std::to_string(id.family) +
         " model " + std::to_string(id.model) + " detected " + nsa::cpu_isa_name(id.detected);
}

void expect_table(const CpuIdentity& id, CpuIsa want) {
  SCOPED_TRACE(where(id));
  const IsaChoice c = nsa::cpu::choose_from_table(id);
  EXPECT_TRUE(c.known);
  EXPECT_EQ(c.isa, want);
  EXPECT_STREQ(c.basis, "table");
  EXPECT_FALSE(c.reason.empty());
}

// Intel cores with AVX-512 BF16: vdpbf16ps at half the fp32 FMA rate (Emerald Rapids measured), the FMA path.
TEST(IsaChoice, IntelWithBf16TakesTheFmaPath) {
  for (int model : {0x55 /* Cooper Lake */, 0x8f /* Sapphire Rapids */, 0xcf /* Emerald Rapids */,
                    0xad /* Granite Rapids */, 0xae})
    expect_table(ident(CpuVendor::kIntel, 6, model, CpuIsa::kAvx512Bf16), CpuIsa::kAvx512);
}

// AMD Zen 4 (family 0x19 with AVX-512 BF16) and Zen 5 (family 0x1a): the vdpbf16ps path.
TEST(IsaChoice, AmdZen4AndZen5TakeTheBf16Path) {
  for (int model : {0x10, 0x11 /* Genoa */, 0x18, 0x61 /* Raphael */, 0x74 /* Phoenix */, 0xa0 /* Bergamo */})
    expect_table(ident(CpuVendor::kAmd, 0x19, model, CpuIsa::kAvx512Bf16), CpuIsa::kAvx512Bf16);
  for (int model : {0x02 /* Turin */, 0x11, 0x24 /* Strix */, 0x44 /* Granite Ridge */})
    expect_table(ident(CpuVendor::kAmd, 0x1a, model, CpuIsa::kAvx512Bf16), CpuIsa::kAvx512Bf16);
}

// Without AVX-512 BF16 there is one candidate: the detected path, whatever the table says about the family.
TEST(IsaChoice, WithoutBf16TheDetectedPathRuns) {
  const CpuIdentity ids[] = {
      ident(CpuVendor::kAmd, 0x19, 0x01, CpuIsa::kAvx2),        // Zen 3 (Milan): no AVX-512
      ident(CpuVendor::kAmd, 0x17, 0x31, CpuIsa::kAvx2),        // Zen 2
      ident(CpuVendor::kIntel, 6, 0x55, CpuIsa::kAvx512),       // Skylake-SP / Cascade Lake: AVX-512, no BF16
      ident(CpuVendor::kIntel, 6, 0x6a, CpuIsa::kAvx512),       // Ice Lake-SP
      ident(CpuVendor::kIntel, 6, 0x8f, CpuIsa::kAvx2),         // AVX-512 state not enabled by the OS
      ident(CpuVendor::kOther, 0x18, 0x00, CpuIsa::kAvx2),      // Hygon
      ident(CpuVendor::kOther, 0, 0, CpuIsa::kScalar),          // not x86
  };
  for (const CpuIdentity& id : ids) {
    SCOPED_TRACE(where(id));
    const IsaChoice c = nsa::cpu::choose_from_table(id);
    EXPECT_TRUE(c.known);
    EXPECT_EQ(c.isa, id.detected);
    EXPECT_STREQ(c.basis, "single path");
  }
}

// A CPU with AVX-512 BF16 that the table does not list is left to the calibration.
TEST(IsaChoice, UnknownCpuWithBf16IsCalibrated) {
  const CpuIdentity ids[] = {
      ident(CpuVendor::kIntel, 0x13, 0x01, CpuIsa::kAvx512Bf16),  // a future Intel family
      ident(CpuVendor::kAmd, 0x1b, 0x00, CpuIsa::kAvx512Bf16),    // a future AMD family
      ident(CpuVendor::kAmd, 0x17, 0x31, CpuIsa::kAvx512Bf16),    // a family the table has no row for
      ident(CpuVendor::kOther, 0x18, 0x10, CpuIsa::kAvx512Bf16),  // another vendor
  };
  for (const CpuIdentity& id : ids) {
    SCOPED_TRACE(where(id));
    const IsaChoice c = nsa::cpu::choose_from_table(id);
    EXPECT_FALSE(c.known);
    EXPECT_NE(c.reason.find("not in the speed table"), std::string::npos) << c.reason;
  }
}

// A table decision depends on the identity alone: the same answer every time.
TEST(IsaChoice, TableIsDeterministic) {
  for (int vendor = 0; vendor < 3; ++vendor)
    for (int family : {6, 0x17, 0x19, 0x1a})
      for (int model = 0; model < 256; model += 5)
        for (int d = 0; d < 4; ++d) {
          const CpuIdentity id = ident(static_cast<CpuVendor>(vendor), family, model, static_cast<CpuIsa>(d));
          const IsaChoice a = nsa::cpu::choose_from_table(id), b = nsa::cpu::choose_from_table(id);
          ASSERT_EQ(a.known, b.known) << where(id);
          ASSERT_EQ(a.isa, b.isa) << where(id);
          ASSERT_STREQ(a.basis, b.basis);
          ASSERT_EQ(a.reason, b.reason);
          // never a path the CPU cannot run
          if (a.known) {
            ASSERT_LE(static_cast<int>(a.isa), d) << where(id);
          }
        }
}

// The calibration rule: vdpbf16ps only when faster by more than the margin; anything odd keeps the FMA path.
TEST(IsaChoice, CalibrationRule) {
  using nsa::cpu::choose_from_timings;
  const double m = nsa::cpu::kCalibrationMargin;
  EXPECT_EQ(choose_from_timings(0.5, 1.0), CpuIsa::kAvx512Bf16);
  EXPECT_EQ(choose_from_timings(1.0 - m - 0.01, 1.0), CpuIsa::kAvx512Bf16);
  EXPECT_EQ(choose_from_timings(1.0 - m + 0.01, 1.0), CpuIsa::kAvx512);  // a near tie
  EXPECT_EQ(choose_from_timings(1.0, 1.0), CpuIsa::kAvx512);
  EXPECT_EQ(choose_from_timings(2.0, 1.0), CpuIsa::kAvx512);  // half rate (Emerald Rapids)
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  for (double bad : {0.0, -1.0, inf, nan}) {
    EXPECT_EQ(choose_from_timings(bad, 1.0), CpuIsa::kAvx512) << bad;
    EXPECT_EQ(choose_from_timings(0.5, bad), CpuIsa::kAvx512) << bad;
  }
}

// NSA_CPU_ISA names the path (capped at the detected one); unset keeps the speed choice; other values are ignored.
TEST(IsaChoice, NsaCpuIsaOverride) {
  using nsa::cpu::apply_isa_env;
  bool used = true, bad = true;
  EXPECT_EQ(apply_isa_env(CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, nullptr, &used, &bad), CpuIsa::kAvx512);
  EXPECT_FALSE(used);
  EXPECT_FALSE(bad);
  struct Row {
    const char* env;
    CpuIsa detected, want;
  } rows[] = {
      {"scalar", CpuIsa::kAvx512Bf16, CpuIsa::kScalar},
      {"avx2", CpuIsa::kAvx512Bf16, CpuIsa::kAvx2},
      {"avx512", CpuIsa::kAvx512Bf16, CpuIsa::kAvx512},
      {"avx512bf16", CpuIsa::kAvx512Bf16, CpuIsa::kAvx512Bf16},  // above the speed choice avx512: named, so it runs
      {"avx512bf16", CpuIsa::kAvx512, CpuIsa::kAvx512},          // above what the CPU runs: capped
      {"avx512bf16", CpuIsa::kAvx2, CpuIsa::kAvx2},
      {"avx512", CpuIsa::kScalar, CpuIsa::kScalar},
  };
  for (const Row& r : rows) {
    for (CpuIsa preferred : {CpuIsa::kScalar, CpuIsa::kAvx512, r.detected}) {
      if (static_cast<int>(preferred) > static_cast<int>(r.detected)) continue;
      SCOPED_TRACE(std::string(r.env) + " detected " + nsa::cpu_isa_name(r.detected));
      EXPECT_EQ(apply_isa_env(preferred, r.detected, r.env, &used, &bad), r.want);
      EXPECT_TRUE(used);
      EXPECT_FALSE(bad);
    }
  }
  for (const char* env : {"", "AVX2", "avx512bf", "avx-512", "auto", " avx2"}) {
    SCOPED_TRACE(env);
    EXPECT_EQ(apply_isa_env(CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, env, &used, &bad), CpuIsa::kAvx512);
    EXPECT_FALSE(used);
    EXPECT_TRUE(bad);
  }
}

// This host: the report agrees with the public queries, with the pure steps, and stays the same object.
TEST(IsaChoice, HostReport) {
  const nsa::CpuIsaReport& r = nsa::cpu_isa_report();
  EXPECT_EQ(&r, &nsa::cpu_isa_report());
  EXPECT_EQ(r.detected, nsa::cpu_detected_isa());
  EXPECT_EQ(r.active, nsa::cpu_active_isa());
  EXPECT_LE(static_cast<int>(r.preferred), static_cast<int>(r.detected));
  EXPECT_LE(static_cast<int>(r.active), static_cast<int>(r.detected));
  EXPECT_FALSE(r.reason.empty());
  std::printf("cpu_isa_report: %s: detected %s, preferred %s, active %s (%s): %s\n", r.cpu.c_str(),
              nsa::cpu_isa_name(r.detected), nsa::cpu_isa_name(r.preferred), nsa::cpu_isa_name(r.active),
              r.basis.c_str(), r.reason.c_str());
  const nsa::cpu::CpuIdentity id = nsa::cpu::host_identity();
  EXPECT_EQ(id.detected, r.detected);
  const IsaChoice t = nsa::cpu::choose_from_table(id);
  if (t.known) {  // a known CPU: the table's answer, not a timing
    EXPECT_EQ(r.preferred, t.isa);
  }
  const char* env = std::getenv("NSA_CPU_ISA");
  bool used = false, bad = false;
  EXPECT_EQ(r.active, nsa::cpu::apply_isa_env(r.preferred, r.detected, env, &used, &bad));
  EXPECT_EQ(r.basis == "NSA_CPU_ISA", used);
  if (!used) {
    EXPECT_EQ(r.basis, t.known ? t.basis : "calibration");
  }
  nsa::CpuIsa isa = nsa::CpuIsa::kScalar;
  ASSERT_TRUE(nsa::cpu::resolve_isa(-1, &isa).ok());
  EXPECT_EQ(isa, r.active);
}

// cpuid's family / model decoding against the kernel's (Linux /proc/cpuinfo, first processor).
TEST(IsaChoice, HostIdentityMatchesProcCpuinfo) {
#if !(defined(__x86_64__) || defined(__i386__))
  // cpuid exists only on x86 (host_identity() is all zeros elsewhere); under qemu-user /proc/cpuinfo describes
  // the x86 host, not the emulated CPU.
  GTEST_SKIP() << "cpuid is x86 only";
#endif
  std::ifstream f("/proc/cpuinfo");
  if (!f) GTEST_SKIP() << "no /proc/cpuinfo";
  int family = -1, model = -1;
  std::string vendor, line;
  while (std::getline(f, line) && (family < 0 || model < 0 || vendor.empty())) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    const std::string value = line.substr(colon + 1);
    if (key == "cpu family" && family < 0) family = std::atoi(value.c_str());
    else if (key == "model" && model < 0) model = std::atoi(value.c_str());
    else if (key == "vendor_id" && vendor.empty()) vendor = value.substr(value.find_first_not_of(' '));
  }
  if (family < 0 || model < 0) GTEST_SKIP() << "no x86 family / model in /proc/cpuinfo";
  const nsa::cpu::CpuIdentity id = nsa::cpu::host_identity();
  EXPECT_EQ(id.family, family);
  EXPECT_EQ(id.model, model);
  EXPECT_EQ(id.vendor, vendor == "GenuineIntel" ? CpuVendor::kIntel
                       : vendor == "AuthenticAMD" ? CpuVendor::kAmd
                                                  : CpuVendor::kOther);
}

// The calibration of unknown CPUs runs here too (it is not used on a CPU the table knows): a valid choice, reported
// with both rates.
TEST(IsaChoice, CalibrationRunsAndReports) {
  const IsaChoice c = nsa::cpu::calibrate_bf16();
  EXPECT_TRUE(c.known);
  if (nsa::cpu_detected_isa() != CpuIsa::kAvx512Bf16) {
    EXPECT_EQ(c.isa, nsa::cpu_detected_isa());
    EXPECT_STREQ(c.basis, "single path");
    return;
  }
  EXPECT_STREQ(c.basis, "calibration");
  EXPECT_TRUE(c.isa == CpuIsa::kAvx512 || c.isa == CpuIsa::kAvx512Bf16) << nsa::cpu_isa_name(c.isa);
  EXPECT_NE(c.reason.find("GFLOP/s"), std::string::npos) << c.reason;
  std::printf("calibration: %s -> %s\n", c.reason.c_str(), nsa::cpu_isa_name(c.isa));
}

// The choice between avx512 and avx512bf16 matters for bf16 inputs only: fp32 and fp16 inputs run the same fp32
// kernels on both tables, so their results are bitwise equal (compressed attention forward, groups of 1 and 5).
TEST(IsaChoice, Fp32AndFp16ResultsDoNotDependOnTheBf16Choice) {
  if (!nsa::cpu_isa_supported(CpuIsa::kAvx512Bf16)) GTEST_SKIP() << "needs AVX-512 BF16 (both paths)";
  for (nsa::DType dt : {nsa::DType::kF32, nsa::DType::kF16}) {
    for (int64_t N1 : {2, 10}) {
      nsa_test::Case cs = nsa_test::Case::make(dt, {9, 40}, {13, 6}, N1, 2, 32, 16, 32, 16, 64, 2);
      std::mt19937_64 rng(7 + N1);
      cs.fill_uniform(rng, -1, 1);
      SCOPED_TRACE(cs.describe());
      const nsa_test::Result a = nsa_test::run_cpu(cs, CpuIsa::kAvx512), b = nsa_test::run_cpu(cs, CpuIsa::kAvx512Bf16);
      ASSERT_TRUE(a.status.ok()) << a.status.message();
      EXPECT_TRUE(nsa_test::bitwise_equal(a, b));
    }
  }
}

}  // namespace
