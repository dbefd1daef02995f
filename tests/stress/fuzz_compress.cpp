// Seeded random configurations of the compression operator (docs/spec/compress.md): compress_cpu and
// compress_backward_cpu on EVERY ISA path this host supports (cpu_isa_supported) and several thread counts and
// work splits, against the reference and the independent fp64 model of tests/cpp/compress/compress_test_util.h:
//   output, input_grad   bitwise equal to the reference (the same order of additions; any NaN equals any NaN),
//                        and the reference within the §9 rule of the model;
//   weight_grad          within the §9 rule of the model, and bitwise equal across ISA paths, thread counts and
//                        work splits.
// The generator varies together: dtype; l from 1 to 200 and d <= l; N, D (odd, below and above the vector widths);
// batches (empty, shorter than l, leading zeros, tails); layouts (permuted dims, padding, inner steps, negative
// strides, stride-0 dims with constant data, transposed / strided weights); values (uniform at random scales,
// small integers with exact sums and ties of the final rounding, fp16 results in the subnormal range, magnitudes
// near the dtype's largest value); the work split (task size, workers started).
//
// Environment: NSA_FUZZ_SEED (base seed; default 20260301, fixed so that a CI run repeats the last local run),
// NSA_FUZZ_N (configurations, default 200), NSA_FUZZ_SECONDS (time cap, default 100: stops early and says so),
// NSA_FUZZ_VERBOSE=1 (one line per configuration). Configuration i uses seed base + i and a failure prints it:
//   NSA_FUZZ_SEED=<printed seed> NSA_FUZZ_N=1 ./fuzz_compress
// reproduces it. Exit status 1 on any mismatch. Last line:
//   fuzz_compress: N configurations x M ISA paths, 0 mismatches (seed S)
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "compress/compress_test_util.h"
#include "ops/compress/cpu_tuning.h"

namespace nsa_compress_test {
namespace {

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtoull(s, nullptr, 10) : dflt;
}

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin(double p) { return std::uniform_real_distribution<double>(0, 1)(g) < p; }
  double uni(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); }
};

Layout3 random_layout3(Rng& rng, bool allow_zero) {
  Layout3 lay;
  if (rng.coin(0.5)) {
    static const std::array<int, 3> orders[] = {{0, 1, 2}, {1, 0, 2}, {0, 2, 1}, {2, 1, 0}, {1, 2, 0}, {2, 0, 1}};
    lay.order = orders[rng.pick(0, 5)];
  }
  if (rng.coin(0.3))
    for (auto& p : lay.pad) p = rng.pick(0, 3);
  if (rng.coin(0.2)) lay.step = rng.pick(2, 3);
  if (rng.coin(0.15)) lay.reverse_dim = static_cast<int>(rng.pick(0, 2));
  if (allow_zero && rng.coin(0.1)) lay.zero_dim = static_cast<int>(rng.pick(0, 2));
  return lay;
}

// A random configuration; returns false when it should be skipped (none so far).
Case make_case(Rng& rng) {
  static const DType dts[] = {DType::kBF16, DType::kF16, DType::kF32, DType::kF64};
  Case cs;
  cs.dtype = dts[rng.pick(0, 3)];
  cs.l = rng.coin(0.1) ? rng.pick(49, 200) : rng.pick(1, 48);
  cs.d = rng.coin(0.3) ? cs.l : rng.pick(1, cs.l);
  cs.N = rng.pick(1, 5);
  cs.D = rng.coin(0.1) ? 192 : rng.pick(1, 80);
  const int64_t B = rng.pick(1, 6);
  int64_t acc = 0;
  if (rng.coin(0.2)) cs.lens.push_back(0);  // a leading zero: an empty first batch
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kind = rng.pick(0, 9);
    const int64_t S = kind == 0 ? 0 : kind <= 2 ? rng.pick(0, cs.l) : rng.pick(cs.l, 3 * cs.l + 2 * cs.d + 5);
    cs.lens.push_back(acc += S);
  }
  // keep the work small: at most about 400k input elements
  while (cs.T() * cs.N * cs.D > 400000 && cs.D > 1) cs.D = cs.D / 2;
  cs.resize();

  const int64_t mode = rng.pick(0, 9);
  if (mode <= 4) {  // uniform at a random scale
    const double scale = std::ldexp(1.0, static_cast<int>(rng.pick(-6, 6)));
    cs.fill_uniform(rng.g, -scale, scale);
  } else if (mode <= 6) {  // small integers: exact sums, ties of the final rounding (bf16 above 256, fp16 above 2048)
    const int hi = cs.dtype == DType::kBF16 ? 300 : cs.dtype == DType::kF16 ? 2100 : 9;
    std::uniform_int_distribution<int> u(-hi, hi), wu(-2, 2);
    for (double& x : cs.input) x = representable(cs.dtype, u(rng.g));
    for (double& x : cs.weight) x = wu(rng.g);
    for (double& x : cs.grad) x = representable(cs.dtype, u(rng.g));
  } else if (mode == 7 && cs.dtype == DType::kF16) {  // fp16 results in the subnormal range
    cs.fill_uniform(rng.g, -1e-3, 1e-3);
    for (double& x : cs.weight) x = representable(cs.dtype, rng.uni(-0.02, 0.02));
  } else if (mode == 8) {  // magnitudes near the largest value (positive: no partial sum overflows and comes back)
    const double big = cs.dtype == DType::kF16 ? 60000 : cs.dtype == DType::kBF16 ? 3e38 : cs.dtype == DType::kF32 ? 3e38 : 1e300;
    for (double& x : cs.input) x = representable(cs.dtype, rng.uni(big / 8, big));
    for (double& x : cs.weight) x = representable(cs.dtype, rng.uni(0, 1));
    for (double& x : cs.grad) x = representable(cs.dtype, rng.uni(0, 1));
  } else {
    cs.fill_uniform(rng.g, -1, 1);
  }
  cs.input_layout = random_layout3(rng, true);
  cs.grad_layout = random_layout3(rng, true);
  // stride-0 dims need constant data along them
  if (cs.input_layout.zero_dim >= 0) cs.make_input_constant_along(cs.input_layout.zero_dim);
  if (cs.grad_layout.zero_dim >= 0) {
    const int dim = cs.grad_layout.zero_dim;
    for (int64_t r = 0; r < cs.R(); ++r)
      for (int64_t n = 0; n < cs.N; ++n)
        for (int64_t j = 0; j < cs.D; ++j)
          cs.grad[cs.gi(r, n, j)] = cs.grad[cs.gi(dim == 0 ? 0 : r, dim == 1 ? 0 : n, dim == 2 ? 0 : j)];
  }
  if (rng.coin(0.3)) {
    cs.weight_layout.transposed = rng.coin(0.5);
    cs.weight_layout.pad = {rng.pick(0, 2), rng.pick(0, 2)};
    cs.weight_layout.step = rng.pick(1, 2);
  }
  return cs;
}

int run(uint64_t base, uint64_t n, double seconds, bool verbose) {
  const std::vector<CpuIsa> isas = supported_isas();
  std::string names;
  for (CpuIsa isa : isas) names += std::string(names.empty() ? "" : " ") + nsa::cpu_isa_name(isa);
  std::printf("fuzz_compress: seed %" PRIu64 ", %" PRIu64 " configurations, ISA paths: %s\n", base, n, names.c_str());
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t done = 0, mismatches = 0;
  for (uint64_t i = 0; i < n; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) {
      std::printf("fuzz_compress: time cap of %.0f s reached after %" PRIu64 " configurations\n", seconds, done);
      break;
    }
    const uint64_t seed = base + i;
    Rng rng(seed);
    const Case cs = make_case(rng);
    nsa::compress_detail::CpuTuning tune;
    tune.task_bytes = rng.coin(0.5) ? int64_t(1) << rng.pick(0, 16) : tune.task_bytes;
    tune.bytes_per_worker = rng.coin(0.7) ? 1 : tune.bytes_per_worker;
    tune.stream_bytes = rng.coin(0.5) ? 0 : tune.stream_bytes;  // stream_in
    tune.stream_task_bytes = int64_t(1) << rng.pick(0, 18);
    const int threads = static_cast<int>(rng.pick(2, 7));
    if (verbose) std::printf("  seed %" PRIu64 ": %s threads 1,%d\n", seed, cs.describe().c_str(), threads);
    std::vector<std::string> failures;
    auto fail = [&](const std::string& what, const AssertionResult& r) {
      if (!r) failures.push_back(what + ": " + r.message());
    };
    const Model m = make_model(cs);
    const FwdResult ref_f = run_forward(cs, Backend::kReference);
    const BwdResult ref_b = run_backward(cs, Backend::kReference);
    fail("reference forward vs model", check_forward(cs, ref_f, m));
    fail("reference backward vs model", check_backward(cs, ref_b, m));
    bool have_first = false;
    BwdResult first;
    for (CpuIsa isa : isas) {
      for (int th : {1, threads}) {
        nsa::compress_detail::set_cpu_tuning(th == 1 ? nsa::compress_detail::CpuTuning() : tune);
        const std::string where = std::string(nsa::cpu_isa_name(isa)) + " threads " + std::to_string(th);
        const FwdResult f = run_forward(cs, Backend::kCpu, static_cast<int>(isa), th);
        const BwdResult b = run_backward(cs, Backend::kCpu, static_cast<int>(isa), th);
        if (!f.status.ok() || !b.status.ok()) {
          failures.push_back(where + ": call failed: " + f.status.message() + b.status.message());
          continue;
        }
        fail(where + " output vs reference", same_values(f.bytes, ref_f.bytes, cs.dtype, "output"));
        fail(where + " input_grad vs reference", same_values(b.in_bytes, ref_b.in_bytes, cs.dtype, "input_grad"));
        if (!have_first) {
          fail(where + " backward vs model", check_backward(cs, b, m));
          first = b;
          have_first = true;
        } else {
          fail(where + " weight_grad vs the first path", same_values(b.w_bytes, first.w_bytes, cs.dtype, "weight_grad"));
        }
      }
    }
    nsa::compress_detail::set_cpu_tuning(nsa::compress_detail::CpuTuning());
    ++done;
    if (!failures.empty()) {
      ++mismatches;
      std::printf("MISMATCH seed %" PRIu64 " (%s):\n", seed, cs.describe().c_str());
      for (size_t k = 0; k < failures.size() && k < 6; ++k) std::printf("  %s\n", failures[k].c_str());
      std::fflush(stdout);
    }
  }
  std::printf("fuzz_compress: %" PRIu64 " configurations x %zu ISA paths, %" PRIu64 " mismatches (seed %" PRIu64 ")\n",
              done, isas.size(), mismatches, base);
  return mismatches == 0 ? 0 : 1;
}

}  // namespace
}  // namespace nsa_compress_test

int main() {
  const uint64_t seed = nsa_compress_test::env_u64("NSA_FUZZ_SEED", 20260301);
  const uint64_t n = nsa_compress_test::env_u64("NSA_FUZZ_N", 200);
  const double seconds = static_cast<double>(nsa_compress_test::env_u64("NSA_FUZZ_SECONDS", 100));
  const bool verbose = nsa_compress_test::env_u64("NSA_FUZZ_VERBOSE", 0) != 0;
  return nsa_compress_test::run(seed, n, seconds, verbose);
}
