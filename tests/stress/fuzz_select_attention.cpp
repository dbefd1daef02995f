// Seeded random configurations of the selected-attention operator (docs/spec/select_attention.md):
// select_attention_cpu and select_attention_backward_cpu on EVERY ISA path this host supports against the fp64
// model of tests/cpp/select_attention/select_util.h (an implementation of §3-§8 independent of src/) with its
// comparison rules (§10: attention_out within 2 x the plain fp32 implementation's error + the rounding floor;
// statistics rtol 1e-5, rows without visible entry exact; gradients within 3 x the plain implementation's error
// + the floor), plus, per configuration and ISA path:
//   - a different thread count (1..7) and tiny tiles / chunks / pieces (src/ops/select_attention/cpu.h) on one of
//     them: forward bits unchanged across thread counts, backward bits unchanged across thread counts;
//   - NaN in key/value rows that no entry can see (past the last prefix sum, blocks no row selects, positions no
//     row reaches): forward and backward still within the tolerance of the clean model (not bitwise: a block holding
//     NaN takes the CPU backend's exact path for the entries that see it in part).
// The generator varies together: B in 1..4 with empty query and key sequences, Sq != Skv, partial last blocks, G
// in {1, 2, 3, 5, 8, 16}, D and Dv (odd, Dv < D), l' in {1..80}, K in 1..12, causal on and off, index patterns
// (uniform with -1 and duplicates, NSA-like causal selections, all -1, all future blocks, one block everywhere),
// values (uniform with a random scale, integers with ties), layouts (permuted dims, padding, inner step 2),
// int32 / int64 indices in their own layouts, and the scale.
//
// Environment: NSA_FUZZ_SEED (base seed; default 20261130, a fixed seed so that CI runs the same configurations;
// always printed), NSA_FUZZ_N (configurations, default 200), NSA_FUZZ_SECONDS (time cap, default 100: stops early
// and says so), NSA_FUZZ_VERBOSE=1 (one line per configuration). Configuration i uses seed base + i; a failure
// prints it, so
//   NSA_FUZZ_SEED=<printed seed> NSA_FUZZ_N=1 ./fuzz_select_attention
// reproduces it. Exit status 1 on any mismatch. Last line:
//   fuzz leg (select_attention): N configurations x M ISA paths, 0 mismatches (seed S)
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "select_attention/select_util.h"

namespace sel_test {
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
  template <typename T>
  T one_of(std::initializer_list<T> xs) {
    return *(xs.begin() + pick(0, static_cast<int64_t>(xs.size()) - 1));
  }
};

void random_layout(Rng& r, Layout& lay) {
  std::shuffle(lay.order.begin(), lay.order.end(), r.g);
  for (auto& p : lay.pad) p = r.coin(0.5) ? r.pick(0, 3) : 0;
  lay.step = r.coin(0.3) ? 2 : 1;
}

struct Config {
  SCase cs;
  int threads = 1;
  std::string what;
};

Config make_config(uint64_t seed) {
  Rng r(seed);
  Config c;
  const DType dt = r.one_of({DType::kBF16, DType::kBF16, DType::kF16, DType::kF32, DType::kF64});
  const int64_t B = r.pick(1, 4);
  const int64_t lp = r.one_of<int64_t>({1, 2, 3, 4, 7, 8, 16, 16, 32, 64, 80});
  std::vector<int64_t> sq(static_cast<size_t>(B)), skv(static_cast<size_t>(B));
  const bool self = r.coin(0.6);  // Sq_b == Skv_b (the NSA use)
  for (int64_t b = 0; b < B; ++b) {
    sq[static_cast<size_t>(b)] = r.coin(0.15) ? 0 : r.pick(1, 70);
    skv[static_cast<size_t>(b)] = self ? sq[static_cast<size_t>(b)] : (r.coin(0.1) ? 0 : r.pick(1, 90));
  }
  const int64_t G = r.one_of<int64_t>({1, 1, 2, 3, 5, 8, 16});
  const int64_t N2 = r.pick(1, 2);
  const int64_t D = r.one_of<int64_t>({1, 3, 8, 16, 17, 24, 33});
  const int64_t Dv = r.coin(0.5) ? D : r.pick(1, D);
  const int64_t K = r.pick(1, 12);
  c.cs = SCase::make(dt, sq, skv, G * N2, N2, D, Dv, lp, K);
  c.cs.causal = r.coin(0.7);
  c.cs.extra_kv_rows = r.coin(0.5) ? r.pick(1, 3) : 0;
  c.cs.index_dtype = r.coin(0.3) ? IndexDType::kInt64 : IndexDType::kInt32;
  c.cs.resize();
  if (r.coin(0.2)) c.cs.fill_ints(r.g, -3, 3);
  else {
    const double a = r.one_of({0.5, 1.0, 2.0, 4.0});
    c.cs.fill_uniform(r.g, -a, a);
  }
  if (r.coin(0.2)) c.cs.scale = r.one_of({0.0, -0.3, 1.0, 2.5, 1e-3});
  const int pattern = static_cast<int>(r.pick(0, 5));
  switch (pattern) {
    case 0: case 1: c.cs.random_indices(r.g, r.uni(0, 0.4), r.uni(0, 0.3)); break;
    case 2: c.cs.causal_indices(r.g); break;
    case 3: break;  // all -1
    case 4:  // the last block of the batch in every slot (future for most rows when causal; partial when Skv % l')
      for (int64_t b = 0; b < B; ++b)
        for (int64_t s = 0; s < sq[static_cast<size_t>(b)]; ++s)
          for (int64_t n = 0; n < N2; ++n)
            for (int64_t j = 0; j < K; ++j) c.cs.index(c.cs.q_begin(b) + s, n, j) = c.cs.blocks(b) - 1;
      break;
    default:  // block 0 everywhere (one block reached by every row: many entries, pieces)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t s = 0; s < sq[static_cast<size_t>(b)]; ++s)
          for (int64_t n = 0; n < N2; ++n)
            for (int64_t j = 0; j < K; ++j) c.cs.index(c.cs.q_begin(b) + s, n, j) = c.cs.blocks(b) > 0 ? 0 : -1;
      break;
  }
  if (r.coin(0.3)) random_layout(r, c.cs.q_layout);
  if (r.coin(0.3)) random_layout(r, c.cs.k_layout);
  if (r.coin(0.3)) random_layout(r, c.cs.v_layout);
  if (r.coin(0.3)) random_layout(r, c.cs.idx_layout);
  c.threads = static_cast<int>(r.pick(2, 7));
  c.what = "pattern " + std::to_string(pattern);
  return c;
}

// Key/value rows no entry reaches (visible_rows over every query row), for the NaN check.
std::vector<char> unreached_rows(const SCase& cs) {
  std::vector<char> seen(static_cast<size_t>(cs.T2() * cs.N2), 0);
  for (int64_t t = 0; t < cs.T1(); ++t)
    for (int64_t n2 = 0; n2 < cs.N2; ++n2)
      for (int64_t row : visible_rows(cs, t, n2)) seen[static_cast<size_t>(row * cs.N2 + n2)] = 1;
  for (char& x : seen) x = !x;
  return seen;
}

bool cpu_rounds(DType dt, CpuIsa isa) { return dt == DType::kBF16 && isa == CpuIsa::kAvx512Bf16; }

int run_config(uint64_t seed, const std::vector<CpuIsa>& isas, bool verbose) {
  const Config c = make_config(seed);
  const SCase& cs = c.cs;
  int bad = 0;
  auto fail = [&](const char* what, CpuIsa isa, const std::string& msg) {
    ++bad;
    std::printf("MISMATCH seed %" PRIu64 " (%s, %s) %s: %s\n  %s\n", seed, c.what.c_str(), nsa::cpu_isa_name(isa), what,
                msg.c_str(), cs.describe().c_str());
  };
  const SOracle o = make_oracle(cs);
  std::mt19937_64 rng(seed ^ 0x5eed);
  const BwdInputs in = make_bwd_inputs(cs, rng);
  const GradModel gm = make_grad_model(cs, in);
  const Grads ref = run_bwd(cs, in, cs.dtype == DType::kF64 ? BwdBackend::kRefFp64 : BwdBackend::kRefFp32);
  const Grads rounded = run_bwd(cs, in, BwdBackend::kPlainRounded);
  // NaN in the rows no entry reaches (the forward and backward must not read them)
  SCase poisoned = cs;
  const std::vector<char> unreached = unreached_rows(cs);
  for (int64_t r = 0; r < cs.T2(); ++r)
    for (int64_t n = 0; n < cs.N2; ++n)
      if (unreached[static_cast<size_t>(r * cs.N2 + n)]) {
        for (int64_t d = 0; d < cs.D; ++d) poisoned.k[cs.ki(r, n, d)] = kNaN;
        for (int64_t d = 0; d < cs.Dv; ++d) poisoned.v[cs.vi(r, n, d)] = kNaN;
      }
  for (CpuIsa isa : isas) {
    if (isa == CpuIsa::kScalar && cs.T1() * cs.N1 * cs.K * cs.lp > 200000) continue;  // its reference-order GEMM is slow
    const SResult got = run_cpu(cs, isa, 1);
    AssertionResult a = check_forward(cs, o, got);
    if (!a) fail("forward vs model", isa, a.message());
    a = bitwise_equal(got, run_cpu(cs, isa, c.threads));
    if (!a) fail("forward thread count", isa, std::string(a.message()) + " threads " + std::to_string(c.threads));
    // (within the tolerance, not bitwise: a block holding NaN takes the exact path for its partly visible entries)
    a = check_forward(cs, o, run_cpu(poisoned, isa, 1));
    if (!a) fail("forward reads unreached rows", isa, a.message());
    const Grads g = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 1);
    const bool r = cpu_rounds(cs.dtype, isa);
    a = check_grads(cs, g, gm, r ? rounded : ref, r);
    if (a) a = check_structural_zeros(cs, g);
    if (!a) fail("backward vs model", isa, a.message());
    a = check_grads(cs, run_bwd(poisoned, in, BwdBackend::kCpu, static_cast<int>(isa), 1), gm, r ? rounded : ref, r);
    if (!a) fail("backward reads unreached rows", isa, a.message());
    const Grads gt = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), c.threads);
    if (g.raw != gt.raw) fail("backward thread count", isa, "gradients differ with threads " + std::to_string(c.threads));
    const nsa::select_cpu::Tuning tiny{3, 2, 3, 5};
    const Grads gs = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 1, &tiny);
    a = check_grads(cs, gs, gm, r ? rounded : ref, r);
    if (!a) fail("backward with tiny tiles / chunks / pieces vs model", isa, a.message());
    const Grads gst = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), c.threads, &tiny);
    if (gs.raw != gst.raw) fail("backward (tiny tiles) thread count", isa, "gradients differ");
    const SResult ts = run_cpu_tuned(cs, isa, 1, nsa::select_cpu::Tuning{3, 0, 0, 0});
    a = check_forward(cs, o, ts);
    if (a) a = bitwise_equal(ts, run_cpu_tuned(cs, isa, c.threads, nsa::select_cpu::Tuning{3, 0, 0, 0}));
    if (!a) fail("forward with tiny tiles", isa, a.message());
  }
  if (verbose) std::printf("seed %" PRIu64 " %s: %s\n", seed, bad ? "MISMATCH" : "ok", cs.describe().c_str());
  return bad;
}

}  // namespace
}  // namespace sel_test

int main() {
  using namespace sel_test;
  const uint64_t base = env_u64("NSA_FUZZ_SEED", 20261130);
  const uint64_t n = env_u64("NSA_FUZZ_N", 200);
  const double cap = static_cast<double>(env_u64("NSA_FUZZ_SECONDS", 100));
  const bool verbose = env_u64("NSA_FUZZ_VERBOSE", 0) != 0;
  const std::vector<CpuIsa> isas = supported_isas();
  std::printf("fuzz_select_attention: seed %" PRIu64 ", %" PRIu64 " configurations, %zu ISA paths\n", base, n,
              isas.size());
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t done = 0;
  int mismatches = 0;
  for (; done < n; ++done) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > cap) {
      std::printf("time cap of %.0f s reached after %" PRIu64 " configurations\n", cap, done);
      break;
    }
    mismatches += run_config(base + done, isas, verbose);
  }
  std::printf("fuzz leg (select_attention): %" PRIu64 " configurations x %zu ISA paths, %d mismatches (seed %" PRIu64 ")\n",
              done, isas.size(), mismatches, base);
  return mismatches == 0 && done > 0 ? 0 : 1;
}
