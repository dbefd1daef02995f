// peak_probe: measures this machine's peak floating-point throughput, the denominator of the
// "share of peak" figures of bench_forward.py and seed_example.py (see bench/README.md).
//
// For each instruction (vdpbf16ps zmm, vfmadd zmm, vfmadd ymm) it runs many independent accumulator
// chains (peak_kernels.h), once on one thread and once on every core (std::thread, one per core,
// started together behind a spin barrier), and reports the best of several repeats in GFLOP/s.
// The peak of an input dtype is what the fastest instruction that can do its products reaches: for bf16
// inputs the larger of the vdpbf16ps and fp32 FMA peaks (bf16 widens exactly to fp32, and on some CPUs, e.g.
// Intel Emerald Rapids, vdpbf16ps runs at half the FMA rate), for fp16 / fp32 inputs the fp32 FMA peak.
// This file is compiled for the baseline x86-64; the kernels sit in files with their own ISA flags
// and are called only when cpuid and the OS (XCR0) say the instructions can run here.
//
//   peak_probe [--json] [--threads N] [--seconds S] [--repeats R]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define PEAK_X86 1
#endif

#include "peak_kernels.h"

namespace {

using Clock = std::chrono::steady_clock;
volatile uint64_t g_clock_sink = 0;  // keeps the clock chain's result alive

struct Features {
  bool avx2_fma = false;    // AVX2 + FMA, OS saves ymm
  bool avx512f = false;     // AVX-512F, OS saves zmm and opmask
  bool avx512bf16 = false;  // AVX512_BF16 on top of AVX-512F
  std::string model;        // brand string (the same for several generations in some VMs: "AMD EPYC")
  int family = 0;           // display family and model (cpuid leaf 1), which tell those generations apart
  int model_id = 0;
};

Features detect() {
  Features f;
#ifdef PEAK_X86
  unsigned a, b, c, d;
  if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
    char name[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002 + i, &a, &b, &c, &d);
      std::memcpy(name + 16 * i + 0, &a, 4);
      std::memcpy(name + 16 * i + 4, &b, 4);
      std::memcpy(name + 16 * i + 8, &c, 4);
      std::memcpy(name + 16 * i + 12, &d, 4);
    }
    f.model = name;
    while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
    f.model.erase(0, f.model.find_first_not_of(' '));
  }
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  {
    const int base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
    f.family = base_family == 0xf ? base_family + static_cast<int>((a >> 20) & 0xff) : base_family;
    f.model_id = (base_family == 6 || base_family == 0xf) ? static_cast<int>(((a >> 16) & 0xf) << 4) | base_model
                                                          : base_model;
  }
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  uint32_t xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(xhi) << 32) | xlo;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16);
  __cpuid_count(7, 1, a, b, c, d);
  const bool bf16 = a & (1u << 5);
  f.avx2_fma = os_ymm && avx2 && fma;
  f.avx512f = f.avx2_fma && os_zmm && avx512f;
  f.avx512bf16 = f.avx512f && bf16;
#endif
  return f;
}

// Core clock estimate: a chain of dependent 64-bit register multiplies (imul r64, r64), whose latency is
// 3 cycles on every Intel core since Sandy Bridge and every AMD Zen core, timed against the wall clock:
// cycles / second = 3 x multiplies / second (under the same load as the FP kernels). Not a chain of
// `add $1, reg`: recent Intel cores (Golden Cove and later) fold such immediate adds at rename and retire
// several per cycle, which made the old estimate read ~16 GHz on Emerald Rapids.
// The chain runs in short bursts (clock_ghz) and the fastest burst counts: a burst of ~15 us usually runs
// without being descheduled, so the estimate is the core's clock even on a machine shared with other work
// (where the FP figures below, timed over 0.1 s and more, are lower than the peak).
constexpr int kImulLatency = 3;
double clock_ghz_once(int64_t iters) {
#ifdef PEAK_X86
  uint64_t x = 3, one = 1;
  __asm__ volatile("" : "+r"(one));  // opaque: the multiplies cannot be folded away
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile(
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        : "+r"(x)
        : "r"(one));
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  g_clock_sink = x;
  return 16.0 * kImulLatency * static_cast<double>(iters) / s * 1e-9;
#else
  (void)iters;
  return 0.0;
#endif
}

struct Kernel {
  const char* name;   // JSON key
  const char* instr;  // what one instruction is
  const char* kind;   // "bf16" or "fp32": which peak it defines
  int flop_per_instr;
  int chains;
  bool supported;
  float (*fn)(int64_t);
};

volatile float g_sink = 0.f;  // keeps every kernel's result alive

// Runs fn(iters) on n threads started together; returns the wall time from the first thread's start
// to the last thread's end.
double run_threads(float (*fn)(int64_t), int64_t iters, int n) {
  if (n == 1) {
    const auto t0 = Clock::now();
    g_sink = g_sink + fn(iters);
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }
  std::atomic<int> ready{0};
  std::vector<Clock::time_point> start(n), end(n);
  std::vector<float> result(n, 0.f);
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int t = 0; t < n; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load(std::memory_order_acquire) < n) {
      }
      start[t] = Clock::now();
      result[t] = fn(iters);
      end[t] = Clock::now();
    });
  }
  for (auto& th : pool) th.join();
  const auto t0 = *std::min_element(start.begin(), start.end());
  const auto t1 = *std::max_element(end.begin(), end.end());
  for (float r : result) g_sink = g_sink + r;
  return std::chrono::duration<double>(t1 - t0).count();
}

// Best GFLOP/s over `repeats` runs of about `seconds` each on n threads.
double measure(const Kernel& k, int n, double seconds, int repeats) {
  // Calibrate the iteration count on one thread so that one run lasts about `seconds`.
  int64_t iters = 1 << 14;
  for (;;) {
    const double t = run_threads(k.fn, iters, 1);
    if (t > 0.02) {
      iters = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(iters) * seconds / t));
      break;
    }
    iters *= 4;
  }
  const double flop = static_cast<double>(iters) * k.chains * k.flop_per_instr * n;
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) best = std::max(best, flop / run_threads(k.fn, iters, n) * 1e-9);
  return best;
}

void usage() {
  std::fprintf(stderr,
               "usage: peak_probe [--json] [--threads N] [--seconds S] [--repeats R]\n"
               "  --threads N   threads of the all-core run (default: hardware_concurrency)\n"
               "  --seconds S   length of one timed run (default 0.25)\n"
               "  --repeats R   timed runs per figure, the best is kept (default 5)\n");
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  double seconds = 0.25;
  int repeats = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--repeats" && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else {
      usage();
      return a == "-h" || a == "--help" ? 0 : 2;
    }
  }
  if (threads < 1) threads = 1;
  if (seconds <= 0) seconds = 0.25;
  if (repeats < 1) repeats = 1;

  const Features f = detect();
  Kernel kernels[] = {
      {"bf16_dp_512", "vdpbf16ps zmm", "bf16", 64, peak::kChains512, f.avx512bf16, peak::bf16_dp_512},
      {"fp32_fma_512", "vfmadd231ps zmm", "fp32", 32, peak::kChains512, f.avx512f, peak::fp32_fma_512},
      {"fp32_fma_256", "vfmadd231ps ymm", "fp32", 16, peak::kChains256, f.avx2_fma, peak::fp32_fma_256},
  };
  constexpr int kNumKernels = sizeof(kernels) / sizeof(kernels[0]);

  // Clock estimate: the fastest of 4000 bursts of 1000 x 16 dependent imuls (48k cycles, ~15 us at 3 GHz; about
  // 0.06 s in all on a quiet core, which also warms it up before the FP kernels).
  double ghz = 0.0;
  for (int r = 0; r < 4000; ++r) ghz = std::max(ghz, clock_ghz_once(1000));

  double g1[kNumKernels] = {0}, gn[kNumKernels] = {0};
  for (int i = 0; i < kNumKernels; ++i) {
    if (!kernels[i].supported) continue;
    g1[i] = measure(kernels[i], 1, seconds, repeats);
    gn[i] = measure(kernels[i], threads, seconds, repeats);
  }
  // Per instruction kind: bf16 = vdpbf16ps on all cores; fp32 = the faster FMA width. The attainable peak of
  // bf16 inputs is the larger of the two (the products can run on either unit).
  double peak_bf16 = 0.0, peak_fp32 = 0.0;
  for (int i = 0; i < kNumKernels; ++i) {
    if (!kernels[i].supported) continue;
    if (!std::strcmp(kernels[i].kind, "bf16")) peak_bf16 = std::max(peak_bf16, gn[i]);
    else peak_fp32 = std::max(peak_fp32, gn[i]);
  }
  const double peak_bf16_inputs = std::max(peak_bf16, peak_fp32);

  if (json) {
    std::printf("{\"cpu\": \"%s\", \"cpu_family\": %d, \"cpu_model\": %d, \"threads\": %d, \"clock_ghz_est\": %.3f, "
                "\"seconds\": %.3f, \"repeats\": %d, ",
                f.model.c_str(), f.family, f.model_id, threads, ghz, seconds, repeats);
    std::printf("\"kernels\": {");
    for (int i = 0; i < kNumKernels; ++i) {
      const Kernel& k = kernels[i];
      std::printf("%s\"%s\": {\"instr\": \"%s\", \"kind\": \"%s\", \"flop_per_instr\": %d, \"chains\": %d, ",
                  i ? ", " : "", k.name, k.instr, k.kind, k.flop_per_instr, k.chains);
      if (k.supported) {
        std::printf("\"supported\": true, \"gflops_1t\": %.2f, \"gflops_all\": %.2f}", g1[i], gn[i]);
      } else {
        std::printf("\"supported\": false, \"gflops_1t\": null, \"gflops_all\": null}");
      }
    }
    std::printf("}, \"peak_gflops\": {\"bf16\": ");
    if (peak_bf16 > 0) std::printf("%.2f", peak_bf16); else std::printf("null");
    std::printf(", \"fp32\": ");
    if (peak_fp32 > 0) std::printf("%.2f", peak_fp32); else std::printf("null");
    std::printf(", \"bf16_inputs\": ");
    if (peak_bf16_inputs > 0) std::printf("%.2f", peak_bf16_inputs); else std::printf("null");
    std::printf("}}\n");
    return 0;
  }

  std::printf("peak_probe: %s (family 0x%x model 0x%x), %d thread(s) for the all-core runs, clock ~%.2f GHz "
              "(dependent imul chain, 3 cycles each)\n",
              f.model.empty() ? "unknown CPU" : f.model.c_str(), f.family, f.model_id, threads, ghz);
  std::printf("independent accumulator chains; best of %d runs of ~%.2f s each\n\n", repeats, seconds);
  std::printf("%-14s %-17s %5s %7s %12s %12s %14s\n", "kernel", "instruction", "FLOP", "chains", "1 thread",
              "all threads", "FLOP/cycle/core");
  for (int i = 0; i < kNumKernels; ++i) {
    const Kernel& k = kernels[i];
    if (!k.supported) {
      std::printf("%-14s %-17s %5d %7d %12s %12s %14s\n", k.name, k.instr, k.flop_per_instr, k.chains,
                  "unsupported", "-", "-");
      continue;
    }
    const double per_cycle = ghz > 0 ? g1[i] / ghz : 0.0;
    std::printf("%-14s %-17s %5d %7d %8.1f GF/s %8.1f GF/s %14.1f\n", k.name, k.instr, k.flop_per_instr, k.chains,
                g1[i], gn[i], per_cycle);
  }
  std::printf("\npeak vdpbf16ps (all threads):          %.1f GFLOP/s\n", peak_bf16);
  std::printf("peak fp32 FMA (all threads):           %.1f GFLOP/s  = the peak of fp16 / fp32 inputs\n", peak_fp32);
  std::printf("peak of bf16 inputs (the larger):      %.1f GFLOP/s\n", peak_bf16_inputs);
  return 0;
}
