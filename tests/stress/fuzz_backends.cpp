// Seeded random configurations: compress_attention_cpu on EVERY ISA path this host supports
// (cpu_isa_supported) against the references (reference::forward_fp64 = the fp64 model of
// docs/spec/compress_attention.md, reference::forward_fp32 = the plain same-dtype implementation), with the
// comparison rules of the C++ suite's test_util.h (check_all):
//   attention_out  error vs the fp64 model <= 2 x the fp32 reference's error + the dtype rounding floor
//   softmax stats  rtol 1e-5 (+ the dot-product rounding bound for values near 0); fully masked rows exact
//   topk_indices   identical where the k-th / (k+1)-th model scores are separated by more than rounding;
//                  elsewhere the model scores at the returned indices match, no duplicates, in range
// plus, per configuration and ISA path:
//   - NaN in key rows that atten_mask removes for every query row: outputs bitwise unchanged;
//   - a different num_threads (1..7): outputs bitwise unchanged.
// The generator covers what the C++ suite's own fuzz does not vary together: batches with Sq_b = 0
// (several in a row, first or last), C_b around M and multiples of 16, G in {1,2,3,4,5,8}, D and D2 not
// multiples of 16, every legal (l, d, l'), K = min_b Sel_b, masks (none, causal §9, random with fully
// masked rows, band, everything masked, a masked column band), forced blocks (none, §9 local, random,
// more than K, all), values (uniform with a random scale, large scores: sharp softmax, small-integer ties,
// all-equal keys, huge scores that overflow to -inf under the scale), layouts (permuted dims, padding,
// inner step 2, stride-0 dims with constant data, transposed/padded masks), extra key rows (NaN, ignored).
//
// Environment: NSA_FUZZ_SEED (base seed: unset or empty = the fixed kDefaultSeed, so that a CI run explores
// the same configurations as the last local one and fails only on a change of the code; "random" = a fresh
// seed from std::random_device, for exploration; else the number), NSA_FUZZ_N (configurations, default 300),
// NSA_FUZZ_SECONDS (time cap, default 100: stops early and says so), NSA_FUZZ_VERBOSE=1 (one line per config).
// The base seed is printed first. Configuration i uses seed base + i; a failure prints that seed, so
//   NSA_FUZZ_SEED=<printed seed> NSA_FUZZ_N=1 ./fuzz_backends
// reproduces it. Exit status 1 on any mismatch. Last line:
//   fuzz leg: N configurations x M ISA paths, 0 mismatches (seed S)
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "test_util.h"

namespace nsa_test {
namespace {

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtoull(s, nullptr, 10) : dflt;
}

constexpr uint64_t kDefaultSeed = 20261125;

// The base seed from NSA_FUZZ_SEED (see the top of the file); *how says where it came from. Exits with
// status 2 on a value that is neither a decimal number nor "random".
uint64_t base_seed(const char** how) {
  const char* s = std::getenv("NSA_FUZZ_SEED");
  if (!s || !*s) {
    *how = "fixed default; NSA_FUZZ_SEED=random for a fresh one";
    return kDefaultSeed;
  }
  if (std::string(s) == "random") {
    std::random_device rd;
    *how = "random, NSA_FUZZ_SEED=random";
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  char* end = nullptr;
  const uint64_t v = std::strtoull(s, &end, 10);
  if (*end != '\0' || *s == '-') {
    std::fprintf(stderr, "fuzz_backends: NSA_FUZZ_SEED must be a decimal number or 'random', got '%s'\n", s);
    std::exit(2);
  }
  *how = "given, NSA_FUZZ_SEED";
  return v;
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

// Makes the logical values of a 3-D array constant along `dim` (required by a stride-0 layout there).
void make_constant_along(std::vector<double>& vals, const int64_t size[3], int dim) {
  for (int64_t i = 0; i < size[0]; ++i)
    for (int64_t j = 0; j < size[1]; ++j)
      for (int64_t k = 0; k < size[2]; ++k) {
        int64_t src[3] = {i, j, k};
        src[dim] = 0;
        vals[static_cast<size_t>((i * size[1] + j) * size[2] + k)] =
            vals[static_cast<size_t>((src[0] * size[1] + src[1]) * size[2] + src[2])];
      }
}

void random_layout(Rng& r, Layout3& lay) {
  std::shuffle(lay.order.begin(), lay.order.end(), r.g);
  for (auto& p : lay.pad) p = r.coin(0.5) ? r.pick(0, 5) : 0;
  lay.step = r.coin(0.3) ? 2 : 1;
}

struct Config {
  Case cs;
  int threads = 0;
  int64_t nan_col = -1;  // a mask column removed for every query row (NaN key check), or -1
  bool large = false;      // scores of magnitude ~100: see check_out_ext
  bool overflow = false;   // scores overflow float32 (column 0 masked for every row)
  bool nonfinite = false;  // NaN / inf in used inputs: structural checks only
  std::string notes;
};

Config random_config(uint64_t seed) {
  Rng r(seed);
  Config cf;
  std::string& notes = cf.notes;
  // (l, d, l'): every legal triple (§6)
  struct Blk {
    int64_t l, d, lp;
  };
  std::vector<Blk> blks;
  for (int64_t d = 16; d <= 64; d += 16)
    for (int64_t l = d; l <= 128; l += 16)
      for (int64_t lp = l; lp <= 128; lp += 16)
        if (lp % d == 0) blks.push_back({l, d, lp});
  const Blk bk = blks[static_cast<size_t>(r.pick(0, static_cast<int64_t>(blks.size()) - 1))];
  const int64_t M = bk.lp / bk.d;
  const DType dt = r.one_of({DType::kBF16, DType::kBF16, DType::kF16, DType::kF32});
  const int64_t G = r.one_of<int64_t>({1, 1, 2, 3, 4, 5, 8});
  const int64_t N2 = G >= 5 ? 1 : r.pick(1, 3);
  const int64_t D = r.coin(0.3) ? 16 * r.pick(1, 5) : r.pick(1, 80);
  const int64_t D2 = r.coin(0.4) ? D : r.pick(1, D);
  const int64_t B = r.pick(1, 5);
  std::vector<int64_t> sq(static_cast<size_t>(B)), c(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qk = r.pick(0, 9);
    sq[static_cast<size_t>(b)] = qk < 2 ? 0 : qk < 8 ? r.pick(1, 24) : r.pick(25, 90);
    const int64_t ck = r.pick(0, 7);
    c[static_cast<size_t>(b)] = ck == 0   ? 1
                                : ck == 1 ? std::max<int64_t>(1, M - 1)
                                : ck == 2 ? M
                                : ck == 3 ? M + 1
                                : ck == 4 ? std::max<int64_t>(1, 16 * r.pick(1, 4) + r.pick(-1, 1))
                                          : r.pick(1, 100);
  }
  if (std::accumulate(sq.begin(), sq.end(), int64_t(0)) == 0) sq[static_cast<size_t>(r.pick(0, B - 1))] = r.pick(1, 30);
  Case probe = Case::make(dt, sq, c, N2 * G, N2, D, D2, bk.l, bk.d, bk.lp, 1);
  const int64_t kmax = std::min<int64_t>(32, probe.min_sel());
  const int64_t K = r.coin(0.3) ? kmax : r.pick(1, kmax);
  Case cs = Case::make(dt, sq, c, N2 * G, N2, D, D2, bk.l, bk.d, bk.lp, K);
  cs.extra_kv_rows = r.coin(0.25) ? r.pick(1, 4) : 0;
  cs.pass_sel = r.coin(0.5);
  cs.resize();

  // values
  const int64_t fill = r.pick(0, 12);
  if (fill < 6) {
    cs.fill_uniform(r.g, -1, 1);
    cs.scale *= std::exp(r.uni(-1.5, 1.5));
    notes += "uniform";
  } else if (fill < 8) {
    cs.fill_uniform(r.g, -4, 4);  // scores up to ~16 sqrt(D): a sharp softmax
    cs.scale = r.uni(0.5, 2.0);
    cf.large = true;
    notes += "large";
  } else if (fill < 10) {
    cs.fill_ints(r.g, -2, 2);  // exact products: many exact ties in the scores
    cs.scale = r.one_of({1.0, 0.5, 0.25});
    notes += "ints";
  } else if (fill < 11) {
    cs.fill_uniform(r.g, -1, 1);
    for (auto& x : cs.k)
      if (!std::isnan(x)) x = 0.5;  // every score of a row equal
    notes += "equal-keys";
  } else if (fill < 12) {
    // q >= 0 >= k and a huge scale: q.k * scale overflows float32 to -inf for many entries, below the
    // -FLT_MAX of masked entries (the "wide" rows of §3.3: P = 1/n over the masked columns). Column 0 is
    // masked for every row below, so that no row is all -inf (which is NaN in float32 and finite in the
    // fp64 model: no common ground to compare).
    std::uniform_real_distribution<double> u(0, 1);
    cs.fill_all([&] { return u(r.g); });
    for (auto& x : cs.k)
      if (!std::isnan(x)) x = -x;
    cs.scale = r.uni(1e37, 3e38);
    cf.overflow = true;
    notes += "overflow";
  } else {
    // non-finite values in used positions: NaN / +-inf propagate; only the structure is checked
    cs.fill_uniform(r.g, -1, 1);
    const double bad[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity()};
    const int64_t valid_kv = cs.T2() - cs.extra_kv_rows;
    for (int64_t i = r.pick(1, 4); i > 0; --i) {
      const double x = bad[r.pick(0, 2)];
      const int64_t which = r.pick(0, 2);
      if (which == 0) cs.q[cs.qi(r.pick(0, cs.T() - 1), r.pick(0, cs.N1 - 1), r.pick(0, cs.D - 1))] = x;
      if (which == 1) cs.k[cs.ki(r.pick(0, valid_kv - 1), r.pick(0, cs.N2 - 1), r.pick(0, cs.D - 1))] = x;
      if (which == 2) cs.v[cs.vi(r.pick(0, valid_kv - 1), r.pick(0, cs.N2 - 1), r.pick(0, cs.D2 - 1))] = x;
    }
    cf.nonfinite = true;
    notes += "nonfinite";
  }

  // masks (the C++ Case stores them logically; the layouts below)
  const int64_t am = r.pick(0, 6);
  if (am == 1) cs.set_causal_mask(), notes += " causal";
  if (am == 2) cs.set_random_mask(r.g, r.uni(0, 1), 0.25), notes += " random-mask";
  if (am == 3) cs.set_band_mask(r.pick(1, 40), r.pick(-5, 5)), notes += " band";
  if (am == 4) {  // every entry masked: every row takes the §5 closed form
    cs.enable_atten_mask();
    std::fill(cs.atten.begin(), cs.atten.end(), uint8_t(1));
    notes += " all-masked";
  }
  if (am == 5) {  // random mask with values other than 1 (non-zero = remove)
    cs.set_random_mask(r.g, r.uni(0, 0.7), 0.1);
    for (auto& x : cs.atten)
      if (x) x = static_cast<uint8_t>(r.pick(1, 255));
    notes += " mask-bytes";
  }
  if (am == 6) {  // a band of columns removed for every row
    cs.enable_atten_mask();
    const int64_t a = r.pick(0, cs.max_c() - 1), b = r.pick(a, cs.max_c() - 1);
    for (int64_t s = 0; s < cs.max_sq(); ++s)
      for (int64_t i = a; i <= b; ++i) cs.atten_at(s, i) = 1;
    notes += " column-band";
  }
  if (cf.overflow) {
    if (!cs.has_atten) cs.enable_atten_mask();
    for (int64_t s = 0; s < cs.max_sq(); ++s) cs.atten_at(s, 0) = 1;
  }
  const int64_t tm = r.pick(0, 5);
  if (tm == 1) cs.set_local_topk_mask(), notes += " local-topk";
  if (tm == 2) cs.set_random_topk_mask(r.g, r.uni(0, 0.5)), notes += " random-topk";
  if (tm == 3) {
    cs.set_random_topk_mask(r.g, 0.9);  // more forced blocks than K (§5)
    notes += " many-forced";
  }
  if (tm == 4) {
    cs.enable_topk_mask();
    std::fill(cs.topk.begin(), cs.topk.end(), uint8_t(1));
    notes += " all-forced";
  }

  // a column removed for every row, with NaN keys there in the NaN check
  if (cs.has_atten) {
    std::vector<int64_t> cols;
    for (int64_t i = 0; i < cs.max_c(); ++i) {
      bool all = true;
      for (int64_t s = 0; s < cs.max_sq() && all; ++s) all = cs.atten_at(s, i) != 0;
      if (all) cols.push_back(i);
    }
    if (!cols.empty()) cf.nan_col = cols[static_cast<size_t>(r.pick(0, static_cast<int64_t>(cols.size()) - 1))];
  }

  // layouts
  if (r.coin(0.4)) {
    random_layout(r, cs.q_layout);
    random_layout(r, cs.k_layout);
    random_layout(r, cs.v_layout);
    cs.atten_layout.transposed = r.coin(0.5);
    cs.atten_layout.pad = {r.pick(0, 3), r.pick(0, 3)};
    cs.topk_layout.transposed = r.coin(0.5);
    cs.topk_layout.pad = {r.pick(0, 3), r.pick(0, 3)};
    notes += " strided";
  }
  if (r.coin(0.1)) {  // query broadcast over heads (stride 0, as torch's expand gives)
    cs.q_layout.zero_dim = 1;
    const int64_t qsz[3] = {cs.T(), cs.N1, cs.D};
    make_constant_along(cs.q, qsz, 1);
    notes += " q-expand-heads";
  }
  if (r.coin(0.1) && cs.extra_kv_rows == 0) {  // value constant along D2 (stride 0 on the last dim)
    cs.v_layout.zero_dim = 2;
    const int64_t vsz[3] = {cs.T2(), cs.N2, cs.D2};
    make_constant_along(cs.v, vsz, 2);
    notes += " v-expand-d2";
  }
  cf.threads = static_cast<int>(r.pick(1, 7));
  cf.cs = std::move(cs);
  return cf;
}

// Structure of a call whose inputs hold NaN/inf in used positions: success, and topk_indices in
// [0, Sel_b) without duplicates for every row (NaN scores rank lowest); values are not checked.
::testing::AssertionResult check_structure(const Case& cs, const Result& r) {
  if (!r.status.ok()) return ::testing::AssertionFailure() << "call failed: " << r.status.message();
  for (int64_t t = 0; t < cs.T(); ++t) {
    const int64_t Sel = cs.sel(cs.batch_of(t));
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      std::vector<char> seen(static_cast<size_t>(Sel), 0);
      for (int64_t i = 0; i < cs.K; ++i) {
        const int32_t x = r.topk[static_cast<size_t>((t * cs.N2 + n2) * cs.K + i)];
        if (x < 0 || x >= Sel || seen[static_cast<size_t>(x)]++)
          return ::testing::AssertionFailure() << "topk_indices[" << t << "][" << n2 << "][" << i << "] = " << x
                                               << ": outside [0, " << Sel << ") or repeated";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// attention_out with FlashAttention's rule (test_util's check_out: max error <= 2 x the plain fp32 reference's max
// error + the rounding floor) widened, only where check_out fails, by two documented floors:
// * large (|S| ~ 100, a sharp softmax): the rule compares two samples of the same error, the fp32 rounding
//   of S = q.k (§3.1 mandates float32) amplified by the softmax (dO = sum_c dP_c v_c, |dP_c| <= 2 P_c max|dS|);
//   two equally accurate summation orders then differ by factors of 2-9 on small outputs (measured: median
//   ratio 1.0, tail 8.9 over 69 such configurations). Floor: 2 sqrt(D) eps |scale| sum_j |q_j k_j| x
//   sum_c P_c |v_c| (the probabilistic sqrt(D) growth of a D-term fp32 dot product).
// * the avx512bf16 path with bf16 inputs: VDPBF16PS treats subnormal inputs as zero whatever MXCSR says, so
//   P_c < FLT_MIN (exp(S - m) below e^-87) is dropped from P.V. Floor: C_b x FLT_MIN x max|v| (1e-36 here).
//   The same property also drops subnormal q / k values from q.k (a deviation from §3.1, documented in
//   docs/spec/compress_attention.md §11; this generator makes no subnormal inputs).
::testing::AssertionResult check_out_ext(const Case& cs, const Result& got, const Oracle& o, bool large, bool daz) {
  ::testing::AssertionResult first = check_out(cs, got, o.model, o.plain, o.md);
  if (first || (!large && !daz)) return first;
  double plain_err = 0, vmax = 0;
  for (size_t i = 0; i < o.model.out.size(); ++i)
    plain_err = std::max(plain_err, std::fabs(o.plain.out[i] - o.model.out[i]));
  for (double x : cs.v)
    if (std::isfinite(x)) vmax = std::max(vmax, std::fabs(x));
  const double daz_term = daz ? static_cast<double>(cs.max_c()) * FLT_MIN * vmax : 0.0;
  for (size_t i = 0; i < o.model.out.size(); ++i) {
    const size_t th = i / static_cast<size_t>(cs.D2);
    const double score_term =
        large ? 2 * std::sqrt(static_cast<double>(cs.D)) * FLT_EPSILON * o.md.dot_abs[th] * o.md.pv_abs[i] : 0.0;
    const double tol = 2 * plain_err + ulp_of(cs.dtype, o.model.out[i]) + 16 * FLT_EPSILON * o.md.pv_abs[i] +
                       2 * o.md.pv_flip[i] + score_term + daz_term;
    const double err = std::fabs(got.out[i] - o.model.out[i]);
    if (!(err <= tol))
      return ::testing::AssertionFailure() << "attention_out flat element " << i << " (t=" << th / cs.N1 << ", h="
                                           << th % cs.N1 << "): got " << got.out[i] << ", fp64 model " << o.model.out[i]
                                           << ", error " << err << " > tolerance " << tol << " (plain error " << plain_err
                                           << ", score term " << score_term << ", subnormal-P term " << daz_term
                                           << "); the rule alone: " << first.message();
  }
  return ::testing::AssertionSuccess();
}

std::string describe(const Config& cf) {
  return cf.cs.describe() + " | " + cf.notes + " | num_threads=" + std::to_string(cf.threads) +
         (cf.nan_col >= 0 ? " nan_col=" + std::to_string(cf.nan_col) : "");
}

}  // namespace
}  // namespace nsa_test

int main() {
  using namespace nsa_test;
  const char* seed_how = "";
  const uint64_t seed = base_seed(&seed_how);
  const uint64_t n = env_u64("NSA_FUZZ_N", 300);
  const double max_seconds = static_cast<double>(env_u64("NSA_FUZZ_SECONDS", 100));
  const bool verbose = env_u64("NSA_FUZZ_VERBOSE", 0) != 0;
  const std::vector<CpuIsa> isas = supported_isas();
  std::string names;
  for (CpuIsa isa : isas) names += std::string(names.empty() ? "" : " ") + nsa::cpu_isa_name(isa);
  std::printf("fuzz_backends: seed %" PRIu64 " (%s), %" PRIu64 " configurations, ISA paths: %s\n", seed, seed_how,
              n, names.c_str());
  std::fflush(stdout);
  // Self-check of the comparison (a planted error must be caught, so that "0 mismatches" means something):
  // one output element moved by ~10 bf16 ulps, then two top-k slots swapped.
  {
    Case cs = Case::make(DType::kBF16, {9, 0, 20}, {13, 5, 30}, 4, 2, 24, 20, 32, 16, 64, 2);
    std::mt19937_64 g(12345);
    cs.fill_uniform(g, -1, 1);
    const Oracle o = make_oracle(cs);
    Result bad = run_cpu(cs, isas.back(), 2);
    const bool clean = static_cast<bool>(check_all(cs, o, bad));
    bad.out[7] += 0.02 * (1 + std::fabs(bad.out[7]));  // ~10 bf16 ulps
    const bool out_caught = !check_all(cs, o, bad);
    bad = run_cpu(cs, isas.back(), 2);
    std::swap(bad.topk[0], bad.topk[1]);
    const bool topk_caught = !check_all(cs, o, bad);
    if (!clean || !out_caught || !topk_caught) {
      std::printf("fuzz_backends: self-check FAILED (clean %d, perturbed attention_out caught %d, swapped topk caught %d)\n",
                  clean, out_caught, topk_caught);
      std::printf("fuzz leg: self-check failed (seed %" PRIu64 ")\n", seed);
      return 1;
    }
    std::printf("fuzz_backends: self-check: a perturbed attention_out and swapped topk slots are caught\n");
  }
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t done = 0, mismatches = 0, nan_checks = 0;
  bool capped = false;
  for (uint64_t i = 0; i < n; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > max_seconds) {
      capped = true;
      break;
    }
    const uint64_t cseed = seed + i;
    const Config cf = random_config(cseed);
    const Case& cs = cf.cs;
    if (verbose) std::printf("[%" PRIu64 "] %s\n", cseed, describe(cf).c_str());
    auto fail = [&](const std::string& what, const std::string& msg) {
      ++mismatches;
      std::printf("MISMATCH seed %" PRIu64 " (reproduce: NSA_FUZZ_SEED=%" PRIu64 " NSA_FUZZ_N=1): %s\n  config: %s\n  %s\n",
                  cseed, cseed, what.c_str(), describe(cf).c_str(), msg.c_str());
      std::fflush(stdout);
    };
    if (cf.nonfinite) {
      const Result ref = run(cs, Backend::kReference);
      const ::testing::AssertionResult rok = check_structure(cs, ref);
      if (!rok) fail("compress_attention_reference with non-finite inputs", rok.message());
      for (CpuIsa isa : isas) {
        const std::string where = std::string("cpu_isa=") + nsa::cpu_isa_name(isa);
        const Result got = run_cpu(cs, isa, cf.threads);
        const ::testing::AssertionResult ok = check_structure(cs, got);
        if (!ok) {
          fail(where + " with non-finite inputs", ok.message());
          continue;
        }
        const ::testing::AssertionResult same = bitwise_equal(got, run_cpu(cs, isa, cf.threads % 7 + 1));
        if (!same) fail(where + " with non-finite inputs: num_threads changed the outputs", same.message());
      }
      ++done;
      continue;
    }
    const Oracle o = make_oracle(cs);
    // the NaN variant: key rows of column nan_col in every batch (where it exists) set to NaN
    Case nan_cs;
    if (cf.nan_col >= 0) {
      nan_cs = cs;
      const double nan = std::numeric_limits<double>::quiet_NaN();
      for (int64_t b = 0; b < cs.B(); ++b)
        if (cf.nan_col < cs.c[static_cast<size_t>(b)])
          for (int64_t h = 0; h < cs.N2; ++h)
            for (int64_t j = 0; j < cs.D; ++j) nan_cs.k[nan_cs.ki(cs.c_begin(b) + cf.nan_col, h, j)] = nan;
      if (cs.k_layout.zero_dim >= 0) nan_cs.k_layout.zero_dim = -1;
    }
    for (CpuIsa isa : isas) {
      const std::string where = std::string("cpu_isa=") + nsa::cpu_isa_name(isa);
      const Result got = run_cpu(cs, isa, cf.threads);
      const bool daz = isa == CpuIsa::kAvx512Bf16 && cs.dtype == DType::kBF16;
      ::testing::AssertionResult ok = check_complete(cs, got);
      if (!ok) {
      } else if (!(ok = check_out_ext(cs, got, o, cf.large, daz))) {
      } else if (!(ok = check_stats(cs, got, o.model, o.md))) {
      } else {
        ok = check_topk(cs, got, o.md);
      }
      if (!ok) {
        fail(where + " vs fp64 model", ok.message());
        continue;
      }
      const Result again = run_cpu(cs, isa, cf.threads % 7 + 1);
      const ::testing::AssertionResult same = bitwise_equal(got, again);
      if (!same) fail(where + " num_threads " + std::to_string(cf.threads) + " vs " + std::to_string(cf.threads % 7 + 1),
                      same.message());
      if (cf.nan_col >= 0) {
        ++nan_checks;
        const ::testing::AssertionResult nan_same = bitwise_equal(got, run_cpu(nan_cs, isa, cf.threads));
        if (!nan_same) fail(where + " NaN in masked key rows changed the outputs", nan_same.message());
      }
    }
    ++done;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fuzz_backends: %" PRIu64 " NaN-in-masked-key checks, %.1f s%s\n", nan_checks, secs,
              capped ? " (stopped by the NSA_FUZZ_SECONDS time cap)" : "");
  std::printf("fuzz leg: %" PRIu64 " configurations x %zu ISA paths, %" PRIu64 " mismatches (seed %" PRIu64 ")\n", done,
              isas.size(), mismatches, seed);
  return mismatches == 0 && done > 0 ? 0 : 1;
}
