// peak_probe: measures this machine's peak floating-point throughput, the denominator of the
// "share of peak" figures of bench_forward.py and seed_example.py (see bench/README.md).
//
// For each instruction (vdpbf16ps zmm, vfmadd zmm, vfmadd ymm) it runs many independent accumulator
// chains (peak_kernels.h), once on one thread and once on every core (std::thread, one per core,
// started together behind a spin barrier), and reports the best of several repeats in GFLOP/s.
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

struct Features {
  bool avx2_fma = false;    // AVX2 + FMA, OS saves ymm
  bool avx512f = false;     // AVX-512F, OS saves zmm and opmask
  bool avx512bf16 = false;  // AVX512_BF16 on top of AVX-512F
  std::string model;
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

// Core clock estimate: a chain of dependent integer adds retires one per cycle on every x86 core
// of the last decade, so adds / second ~ cycles / second (under the same load as the FP kernels).
double clock_ghz_once(int64_t iters) {
#ifdef PEAK_X86
  uint64_t x = 0;
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile(
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        : "+r"(x));
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  return 16.0 * static_cast<double>(iters) / s * 1e-9;
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

  // Clock estimate: best of a few short runs (warms the core up before the FP kernels as well).
  double ghz = 0.0;
  for (int r = 0; r < 5; ++r) ghz = std::max(ghz, clock_ghz_once(static_cast<int64_t>(2e7)));

  double g1[kNumKernels] = {0}, gn[kNumKernels] = {0};
  for (int i = 0; i < kNumKernels; ++i) {
    if (!kernels[i].supported) continue;
    g1[i] = measure(kernels[i], 1, seconds, repeats);
    gn[i] = measure(kernels[i], threads, seconds, repeats);
  }
  // Peaks used by the Python benchmarks: bf16 = vdpbf16ps on all cores; fp32 = the faster FMA width.
  double peak_bf16 = 0.0, peak_fp32 = 0.0;
  for (int i = 0; i < kNumKernels; ++i) {
    if (!kernels[i].supported) continue;
    if (!std::strcmp(kernels[i].kind, "bf16")) peak_bf16 = std::max(peak_bf16, gn[i]);
    else peak_fp32 = std::max(peak_fp32, gn[i]);
  }

  if (json) {
    std::printf("{\"cpu\": \"%s\", \"threads\": %d, \"clock_ghz_est\": %.3f, \"seconds\": %.3f, \"repeats\": %d, ",
                f.model.c_str(), threads, ghz, seconds, repeats);
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
    std::printf("}}\n");
    return 0;
  }

  std::printf("peak_probe: %s, %d thread(s) for the all-core runs, clock ~%.2f GHz (dependent-add estimate)\n",
              f.model.empty() ? "unknown CPU" : f.model.c_str(), threads, ghz);
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
  std::printf("\npeak bf16 (vdpbf16ps, all threads): %.1f GFLOP/s\n", peak_bf16);
  std::printf("peak fp32 (FMA, all threads):       %.1f GFLOP/s\n", peak_fp32);
  return 0;
}
