// compress_attention_cpu against the fp64 model of docs/spec/compress_attention.md (reference::forward_fp64 plus the test
// util's own fp64 scores), with docs/CONTRIBUTING.md's rules, on EVERY CpuIsa path this host runs:
//   - a shape matrix: batches (incl. Sq_b = 0), G, D / D2, C_b around M, masks, forced blocks,
//     ties, non-contiguous inputs and masks, all dtypes, and a seeded random fuzz;
//   - small-integer inputs whose results are exact: bitwise equal across ISA paths and to the reference;
//   - determinism: bitwise equal over repeats and num_threads 1, 2, 3, 7; a sequence alone equals
//     the same sequence inside a batch.
// Fuzz: NSA_FUZZ_SEED (base seed) and NSA_FUZZ_ITERS (configurations per shard, 4 shards) override
// the defaults; configuration i uses seed base + i, and a failure prints it, so
// NSA_FUZZ_SEED=<seed> NSA_FUZZ_ITERS=1 ... --gtest_filter='*Fuzz*/0' reproduces it.
#include <sys/mman.h>
#include <unistd.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/group_sum.h"
#include "common/mask_rows.h"
#include "common/numeric.h"
#include "common/row_helpers.h"
#include "common/topk_order.h"
#include "cpu/kernels.h"
#include "ops/compress_attention/reference.h"
#include "test_util.h"

namespace nsa_test {
namespace {

// Names the tested paths in every log (each ctest test is its own process).
class IsaEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    std::string names;
    for (CpuIsa isa : supported_isas()) names += std::string(names.empty() ? "" : " ") + nsa::cpu_isa_name(isa);
    std::printf("[nsa] CPU ISA paths tested: %s (detected: %s, active default: %s)\n", names.c_str(),
                nsa::cpu_isa_name(nsa::cpu_detected_isa()), nsa::cpu_isa_name(nsa::cpu_active_isa()));
    std::fflush(stdout);
  }
};
[[maybe_unused]] ::testing::Environment* const kIsaEnv = ::testing::AddGlobalTestEnvironment(new IsaEnvironment);

// Every supported ISA against the oracle; the plain reference must pass the same stats/topk rules
// (a check of the tolerances themselves).
void check_cpu(const Case& cs) {
  SCOPED_TRACE(cs.describe());
  const Oracle o = make_oracle(cs);
  ASSERT_TRUE(o.model.status.ok()) << o.model.status.message();
  ASSERT_TRUE(o.plain.status.ok()) << o.plain.status.message();
  EXPECT_TRUE(check_complete(cs, o.model));
  EXPECT_TRUE(check_stats(cs, o.plain, o.model, o.md)) << "(plain reference)";
  EXPECT_TRUE(check_topk(cs, o.plain, o.md)) << "(plain reference)";
  EXPECT_TRUE(check_topk(cs, o.model, o.md)) << "(fp64 reference)";
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(std::string("cpu_isa=") + nsa::cpu_isa_name(isa));
    EXPECT_TRUE(check_all(cs, o, run_cpu(cs, isa)));
  }
}

Case random_filled(DType dt, std::vector<int64_t> sq, std::vector<int64_t> c, int64_t N1, int64_t N2, int64_t D,
                   int64_t D2, int64_t l, int64_t d, int64_t lp, int64_t K, uint64_t seed) {
  Case cs = Case::make(dt, std::move(sq), std::move(c), N1, N2, D, D2, l, d, lp, K);
  std::mt19937_64 rng(seed);
  cs.fill_uniform(rng, -1, 1);
  return cs;
}

// ------------------------------------------------------------------------------ shape matrix

TEST(CpuBackend, DefaultIsaMatchesForcedActiveIsa) {
  Case cs = random_filled(DType::kBF16, {9, 4}, {13, 6}, 4, 2, 32, 16, 32, 16, 64, 2, 1);
  std::mt19937_64 rng(2);
  cs.set_random_mask(rng, 0.3, 0.1);
  EXPECT_TRUE(bitwise_equal(run(cs, Backend::kCpu, -1), run_cpu(cs, nsa::cpu_active_isa())));
}

TEST(CpuBackend, BatchesOfDifferentLengths) {
  // Empty batches first, in the middle and last; an odd T; extra key/value rows.
  {
    Case cs = random_filled(DType::kBF16, {0, 5, 0, 17, 9, 0}, {3, 9, 13, 4, 30, 2}, 4, 2, 32, 24, 32, 16, 64, 1, 11);
    std::mt19937_64 rng(12);
    cs.set_random_mask(rng, 0.2, 0.1);
    check_cpu(cs);
  }
  {
    Case cs = Case::make(DType::kF16, {31, 1, 12}, {40, 9, 23}, 4, 1, 16, 16, 32, 16, 64, 3);
    cs.extra_kv_rows = 5;
    cs.resize();
    std::mt19937_64 rng(13);
    cs.fill_uniform(rng, -1, 1);
    cs.set_local_topk_mask();
    check_cpu(cs);
  }
}

TEST(CpuBackend, GroupSizes) {
  for (int64_t G : {1, 2, 3, 4, 8}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    Case cs = random_filled(DType::kF16, {13, 6}, {21, 9}, 2 * G, 2, 24, 16, 32, 16, 64, 2, 100 + G);
    std::mt19937_64 rng(200 + G);
    cs.set_random_mask(rng, 0.25, 0.1);
    check_cpu(cs);
  }
  // G = 5, 6, 7 with one KV head (pairwise sum with carried odd elements); G = 16 (the fused per-token
  // normalize + group sum in registers), G = 12 (the same with G a runtime value), G = 65 and 70 (beyond
  // kMaxFusedGroup = 64: rows normalized one by one, summed by add_row).
  for (int64_t G : {5, 6, 7, 12, 16, 65, 70}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    Case cs = random_filled(DType::kBF16, {7, 3}, {26, 5}, G, 1, 16, 16, 32, 16, 64, 2, 300 + G);
    std::mt19937_64 rng(400 + G);
    cs.set_random_mask(rng, 0.3, 0.2);
    check_cpu(cs);
  }
}

// A token whose G rows differ: head 0's visible scores all overflow to -inf (below the mask value
// -FLT_MAX), so its P is 1/32 on the 32 masked tokens outside the window (a "wide" row), while heads
// 1..3 are ordinary. The token's rows then take the per-row path (no fused group sum), and the group
// sum must still combine a full-width row with three window-only rows.
TEST(CpuBackend, WideRowBesideOrdinaryRowsOfItsGroup) {
  Case cs = Case::make(DType::kF32, {2}, {40}, 4, 1, 16, 4, 32, 16, 64, 3);
  cs.scale = 1.0;
  std::mt19937_64 rng(77);
  cs.fill_uniform(rng, -1, 1);
  for (int64_t j = 0; j < 16; ++j) cs.set_q(0, 0, j, j == 0 ? 1e20 : 0.0);
  for (int64_t c = 32; c < 40; ++c) cs.set_k(c, 0, 0, -1e20);
  cs.enable_atten_mask();
  for (int64_t c = 0; c < 32; ++c) cs.atten_at(0, c) = 1;
  check_cpu(cs);
  const Result r = run_cpu(cs, nsa::cpu_active_isa());
  const auto at = [&](const std::vector<float>& v, int64_t h) { return v[static_cast<size_t>(stat_index(cs, 0, h))]; };
  EXPECT_EQ(at(r.smax, 0), -FLT_MAX);  // head 0 of token 0 is wide ...
  EXPECT_EQ(at(r.ssum, 0), 32.0f);
  EXPECT_GT(at(r.smax, 1), -FLT_MAX);  // ... head 1 is not
}

TEST(CpuBackend, HeadDims) {
  const std::pair<int64_t, int64_t> dims[] = {{16, 16}, {20, 20}, {33, 17}, {33, 1}, {64, 63}, {1, 1},
                                              {7, 3},   {96, 80}, {128, 128}, {130, 65}};
  for (auto [D, D2] : dims) {
    SCOPED_TRACE("D=" + std::to_string(D) + " D2=" + std::to_string(D2));
    check_cpu(random_filled(DType::kBF16, {11}, {19}, 2, 1, D, D2, 32, 16, 64, 2, static_cast<uint64_t>(D * 1000 + D2)));
  }
}

TEST(CpuBackend, CompressedLengthsAroundM) {
  struct Cfg {
    int64_t l, d, lp;
  };
  for (Cfg cf : {Cfg{32, 16, 64}, Cfg{64, 16, 64}, Cfg{32, 32, 64}, Cfg{16, 16, 16}, Cfg{32, 16, 128},
                 Cfg{128, 64, 128}, Cfg{16, 16, 128}}) {
    const int64_t M = cf.lp / cf.d;
    SCOPED_TRACE("(l,d,l')=(" + std::to_string(cf.l) + "," + std::to_string(cf.d) + "," + std::to_string(cf.lp) + ")");
    std::vector<int64_t> c = {1, M, M + 1, 300, 7};
    std::vector<int64_t> sq = {6, 5, 3, 9, 4};
    if (M > 1) {
      c.push_back(M - 1);
      sq.push_back(4);
    }
    Case cs = random_filled(DType::kBF16, sq, c, 2, 1, 16, 16, cf.l, cf.d, cf.lp, 1, static_cast<uint64_t>(M * 31 + cf.l));
    std::mt19937_64 rng(static_cast<uint64_t>(cf.lp));
    cs.set_random_mask(rng, 0.3, 0.15);
    check_cpu(cs);
    // Large C alone with many selected blocks.
    Case big = random_filled(DType::kF32, {23}, {301}, 4, 2, 24, 24, cf.l, cf.d, cf.lp, std::min<int64_t>(32, (301 + M - 1) / M),
                             static_cast<uint64_t>(M * 77 + cf.d));
    check_cpu(big);
  }
}

TEST(CpuBackend, CausalMask) {
  // docs/spec/compress_attention.md §9 with the usual lengths: C_b = floor((Sq_b - l) / d) + 1; the early rows are fully masked.
  struct Cfg {
    int64_t l, d, lp;
  };
  for (Cfg cf : {Cfg{32, 16, 64}, Cfg{64, 16, 64}, Cfg{16, 16, 16}}) {
    std::vector<int64_t> sq = {300, 100, 64}, c;
    for (int64_t s : sq) c.push_back((s - cf.l) / cf.d + 1);
    Case cs = random_filled(DType::kBF16, sq, c, 4, 2, 32, 32, cf.l, cf.d, cf.lp, 1, static_cast<uint64_t>(cf.l + cf.lp));
    cs.set_causal_mask();
    cs.set_local_topk_mask();
    check_cpu(cs);
  }
}

TEST(CpuBackend, BandMasks) {
  // Windows that start at every residue mod 16, over several query tiles.
  for (int64_t width : {1, 5, 17, 40}) {
    SCOPED_TRACE("width " + std::to_string(width));
    Case cs = random_filled(DType::kBF16, {200, 70}, {150, 61}, 2, 1, 32, 16, 32, 16, 64, 3, 80 + width);
    cs.set_band_mask(width);
    check_cpu(cs);
  }
  // Windows starting at every residue mod 16 at the first row of each 64-row tile (G = 1).
  for (int64_t shift = 0; shift < 16; ++shift) {
    SCOPED_TRACE("shift " + std::to_string(shift));
    Case cs = random_filled(DType::kF32, {130}, {100}, 1, 1, 16, 8, 32, 16, 64, 2, 90 + shift);
    cs.set_band_mask(7, shift);
    check_cpu(cs);
  }
  Case g4 = random_filled(DType::kF16, {90}, {133}, 8, 2, 16, 16, 64, 16, 64, 4, 85);
  g4.set_band_mask(23);
  check_cpu(g4);
}

TEST(CpuBackend, RandomMasksWithFullyMaskedRows) {
  for (double p : {0.1, 0.5, 0.95}) {
    SCOPED_TRACE("p=" + std::to_string(p));
    Case cs = random_filled(DType::kBF16, {17, 3, 11}, {29, 8, 41}, 4, 4, 32, 16, 32, 16, 64, 2, 7);
    std::mt19937_64 rng(static_cast<uint64_t>(p * 1000));
    cs.set_random_mask(rng, p, 0.25);
    check_cpu(cs);
  }
  // Every row fully masked.
  Case all = random_filled(DType::kF32, {5, 6}, {9, 17}, 2, 1, 16, 8, 32, 16, 64, 3, 8);
  all.enable_atten_mask();
  std::fill(all.atten.begin(), all.atten.end(), 1);
  check_cpu(all);
}

TEST(CpuBackend, ForcedBlocks) {
  // Few forced, more forced than K, all forced; combined with masks.
  for (double p : {0.1, 0.5, 1.0}) {
    SCOPED_TRACE("p=" + std::to_string(p));
    Case cs = random_filled(DType::kBF16, {13, 9}, {70, 45}, 4, 2, 32, 16, 32, 16, 64, 4, 21);
    std::mt19937_64 rng(static_cast<uint64_t>(p * 100) + 3);
    cs.set_random_topk_mask(rng, p);
    cs.set_random_mask(rng, 0.3, 0.1);
    check_cpu(cs);
  }
  Case local = random_filled(DType::kF16, {130}, {61}, 2, 1, 16, 16, 32, 16, 64, 16, 22);
  local.set_causal_mask();
  local.set_local_topk_mask();
  check_cpu(local);
}

TEST(CpuBackend, TiedScores) {
  // Zero keys: every score equal, uniform P; zero queries likewise; keys all identical.
  {
    Case cs = random_filled(DType::kBF16, {9, 4}, {37, 11}, 2, 1, 16, 16, 32, 16, 64, 2, 31);
    for (int64_t r = 0; r < cs.T2(); ++r)
      for (int64_t j = 0; j < cs.D; ++j) cs.set_k(r, 0, j, 0.0);
    check_cpu(cs);
  }
  {
    Case cs = random_filled(DType::kF32, {9, 4}, {37, 11}, 4, 2, 16, 16, 64, 16, 64, 3, 32);
    for (int64_t t = 0; t < cs.T(); ++t)
      for (int64_t h = 0; h < cs.N1; ++h)
        for (int64_t j = 0; j < cs.D; ++j) cs.set_q(t, h, j, 0.0);
    std::mt19937_64 rng(33);
    cs.set_random_mask(rng, 0.5, 0.0);
    check_cpu(cs);
  }
  {
    Case cs = random_filled(DType::kF16, {12}, {33}, 2, 2, 16, 16, 32, 16, 64, 5, 34);
    for (int64_t r = 1; r < cs.T2(); ++r)
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t j = 0; j < cs.D; ++j) cs.set_k(r, n, j, cs.k[cs.ki(0, n, j)]);
    check_cpu(cs);
  }
  // Small integers in {-1, 0, 1}: many exact ties between blocks.
  {
    Case cs = Case::make(DType::kBF16, {15, 7}, {40, 24}, 4, 2, 8, 8, 32, 16, 64, 4);
    cs.scale = 1.0;
    std::mt19937_64 rng(35);
    cs.fill_ints(rng, -1, 1);
    check_cpu(cs);
  }
}

TEST(CpuBackend, LargeAndSmallScores) {
  // Peaked softmax (exp underflow for most tokens) and nearly flat softmax.
  for (double mult : {0.01, 6.0, 20.0}) {
    SCOPED_TRACE("scale multiplier " + std::to_string(mult));
    Case cs = random_filled(DType::kBF16, {10, 6}, {50, 19}, 4, 2, 32, 32, 32, 16, 64, 3, 41);
    cs.scale *= mult;
    check_cpu(cs);
  }
}

TEST(CpuBackend, AllDtypes) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = random_filled(dt, {14, 0, 9}, {27, 5, 16}, 6, 2, 40, 24, 32, 16, 64, 2, 51);
    std::mt19937_64 rng(52);
    cs.set_random_mask(rng, 0.3, 0.1);
    cs.set_random_topk_mask(rng, 0.1);
    check_cpu(cs);
  }
}

// A layout with every kind of stride: permuted dims, padding, an inner step, transposed masks.
void make_strided(Case& cs) {
  cs.q_layout.order = {1, 0, 2};  // [N1][T][D]
  cs.q_layout.pad = {0, 0, 3};
  cs.k_layout.pad = {2, 1, 5};
  cs.k_layout.step = 2;
  cs.v_layout.order = {2, 0, 1};  // [D2][T2][N2]
  cs.v_layout.pad = {1, 0, 0};
  cs.atten_layout.transposed = true;
  cs.atten_layout.pad = {3, 1};
  cs.topk_layout.pad = {0, 2};
}

TEST(CpuBackend, NonContiguousInputsAndMasks) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = random_filled(dt, {11, 6}, {23, 14}, 4, 2, 20, 12, 32, 16, 64, 2, 61);
    std::mt19937_64 rng(62);
    cs.set_random_mask(rng, 0.3, 0.1);
    cs.set_random_topk_mask(rng, 0.15);
    make_strided(cs);
    check_cpu(cs);
  }
}

// The memory layout must not change the arithmetic: strided inputs give the same bits as
// contiguous ones, on each path; zero strides (broadcast heads / columns) likewise.
TEST(CpuBackend, LayoutDoesNotChangeResults) {
  Case cs = random_filled(DType::kBF16, {11, 6}, {23, 14}, 4, 2, 20, 12, 32, 16, 64, 2, 63);
  std::mt19937_64 rng(64);
  cs.set_random_mask(rng, 0.3, 0.1);
  cs.set_random_topk_mask(rng, 0.15);
  Case strided = cs;
  make_strided(strided);
  // Broadcast: every query head equal (stride 0 over N1), every value column equal (stride 0 over D2).
  Case flat = cs;
  for (int64_t t = 0; t < flat.T(); ++t)
    for (int64_t h = 1; h < flat.N1; ++h)
      for (int64_t j = 0; j < flat.D; ++j) flat.q[flat.qi(t, h, j)] = flat.q[flat.qi(t, 0, j)];
  for (int64_t r = 0; r < flat.T2(); ++r)
    for (int64_t n = 0; n < flat.N2; ++n)
      for (int64_t j = 1; j < flat.D2; ++j) flat.v[flat.vi(r, n, j)] = flat.v[flat.vi(r, n, 0)];
  Case broadcast = flat;
  broadcast.q_layout.zero_dim = 1;
  broadcast.v_layout.zero_dim = 2;
  EXPECT_EQ(Bound(broadcast).p.query.stride[1], 0);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    EXPECT_TRUE(bitwise_equal(run_cpu(cs, isa), run_cpu(strided, isa)));
    EXPECT_TRUE(bitwise_equal(run_cpu(flat, isa), run_cpu(broadcast, isa)));
  }
}

// ------------------------------------------------------------------------------ exact inputs

// Small-integer inputs whose every result is exact: keys are one-hot (k_c = e_{class(c)}), query
// entries are 0 or -256 and the scale is 1, so each score is 0, -256 or (masked) -FLT_MAX; a row's
// maxima tie exactly and every other token has P = exp(-256) = 0 in fp32. Queries are redrawn
// until the number n of maxima of every (row, head) is a power of two, so P = 1/n, the P.V sums
// (values in [-3, 3]) and the selection scores are exact in every dtype. Then every path, in any
// summation order, must give the reference's bits.
// One draw of the construction; false when some (row, head) found no power-of-two query in time
// (e.g. its unmasked tokens all share one class of 3).
bool draw_exact_case(Case& cs, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> cls(0, static_cast<int>(cs.D) - 1), val(-3, 3);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t r = 0; r < cs.T2(); ++r)
    for (int64_t n = 0; n < cs.N2; ++n) {
      const int hot = cls(rng);
      for (int64_t j = 0; j < cs.D; ++j) cs.set_k(r, n, j, j == hot ? 1.0 : 0.0);
      for (int64_t j = 0; j < cs.D2; ++j) cs.set_v(r, n, j, val(rng));
    }
  cs.enable_atten_mask();
  for (int64_t s = 0; s < cs.max_sq(); ++s) {
    const double kind = u(rng);
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = kind < 0.15 ? 1 : (kind < 0.5 ? (u(rng) < 0.3) : 0);
  }
  cs.set_random_topk_mask(rng, 0.1);
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t C = cs.c[static_cast<size_t>(b)], c0 = cs.c_begin(b);
    for (int64_t s = 0; s < cs.sq[static_cast<size_t>(b)]; ++s) {
      const int64_t t = cs.q_begin(b) + s;
      for (int64_t h = 0; h < cs.N1; ++h) {
        const int64_t n2 = h / cs.G();
        bool ok = false;
        for (int attempt = 0; attempt < 2000 && !ok; ++attempt) {
          for (int64_t j = 0; j < cs.D; ++j) cs.set_q(t, h, j, u(rng) < 0.3 ? 0.0 : -256.0);
          double best = -INFINITY;
          int64_t n = 0, unmasked = 0;
          for (int64_t c = 0; c < C; ++c) {
            if (cs.atten_at(s, c)) continue;
            ++unmasked;
            double sc = 0;
            for (int64_t j = 0; j < cs.D; ++j) sc += cs.q[cs.qi(t, h, j)] * cs.k[cs.ki(c0 + c, n2, j)];
            if (sc > best) {
              best = sc;
              n = 0;
            }
            if (sc == best) ++n;
          }
          if (unmasked == 0) n = C;
          ok = (n & (n - 1)) == 0;
        }
        if (!ok) return false;
      }
    }
  }
  return true;
}

Case exact_case(DType dt, uint64_t seed) {
  Case cs = Case::make(dt, {9, 0, 12, 5}, {32, 64, 16, 8}, 4, 2, 16, 12, 32, 16, 64, 2);
  cs.scale = 1.0;
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 100; ++round)
    if (draw_exact_case(cs, rng)) return cs;
  ADD_FAILURE() << "could not construct an exact case";
  return cs;
}

TEST(CpuBackend, ExactSmallIntegersBitwiseAcrossIsas) {
  for (DType dt : kAllDtypes) {
    for (uint64_t seed : {1u, 2u, 3u}) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " seed " + std::to_string(seed));
      const Case cs = exact_case(dt, seed);
      const Result ref = run(cs, Backend::kReference);
      ASSERT_TRUE(check_complete(cs, ref));
      // The construction works: the fp32 and fp64 references agree bit for bit on the output and
      // the statistics (the fp64 model differs only by exp(-256) ~ 1e-111 in P, lost in rounding).
      const Result m64 = run(cs, Backend::kRefFp64);
      EXPECT_EQ(ref.out, m64.out);  // by value: an exact 0 may carry the sign of the 1e-111
      EXPECT_EQ(ref.smax, m64.smax);
      EXPECT_EQ(ref.ssum, m64.ssum);
      std::vector<Result> per_isa;
      for (CpuIsa isa : supported_isas()) {
        SCOPED_TRACE(nsa::cpu_isa_name(isa));
        per_isa.push_back(run_cpu(cs, isa));
        EXPECT_TRUE(bitwise_equal(per_isa.back(), per_isa.front())) << "differs from " << nsa::cpu_isa_name(supported_isas()[0]);
        EXPECT_TRUE(bitwise_equal(per_isa.back(), ref)) << "differs from the reference";
      }
    }
  }
}

// ------------------------------------------------------------------------------ determinism

Case determinism_case() {
  Case cs = random_filled(DType::kBF16, {37, 0, 64, 23}, {40, 12, 77, 9}, 8, 2, 40, 24, 32, 16, 64, 3, 71);
  std::mt19937_64 rng(72);
  cs.set_random_mask(rng, 0.3, 0.1);
  cs.set_random_topk_mask(rng, 0.1);
  return cs;
}

TEST(CpuBackend, DeterministicOverRepeatsAndThreadCounts) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    Case cs = determinism_case();
    cs.dtype = dt;
    SCOPED_TRACE(nsa::dtype_name(dt));
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(nsa::cpu_isa_name(isa));
      const Result base = run_cpu(cs, isa, 1);
      ASSERT_TRUE(check_complete(cs, base));
      for (int nt : {1, 2, 3, 7, 2, 7, 0}) {
        SCOPED_TRACE("num_threads=" + std::to_string(nt));
        EXPECT_TRUE(bitwise_equal(run_cpu(cs, isa, nt), base));
      }
    }
  }
}

// Batch b of cs as a call of its own (masks: the top-left [Sq_b, C_b] / [Sq_b, Sel_b] blocks).
Case extract_batch(const Case& cs, int64_t b) {
  const int64_t q0 = cs.q_begin(b), c0 = cs.c_begin(b), Sq = cs.sq[static_cast<size_t>(b)], C = cs.c[static_cast<size_t>(b)];
  Case one = Case::make(cs.dtype, {Sq}, {C}, cs.N1, cs.N2, cs.D, cs.D2, cs.l, cs.d, cs.lp, cs.K);
  one.scale = cs.scale;
  for (int64_t t = 0; t < Sq; ++t)
    for (int64_t h = 0; h < cs.N1; ++h)
      for (int64_t j = 0; j < cs.D; ++j) one.q[one.qi(t, h, j)] = cs.q[cs.qi(q0 + t, h, j)];
  for (int64_t r = 0; r < C; ++r)
    for (int64_t n = 0; n < cs.N2; ++n) {
      for (int64_t j = 0; j < cs.D; ++j) one.k[one.ki(r, n, j)] = cs.k[cs.ki(c0 + r, n, j)];
      for (int64_t j = 0; j < cs.D2; ++j) one.v[one.vi(r, n, j)] = cs.v[cs.vi(c0 + r, n, j)];
    }
  if (cs.has_atten) {
    one.enable_atten_mask();
    for (int64_t s = 0; s < Sq; ++s)
      for (int64_t c = 0; c < C; ++c) one.atten_at(s, c) = cs.atten_at(s, c);
  }
  if (cs.has_topk) {
    one.enable_topk_mask();
    for (int64_t s = 0; s < Sq; ++s)
      for (int64_t k = 0; k < one.sel(0); ++k) one.topk_at(s, k) = cs.topk_at(s, k);
  }
  return one;
}

TEST(CpuBackend, SequenceAloneEqualsSequenceInBatch) {
  Case cs = determinism_case();
  const int64_t N1 = cs.N1, N2 = cs.N2, D2 = cs.D2, K = cs.K;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const Result all = run_cpu(cs, isa);
    ASSERT_TRUE(check_complete(cs, all));
    for (int64_t b = 0; b < cs.B(); ++b) {
      const int64_t Sq = cs.sq[static_cast<size_t>(b)], q0 = cs.q_begin(b);
      if (Sq == 0) continue;
      SCOPED_TRACE("batch " + std::to_string(b));
      const Case one = extract_batch(cs, b);
      const Result r = run_cpu(one, isa);
      ASSERT_TRUE(check_complete(one, r));
      const size_t es = nsa::dtype_size(cs.dtype);
      const size_t ob = static_cast<size_t>(q0 * N1 * D2) * es, on = static_cast<size_t>(Sq * N1 * D2) * es;
      EXPECT_TRUE(std::equal(r.out_bytes.begin(), r.out_bytes.end(), all.out_bytes.begin() + static_cast<std::ptrdiff_t>(ob)))
          << "attention_out";
      EXPECT_EQ(r.out_bytes.size(), on);
      EXPECT_TRUE(std::equal(r.topk.begin(), r.topk.end(), all.topk.begin() + q0 * N2 * K)) << "topk_indices";
      EXPECT_EQ(0, std::memcmp(r.smax.data(), all.smax.data() + 8 * N1 * q0, r.smax.size() * 4)) << "softmax_max";
      EXPECT_EQ(0, std::memcmp(r.ssum.data(), all.ssum.data() + 8 * N1 * q0, r.ssum.size() * 4)) << "softmax_sum";
    }
  }
}

// ------------------------------------------------------------------------------ fuzz

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtoull(s, nullptr, 10) : dflt;
}

// A random valid configuration: any legal (l, d, l'), G up to 8, D up to 72, up to 4 batches with
// empty ones and C_b near M, masks, forced blocks, strided layouts, every dtype.
Case random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  struct Cfg {
    int64_t l, d, lp;
  };
  std::vector<Cfg> cfgs;
  for (int64_t d = 16; d <= 64; d += 16)
    for (int64_t l = d; l <= 128; l += 16)
      for (int64_t lp = l; lp <= 128; lp += 16)
        if (lp % d == 0) cfgs.push_back({l, d, lp});
  const Cfg cf = cfgs[static_cast<size_t>(pick(0, static_cast<int64_t>(cfgs.size()) - 1))];
  const int64_t M = cf.lp / cf.d;
  const DType dt = kAllDtypes[pick(0, 3)];
  const int64_t N2 = pick(1, 3);
  const int64_t G = std::min<int64_t>(pick(1, 8), 16 / N2);
  const int64_t D = coin(0.2) ? 16 * pick(1, 4) : pick(1, 72);
  const int64_t D2 = coin(0.3) ? D : pick(1, D);
  const int64_t B = pick(1, 4);
  std::vector<int64_t> sq, c;
  for (int64_t b = 0; b < B; ++b) {
    sq.push_back(coin(0.15) ? 0 : coin(0.2) ? pick(41, 150) : pick(1, 40));  // > 64/G: several query tiles
    const int64_t choice = pick(0, 4);
    c.push_back(choice == 0 ? 1 : choice == 1 ? std::max<int64_t>(1, M - 1) : choice == 2 ? M : choice == 3 ? M + 1 : pick(1, 90));
  }
  if (std::accumulate(sq.begin(), sq.end(), int64_t(0)) == 0) sq[0] = pick(1, 40);
  Case probe = Case::make(dt, sq, c, N2 * G, N2, D, D2, cf.l, cf.d, cf.lp, 1);
  const int64_t K = pick(1, std::min<int64_t>(32, probe.min_sel()));
  Case cs = Case::make(dt, sq, c, N2 * G, N2, D, D2, cf.l, cf.d, cf.lp, K);
  cs.extra_kv_rows = coin(0.3) ? pick(1, 3) : 0;
  cs.resize();
  cs.pass_sel = coin(0.5);
  const int64_t fill = pick(0, 9);
  if (fill < 7) {
    cs.fill_uniform(rng, -1, 1);
    cs.scale *= std::exp(std::uniform_real_distribution<double>(-1.0, 1.5)(rng));
  } else if (fill < 9) {
    cs.fill_ints(rng, -2, 2);
    cs.scale = coin(0.5) ? 1.0 : 0.25;
  } else {
    cs.fill_uniform(rng, -1, 1);
    for (auto& x : cs.k)
      if (!std::isnan(x)) x = 0;  // all scores tie
  }
  const int64_t am = pick(0, 3);
  if (am == 1) cs.set_causal_mask();
  if (am == 2) cs.set_random_mask(rng, std::uniform_real_distribution<double>(0, 1)(rng), 0.2);
  if (am == 3) cs.set_band_mask(pick(1, 40));
  const int64_t tm = pick(0, 2);
  if (tm == 1) cs.set_local_topk_mask();
  if (tm == 2) cs.set_random_topk_mask(rng, std::uniform_real_distribution<double>(0, 0.6)(rng));
  if (coin(0.35)) {
    for (Layout3* lay : {&cs.q_layout, &cs.k_layout, &cs.v_layout}) {
      std::shuffle(lay->order.begin(), lay->order.end(), rng);
      for (auto& p : lay->pad) p = pick(0, 3);
      lay->step = pick(1, 2);
    }
    cs.atten_layout.transposed = coin(0.5);
    cs.atten_layout.pad = {pick(0, 2), pick(0, 2)};
    cs.topk_layout.transposed = coin(0.5);
    cs.topk_layout.pad = {pick(0, 2), pick(0, 2)};
  }
  return cs;
}

class CpuFuzz : public ::testing::TestWithParam<int> {};

TEST_P(CpuFuzz, RandomConfigurations) {
  const uint64_t base = env_u64("NSA_FUZZ_SEED", 20250601), iters = env_u64("NSA_FUZZ_ITERS", 100);
  const uint64_t first = base + static_cast<uint64_t>(GetParam()) * iters;
  std::printf("[nsa] fuzz shard %d: seeds %llu..%llu\n", GetParam(), static_cast<unsigned long long>(first),
              static_cast<unsigned long long>(first + iters - 1));
  for (uint64_t i = 0; i < iters; ++i) {
    const uint64_t seed = first + i;
    SCOPED_TRACE("fuzz seed " + std::to_string(seed) + " (NSA_FUZZ_SEED=" + std::to_string(seed) + " NSA_FUZZ_ITERS=1, shard 0)");
    const Case cs = random_case(seed);
    check_cpu(cs);
    if (HasFailure()) {
      std::printf("[nsa] first failing fuzz seed: %llu\n", static_cast<unsigned long long>(seed));
      break;
    }
  }
}

// KernelTable::select.top_k on every ISA this host runs, against a full stable sort in the §3.8 order
// (detail::topk_before, common/topk_order.h), on rows built to stress its threshold: all equal, ties exactly at the K-th
// lane maximum, signed zeros, +-inf, FLT_MAX (forced blocks), few distinct values, sel == K, sel not a
// multiple of the lane count, K = 1 ... 32, and one lane far below the others (with K = 32 the threshold is that
// lane's maximum, so nearly every score is a candidate: more than the 256 the ranking copies to the stack when
// sel = 600). A NaN anywhere returns false with idx untouched.
TEST(CpuKernels, TopKMatchesStableSortOnEveryIsa) {
  std::mt19937_64 rng(77);
  auto expected = [](const std::vector<float>& sc, int K) {
    std::vector<int32_t> order(sc.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return nsa::detail::topk_before(sc[static_cast<size_t>(a)], a, sc[static_cast<size_t>(b)], b);
    });
    order.resize(static_cast<size_t>(K));
    return order;
  };
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    int checked = 0;
    for (int64_t sel : {1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100, 128, 257, 600}) {
      for (int K : {1, 2, 7, 16, 17, 31, 32}) {
        if (K > sel) continue;
        for (int kind = 0; kind < 9; ++kind) {
          std::vector<float> sc(static_cast<size_t>(sel));
          std::uniform_int_distribution<int> small(0, 3);
          std::normal_distribution<float> nd;
          for (auto& v : sc) {
            switch (kind) {
              case 0: v = nd(rng); break;                                              // distinct
              case 1: v = 0.5f; break;                                                 // all equal
              case 2: v = static_cast<float>(small(rng)); break;                       // 4 values
              case 3: v = small(rng) == 0 ? -0.0f : 0.0f; break;                       // signed zeros
              case 4: v = small(rng) == 0 ? FLT_MAX : nd(rng); break;                  // forced blocks
              case 5: v = small(rng) == 0 ? INFINITY : (small(rng) == 0 ? -INFINITY : 0.0f); break;
              case 6: v = static_cast<float>(sel) - static_cast<float>(&v - sc.data()); break;  // descending
              case 7: v = static_cast<float>((&v - sc.data()) / 16 % 3); break;       // equal lane maxima
              default: v = (&v - sc.data()) % 32 == 5 ? -1e30f : nd(rng); break;     // one low lane
            }
          }
          std::vector<int32_t> work(static_cast<size_t>(2 * sel)), got(static_cast<size_t>(K), -7);
          ASSERT_TRUE(kt->select.top_k(sc.data(), sel, K, got.data(), work.data())) << "sel=" << sel << " K=" << K;
          ASSERT_EQ(got, expected(sc, K)) << "sel=" << sel << " K=" << K << " kind=" << kind;
          ++checked;
          // a NaN anywhere: false, nothing written
          sc[static_cast<size_t>(rng() % static_cast<uint64_t>(sel))] = NAN;
          std::vector<int32_t> untouched(static_cast<size_t>(K), -7);
          ASSERT_FALSE(kt->select.top_k(sc.data(), sel, K, untouched.data(), work.data())) << "sel=" << sel << " K=" << K;
          ASSERT_EQ(untouched, std::vector<int32_t>(static_cast<size_t>(K), -7));
        }
      }
    }
    EXPECT_GT(checked, 300);
  }
}

// KernelTable::select.block_scores on every ISA, against its definition in scalar code (b[x] = sum_{n<N} p[x - n] and
// score[k] = sum_{m<M} b[M(k+1) - m], each added in order, as box_sum(N), box_sum(M) and the picks compute them),
// bit for bit, for M, N = 1 ... 8 and ranges [k0, k1) with whole and partial 16-score steps. Values span 2^-20 ... 2^20,
// so any other order of the additions changes bits. The row ends at p[M k1] on the last float before an inaccessible
// page: a read past it faults. Scores outside [k0, k1), and all of them where the kernel returns false, keep their
// sentinel. The AVX-512 tables must have the kernel for M = 2, 4 and 8.
TEST(CpuKernels, BlockScoresEqualTheirDefinitionOnEveryIsa) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t data_bytes = 8 * 4096;  // at least M k1 + 8 floats for the largest case below
  const size_t data_pages = (data_bytes + page - 1) / page;
  char* mem = static_cast<char*>(mmap(nullptr, (data_pages + 1) * page, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(static_cast<void*>(mem), MAP_FAILED);
  ASSERT_EQ(mprotect(mem + data_pages * page, page, PROT_NONE), 0);
  float* const end = reinterpret_cast<float*>(mem + data_pages * page);  // first float of the guard page
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> unit(0.5f, 1.0f);
  std::uniform_int_distribution<int> expo(-20, 20), small(0, 9);
  const std::pair<int64_t, int64_t> ranges[] = {{0, 1}, {0, 16}, {0, 17}, {3, 40}, {5, 128}, {0, 127}, {17, 33},
                                                {10, 11}, {0, 256}, {1, 200}};
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    int with_kernel = 0;
    for (int M = 1; M <= 8; ++M) {
      for (int N = 1; N <= 8; ++N) {
        for (auto [k0, k1] : ranges) {
          float* p = end - 1 - M * k1;  // p[M k1] is the last readable float
          for (float* x = p + M * k0 - N - 8; x <= p + M * k1; ++x)
            *x = small(rng) == 0 ? 0.0f : std::ldexp(unit(rng), expo(rng));
          std::vector<float> want(static_cast<size_t>(k1) + 8, -3.0f), got(want);
          for (int64_t k = k0; k < k1; ++k) {
            float acc = 0.0f;
            for (int m = 0; m < M; ++m) {
              const int64_t x = M * (k + 1) - m;
              float b = p[x];
              for (int n = 1; n < N; ++n) b += p[x - n];
              acc = m == 0 ? b : acc + b;
            }
            want[static_cast<size_t>(k)] = acc;
          }
          const bool has = kt->select.block_scores(p, k0, k1, M, N, got.data());
          if (!has) {
            ASSERT_EQ(got, std::vector<float>(got.size(), -3.0f)) << "M=" << M << " N=" << N;
            continue;
          }
          ++with_kernel;
          for (size_t k = 0; k < got.size(); ++k)
            ASSERT_EQ(nsa::detail::f32_bits(got[k]), nsa::detail::f32_bits(want[k]))
                << "M=" << M << " N=" << N << " k0=" << k0 << " k1=" << k1 << " k=" << k;
        }
      }
    }
    if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16) {
      EXPECT_EQ(with_kernel, 3 * 8 * static_cast<int>(std::size(ranges)));  // M = 2, 4, 8
    }
  }
  munmap(mem, (data_pages + 1) * page);
}

// KernelTable::select.force on every ISA: score[k] = FLT_MAX where forced[k] != 0 (any nonzero byte), else unchanged
// bit for bit (NaN, -0 and inf included), for lengths around the vector widths; nothing past n is written.
TEST(CpuKernels, ForceSetsExactlyTheForcedScoresOnEveryIsa) {
  std::mt19937_64 rng(9);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> byte(0, 255), pick(0, 5);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 128, 129}) {
      std::vector<float> score(static_cast<size_t>(n) + 4);
      std::vector<uint8_t> forced(static_cast<size_t>(n) + 16);  // the vector loads read whole vectors of bytes
      for (auto& v : score) {
        const int c = pick(rng);
        v = c == 0 ? NAN : c == 1 ? -0.0f : c == 2 ? INFINITY : nd(rng);
      }
      for (auto& f : forced) f = pick(rng) < 2 ? static_cast<uint8_t>(byte(rng) | 1) : 0;
      std::vector<float> want(score);
      for (int64_t k = 0; k < n; ++k)
        if (forced[static_cast<size_t>(k)] != 0) want[static_cast<size_t>(k)] = FLT_MAX;
      kt->select.force(score.data(), forced.data(), n);
      for (size_t k = 0; k < score.size(); ++k)
        ASSERT_EQ(nsa::detail::f32_bits(score[k]), nsa::detail::f32_bits(want[k])) << "n=" << n << " k=" << k;
    }
  }
}

// exp_sum on every ISA (m at least every x, as kernels.h requires): x[i] becomes exp(x[i] - m) within 2 ulps of the
// exponential in double (1.02 ulps the largest seen; subnormal results within two units of the smallest subnormal; exactly 0 below -110), exactly
// 1 at the maximum, NaN kept, -inf and -FLT_MAX giving 0; the sum is the canonical-order sum of those values; every
// ISA gives the same bits.
TEST(CpuKernels, ExpSumIsTheExponentialWithinTwoUlpsOnEveryIsa) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> span(-120.0f, 0.0f);
  const int64_t n = 4096;
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = span(rng);
  const float specials[] = {0.0f, -0.0f, NAN, -INFINITY, -FLT_MAX, -87.3f, -103.97f, -109.99f, -110.0f, -110.01f,
                            -1e-30f, -1e-7f, -0.34657359f, -0.6931472f, -88.72f};
  for (size_t i = 0; i < sizeof(specials) / sizeof(float); ++i) x[7 * i + 3] = specials[i];
  std::vector<float> first;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    for (float m : {0.0f, 3.0f}) {
      std::vector<float> e(x.size());
      for (size_t i = 0; i < x.size(); ++i) e[i] = x[i] + m;  // exact for these m: x - m gives back x
      const float sum = kt->rows.exp_sum(e.data(), n, m);
      for (int64_t i = 0; i < n; ++i) {
        const float xi = x[static_cast<size_t>(i)], ei = e[static_cast<size_t>(i)];
        if (m != 0.0f && std::fabs(xi) < 1e-6f && xi != 0.0f) continue;  // x + 3 - 3 is not x there
        if (std::isnan(xi)) {
          ASSERT_TRUE(std::isnan(ei)) << i;
          continue;
        }
        const double want = xi < -110.0f ? 0.0 : std::exp(static_cast<double>(xi));
        const double ulp = want < 1.1754943508222875e-38 ? 1.401298464324817e-45
                                                          : std::ldexp(1.0, std::ilogb(want) - 23);
        ASSERT_LE(std::fabs(static_cast<double>(ei) - want), 2 * ulp) << "x = " << xi << " m = " << m;
        if (xi == 0.0f) {
          ASSERT_EQ(ei, 1.0f);
        }
        if (xi == -INFINITY || xi == -FLT_MAX || xi < -110.0f) {
          ASSERT_EQ(ei, 0.0f);
        }
      }
      if (m == 0.0f) {
        ASSERT_TRUE(std::isnan(sum));  // the row holds a NaN
        if (first.empty()) {
          first = e;
        } else {
          ASSERT_EQ(std::memcmp(first.data(), e.data(), e.size() * sizeof(float)), 0);
        }
      }
    }
    // without the NaN: the canonical sum (16 partial sums by i % 16, then the halving tree)
    std::vector<float> y = x;
    for (float& v : y)
      if (std::isnan(v)) v = -1.0f;
    std::vector<float> e = y;
    const float sum = kt->rows.exp_sum(e.data(), n, 0.0f);
    float part[16] = {};
    for (int64_t i = 0; i < n; ++i) part[i % 16] += e[static_cast<size_t>(i)];
    for (int s = 8; s >= 1; s /= 2)
      for (int j = 0; j < s; ++j) part[j] += part[j + s];
    ASSERT_EQ(sum, part[0]);
  }
}

// row_max on every ISA is the maximum of init and the non-NaN entries, and the sign of a zero maximum follows the
// ISA's lane order (lane j keeps the first of x[j], x[j + W], ... that reaches its maximum, then the first lane in
// lane order): rows of signed zeros and negatives make the AVX-512 tree reduction hand a zero to that loop.
// softmax_rows on every ISA equals row_max then exp_sum row by row, bit for bit (maxima, sums, the rows
// themselves), for row counts around its blocks of 4, NaN, +-inf, -FLT_MAX and all-masked rows, and writes
// nothing between the rows.
TEST(CpuKernels, SoftmaxRowsEqualRowMaxThenExpSumOnEveryIsa) {
  std::mt19937_64 rng(77);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::uniform_int_distribution<int> pick(0, 15);
  const float guard = 12345.0f;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    const int W = isa >= CpuIsa::kAvx512 ? 16 : isa == CpuIsa::kAvx2 ? 8 : 1;
    for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 13})
      for (int64_t n : {16, 48, 112, 272})
        for (float init : {-FLT_MAX, -INFINITY}) {
          const int64_t ld = n + 16;
          std::vector<float> x(static_cast<size_t>(rows * ld), guard);
          for (int64_t r = 0; r < rows; ++r) {
            const int kind = static_cast<int>(r % 4);  // 0: normal with specials, 1: signed zeros, 2: masked, 3: mixed
            for (int64_t c = 0; c < n; ++c) {
              float& v = x[static_cast<size_t>(r * ld + c)];
              const int q = pick(rng);
              if (kind == 1) v = q < 6 ? 0.0f : q < 12 ? -0.0f : -std::fabs(nd(rng));
              else if (kind == 2) v = q < 8 ? -FLT_MAX : -INFINITY;
              else v = q == 0 ? NAN : q == 1 ? -INFINITY : q == 2 ? -FLT_MAX : nd(rng);
              if (kind == 3 && q < 4) v = q < 2 ? -0.0f : 0.0f;
            }
          }
          // row_max: the value, and the zero's sign in lane order
          for (int64_t r = 0; r < rows; ++r) {
            const float* row = x.data() + r * ld;
            float value = init;
            for (int64_t c = 0; c < n; ++c)
              if (!std::isnan(row[c]) && row[c] > value) value = row[c];
            float lane_order = init;
            for (int j = 0; j < W; ++j) {
              float lane = init;
              for (int64_t c = j; c < n; c += W) lane = row[c] > lane ? row[c] : lane;
              lane_order = lane > lane_order ? lane : lane_order;
            }
            const float got = kt->rows.row_max(row, n, init);
            ASSERT_EQ(got, value) << "rows=" << rows << " n=" << n << " r=" << r;
            ASSERT_EQ(nsa::detail::f32_bits(got), nsa::detail::f32_bits(lane_order)) << "n=" << n << " r=" << r;
          }
          std::vector<float> want = x, m_want(static_cast<size_t>(rows)), l_want(static_cast<size_t>(rows));
          for (int64_t r = 0; r < rows; ++r) {
            float* row = want.data() + r * ld;
            m_want[static_cast<size_t>(r)] = kt->rows.row_max(row, n, init);
            l_want[static_cast<size_t>(r)] = kt->rows.exp_sum(row, n, m_want[static_cast<size_t>(r)]);
          }
          std::vector<float> got = x, m(static_cast<size_t>(rows), guard), l(static_cast<size_t>(rows), guard);
          kt->rows.softmax_rows(got.data(), ld, rows, n, init, m.data(), l.data());
          for (int64_t r = 0; r < rows; ++r) {
            ASSERT_EQ(nsa::detail::f32_bits(m[static_cast<size_t>(r)]), nsa::detail::f32_bits(m_want[static_cast<size_t>(r)]))
                << "rows=" << rows << " n=" << n << " r=" << r;
            ASSERT_EQ(nsa::detail::f32_bits(l[static_cast<size_t>(r)]), nsa::detail::f32_bits(l_want[static_cast<size_t>(r)]))
                << "rows=" << rows << " n=" << n << " r=" << r;
          }
          ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "rows=" << rows << " n=" << n;
        }
  }
}

// detail::last_nonzero_byte (the forward's end of the blocks that may score above zero) against a plain scan:
// contiguous and strided rows, empty and partial ranges, a nonzero byte at every distance from the ends.
TEST(CpuKernels, LastNonzeroByteFindsTheLastForcedBlock) {
  std::mt19937_64 rng(5);
  for (int64_t stride : {1, 3})
    for (int trial = 0; trial < 400; ++trial) {
      const int64_t n = 1 + static_cast<int64_t>(rng() % 70);
      std::vector<uint8_t> row(static_cast<size_t>(n * stride), 0);
      const int ones = static_cast<int>(rng() % 4);
      for (int o = 0; o < ones; ++o) row[static_cast<size_t>((rng() % n) * stride)] = static_cast<uint8_t>(1 + rng() % 255);
      for (int64_t k = 0; k < n * stride; ++k)  // bytes between strided elements are not part of the row
        if (k % stride != 0) row[static_cast<size_t>(k)] = 0xFF;
      const int64_t from = static_cast<int64_t>(rng() % (n + 1)), to = from + static_cast<int64_t>(rng() % (n - from + 1));
      int64_t want = from - 1;
      for (int64_t k = from; k < to; ++k)
        if (row[static_cast<size_t>(k * stride)] != 0) want = k;
      ASSERT_EQ(nsa::detail::last_nonzero_byte(row.data(), stride, from, to), want)
          << "stride=" << stride << " n=" << n << " from=" << from << " to=" << to;
    }
}

// normalize_group against its definition, on every ISA: row g of out is normalize_row's rounded P of x_g / l[g], and
// sum_out the §3.6 pairwise sum of the fp32 P_g (level by level, an odd last element carried up). G = 1..17, 32
// and 64 (the power-of-two G build their tree as the quotients come; the others keep all G), every store kind,
// rows with NaN, +-inf, zeros and tiny values whose quotients are subnormal; the gaps between out rows stay
// unwritten. (A NaN sum is compared as NaN, not by payload: the scalar sum here may commute its operands.)
TEST(CpuKernels, NormalizeGroupEqualsNormalizeRowThenPairwiseSumOnEveryIsa) {
  std::mt19937_64 rng(91);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 63);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    for (int G : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 32, 64})
      for (int64_t n : {16, 48, 272})
        for (int st = 0; st < 4; ++st) {
          const auto store = static_cast<nsa::cpu::PStore>(st);
          const int64_t esz = store == nsa::cpu::PStore::kBf16Bits ? 2 : 4;
          const int64_t ldx = n + 16, ld_out = n + 8;
          std::vector<float> x(static_cast<size_t>(G * ldx), 0.5f), l(static_cast<size_t>(G));
          for (int g = 0; g < G; ++g) {
            l[static_cast<size_t>(g)] = g % 5 == 4 ? 3.0e5f : 1.0f + std::fabs(nd(rng)) * 20.0f;
            for (int64_t c = 0; c < n; ++c) {
              const int q = pick(rng);
              x[static_cast<size_t>(g * ldx + c)] = q == 0   ? NAN
                                                    : q == 1 ? INFINITY
                                                    : q == 2 ? 0.0f
                                                    : q == 3 ? 1.0e-38f * std::fabs(nd(rng))
                                                             : std::fabs(nd(rng));
            }
          }
          std::vector<unsigned char> want_out(static_cast<size_t>(G * ld_out * esz), 0xAB), got_out = want_out;
          std::vector<float> p(static_cast<size_t>(G * n)), want_sum(static_cast<size_t>(n));
          for (int g = 0; g < G; ++g) {
            std::copy(x.begin() + g * ldx, x.begin() + g * ldx + n, p.begin() + g * n);
            kt->rows.normalize_row(p.data() + g * n, n, l[static_cast<size_t>(g)], want_out.data() + g * ld_out * esz,
                                   store);
          }
          for (int64_t c = 0; c < n; ++c) {
            std::vector<float> col(static_cast<size_t>(G));
            for (int g = 0; g < G; ++g) col[static_cast<size_t>(g)] = p[static_cast<size_t>(g * n + c)];
            want_sum[static_cast<size_t>(c)] = nsa::detail::pairwise_reduce(col.data(), G, [](float a, float b) { return a + b; });
          }
          std::vector<float> got_sum(static_cast<size_t>(n), 7.0f);
          kt->rows.normalize_group(x.data(), ldx, G, l.data(), n, got_out.data(), ld_out, store, got_sum.data());
          ASSERT_TRUE(got_out == want_out) << "G=" << G << " n=" << n << " store=" << st;
          for (int64_t c = 0; c < n; ++c) {
            const float w = want_sum[static_cast<size_t>(c)], v = got_sum[static_cast<size_t>(c)];
            if (std::isnan(w)) ASSERT_TRUE(std::isnan(v)) << "G=" << G << " n=" << n << " c=" << c;
            else ASSERT_EQ(nsa::detail::f32_bits(v), nsa::detail::f32_bits(w)) << "G=" << G << " n=" << n << " c=" << c;
          }
        }
  }
}

// The scalar table built twice on x86 (src/cpu/arch/scalar): for the baseline (std::fma a call into libm) and with
// FMA (kernels_scalar_fma, what kernels_for(kScalar) returns on this host). Every entry on the same inputs gives the
// same bits: random rows with NaN, +-inf, -FLT_MAX, signed zeros, subnormals and values that overflow exp, GEMMs
// of every shape class (rows past the micro-tile, column windows inside and across panels, reduction chunks,
// alpha, accumulation), every PStore and dtype.
TEST(CpuKernels, ScalarFmaBuildEqualsBaselineBuild) {
#if NSA_HAVE_X86_KERNELS
  if (nsa::cpu_detected_isa() < CpuIsa::kAvx2) GTEST_SKIP() << "no FMA on this CPU: the scalar FMA build is not used";
  const nsa::cpu::KernelTable* base = nsa::cpu::kernels_scalar();
  const nsa::cpu::KernelTable* fma = nsa::cpu::kernels_scalar_fma();
  ASSERT_EQ(nsa::cpu::kernels_for(CpuIsa::kScalar), fma);
  std::mt19937_64 rng(31);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const float specials[] = {NAN, INFINITY, -INFINITY, -FLT_MAX, FLT_MAX, -0.0f, 0.0f, 1e-40f, -3e-39f, 100.0f, -120.0f};
  auto row = [&](int64_t n, bool with_specials) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = nd(rng);
    if (with_specials)
      for (float sp : specials) x[static_cast<size_t>(rng() % static_cast<uint64_t>(n))] = sp;
    return x;
  };
  auto same = [](const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; };
  // GEMM: C[R][ncols] (+)= alpha A[R][P] B[P][cols], B as panels of 64 columns
  for (int64_t R : {1, 2, 3, 4, 7, 13})
    for (int64_t P : {1, 5, 64, 130})
      for (int64_t c0 : {0, 16, 48})
        for (int64_t nc : {16, 64, 112}) {
          const int64_t panels = (c0 + nc + 63) / 64;
          const std::vector<float> A = row(R * P, false), B = row(panels * P * 64, false);
          for (int variant = 0; variant < 4; ++variant) {
            const float alpha = variant % 2 == 1 ? 0.37f : 1.0f;
            const bool acc = variant >= 2;
            const int64_t kc = variant == 2 ? 48 : P;
            std::vector<float> c1 = row(R * nc, false), c2 = c1;
            base->gemm.f32(A.data(), P, R, B.data(), P * 64, c0, nc, P, kc, c1.data(), nc, alpha, acc);
            fma->gemm.f32(A.data(), P, R, B.data(), P * 64, c0, nc, P, kc, c2.data(), nc, alpha, acc);
            ASSERT_TRUE(same(c1.data(), c2.data(), c1.size() * 4)) << "gemm R=" << R << " P=" << P << " col0=" << c0;
          }
        }
  for (int64_t n : {16, 64, 528}) {
    const std::vector<float> x = row(n, true), y = row(n, true);
    ASSERT_TRUE(same(std::vector<float>{base->rows.row_max(x.data(), n, -FLT_MAX)}.data(),
                     std::vector<float>{fma->rows.row_max(x.data(), n, -FLT_MAX)}.data(), 4));
    const std::vector<float> fin = row(n, false);
    const float fin_max = base->rows.row_max(fin.data(), n, -FLT_MAX);
    for (float m : {fin_max, fin_max + 2.5f, FLT_MAX}) {  // exp_sum's m: at least every x[i]
      std::vector<float> e1 = fin, e2 = fin;
      const float l1 = base->rows.exp_sum(e1.data(), n, m), l2 = fma->rows.exp_sum(e2.data(), n, m);
      ASSERT_TRUE(same(&l1, &l2, 4) && same(e1.data(), e2.data(), e1.size() * 4)) << "exp_sum n=" << n << " m=" << m;
      for (int st = 0; st < 4; ++st) {
        const auto store = static_cast<nsa::cpu::PStore>(st);
        std::vector<float> x1 = e1, x2 = e1, o1(static_cast<size_t>(n), 7.0f), o2 = o1;
        base->rows.normalize_row(x1.data(), n, l1, o1.data(), store);
        fma->rows.normalize_row(x2.data(), n, l1, o2.data(), store);
        ASSERT_TRUE(same(x1.data(), x2.data(), x1.size() * 4) && same(o1.data(), o2.data(), o1.size() * 4)) << st;
      }
    }
    for (int G : {1, 3, 16, 64}) {
      const std::vector<float> xs = row(G * n, false);
      std::vector<float> l(static_cast<size_t>(G));
      for (float& v : l) v = 1.0f + std::fabs(nd(rng));
      std::vector<float> o1(static_cast<size_t>(G * n), 7.0f), o2 = o1, s1(static_cast<size_t>(n)), s2 = s1;
      base->rows.normalize_group(xs.data(), n, G, l.data(), n, o1.data(), n, nsa::cpu::PStore::kF32AsBf16, s1.data());
      fma->rows.normalize_group(xs.data(), n, G, l.data(), n, o2.data(), n, nsa::cpu::PStore::kF32AsBf16, s2.data());
      ASSERT_TRUE(same(o1.data(), o2.data(), o1.size() * 4) && same(s1.data(), s2.data(), s1.size() * 4)) << "G=" << G;
    }
    {
      std::vector<float> in = row(n + 16, false), b1(static_cast<size_t>(n)), b2 = b1;
      base->rows.box_sum(in.data() + 16, b1.data(), n, 5);
      fma->rows.box_sum(in.data() + 16, b2.data(), n, 5);
      ASSERT_TRUE(same(b1.data(), b2.data(), b1.size() * 4));
      std::vector<float> a1 = x, a2 = x;
      base->rows.add_row(a1.data(), y.data(), n);
      fma->rows.add_row(a2.data(), y.data(), n);
      ASSERT_TRUE(same(a1.data(), a2.data(), a1.size() * 4));
    }
    for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
      const int64_t m = n - 3;  // a tail shorter than a vector
      std::vector<unsigned char> d1(static_cast<size_t>(m) * 4, 0xAB), d2 = d1;
      base->rows.store_row(x.data(), d1.data(), m, dt);
      fma->rows.store_row(x.data(), d2.data(), m, dt);
      ASSERT_TRUE(d1 == d2) << nsa::dtype_name(dt);
      std::vector<float> r1(static_cast<size_t>(m)), r2 = r1;
      base->rows.load_row(d1.data(), r1.data(), m, dt);
      fma->rows.load_row(d1.data(), r2.data(), m, dt);
      ASSERT_TRUE(same(r1.data(), r2.data(), r1.size() * 4)) << nsa::dtype_name(dt);
    }
    {
      std::vector<float> s1 = row(n, true), dp1 = row(n, true);
      std::vector<uint8_t> keep(static_cast<size_t>(n));
      for (auto& k : keep) k = (rng() % 3) != 0;
      std::vector<float> s2 = s1, dp2 = dp1;
      base->grad.softmax_grad_row(s1.data(), dp1.data(), keep.data(), n, 1.25f, 0.125f, -0.5f);
      fma->grad.softmax_grad_row(s2.data(), dp2.data(), keep.data(), n, 1.25f, 0.125f, -0.5f);
      ASSERT_TRUE(same(s1.data(), s2.data(), s1.size() * 4) && same(dp1.data(), dp2.data(), dp1.size() * 4));
    }
    {
      const int K = 16;
      std::vector<float> sc = row(n, false);
      std::vector<int32_t> w(static_cast<size_t>(2 * n)), i1(K), i2(K);
      ASSERT_EQ(base->select.top_k(sc.data(), n, K, i1.data(), w.data()), fma->select.top_k(sc.data(), n, K, i2.data(), w.data()));
      ASSERT_EQ(i1, i2);
    }
  }
#else
  GTEST_SKIP() << "the scalar table has one build on this architecture";
#endif
}

INSTANTIATE_TEST_SUITE_P(Shards, CpuFuzz, ::testing::Values(0, 1, 2, 3));


// detail::analyse_mask_row against its definition (first and last visible column, whether every column between is
// visible), on contiguous rows (the library-scan path) and the same rows with column stride 3 (the element loop):
// empty, all masked, all visible, one visible column at either end, holes, masked entries other than 1; the entry
// just past the row is visible, so a scan past C would show.
TEST(MaskRows, AnalysisMatchesTheDefinitionContiguousAndStrided) {
  std::mt19937_64 rng(91);
  int checked = 0;
  for (int64_t C : {0, 1, 2, 15, 16, 17, 63, 64, 65, 200, 511}) {
    for (int pattern = 0; pattern < 9; ++pattern) {
      std::vector<uint8_t> row(static_cast<size_t>(C), 1);
      std::uniform_int_distribution<int64_t> col(0, std::max<int64_t>(0, C - 1));
      if (C > 0) {
        const int64_t a = col(rng), b = col(rng), lo = std::min(a, b), hi = std::max(a, b) + 1;
        switch (pattern) {
          case 0: break;                                                     // all masked
          case 1: std::fill(row.begin(), row.end(), 0); break;              // all visible
          case 2: row[0] = 0; break;                                         // first column only
          case 3: row[static_cast<size_t>(C - 1)] = 0; break;                // last column only
          case 4: std::fill(row.begin() + lo, row.begin() + hi, 0); break;  // one range
          case 5:                                                            // a range with a hole
            std::fill(row.begin() + lo, row.begin() + hi, 0);
            if (hi - lo >= 3) row[static_cast<size_t>((lo + hi) / 2)] = 2;
            break;
          case 6:  // masked entries of any nonzero value around one range
            for (auto& x : row) x = static_cast<uint8_t>(1 + rng() % 255);
            std::fill(row.begin() + lo, row.begin() + hi, 0);
            break;
          default:  // scattered
            for (auto& x : row) x = rng() % 3 == 0 ? 0 : 1;
            break;
        }
      }
      row.push_back(0);  // a visible entry just past the row: a scan that overran would find it
      int64_t first = -1, last = -1, visible = 0;
      for (int64_t c = 0; c < C; ++c)
        if (row[static_cast<size_t>(c)] == 0) {
          if (first < 0) first = c;
          last = c;
          ++visible;
        }
      std::vector<uint8_t> strided(static_cast<size_t>(3 * C + 1), 0);  // gaps and the entry past the row: visible
      for (int64_t c = 0; c < C; ++c) strided[static_cast<size_t>(3 * c)] = row[static_cast<size_t>(c)];
      nsa::Mask2 contiguous_mask, strided_mask;
      contiguous_mask.data = row.data();
      contiguous_mask.stride[0] = C;
      contiguous_mask.stride[1] = 1;
      strided_mask.data = strided.data();
      strided_mask.stride[0] = 3 * C;
      strided_mask.stride[1] = 3;
      for (const nsa::Mask2* m : {&contiguous_mask, &strided_mask}) {
        SCOPED_TRACE("C = " + std::to_string(C) + ", pattern " + std::to_string(pattern) +
                     (m == &strided_mask ? ", strided" : ", contiguous"));
        const nsa::detail::MaskRow r = nsa::detail::analyse_mask_row(*m, 0, C);
        if (first < 0) {
          EXPECT_EQ(r.kind, nsa::detail::MaskRowKind::kFullyMasked);
          continue;
        }
        EXPECT_EQ(r.lo, first);
        EXPECT_EQ(r.hi, last + 1);
        EXPECT_EQ(r.kind, visible == last + 1 - first ? nsa::detail::MaskRowKind::kRange
                                                      : nsa::detail::MaskRowKind::kScattered);
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 100);
}

// GemmKernels::f32_gather / bf16_gather against f32 / bf16 on every ISA table this host runs: the gathered GEMM reads
// A row r at a_rows[r] and writes C row r at c_rows[r]; with A rows picked from a pool (some twice, in any order) and
// C rows scattered over a buffer, every result equals the strided GEMM's on the same rows copied together, bit for
// bit. Shapes: row counts through every micro-kernel tail (and the 16-row one-vector kernel), column windows inside
// and across panels, reduction chunks (kc < P), alpha, accumulation onto existing values.
TEST(CpuKernels, GatheredGemmEqualsStridedGemmOnEveryIsa) {
  std::mt19937_64 rng(41);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  int checked = 0;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    ASSERT_NE(kt->gemm.f32_gather, nullptr);
    ASSERT_EQ(kt->gemm.bf16 == nullptr, kt->gemm.bf16_gather == nullptr);
    for (int64_t R : {1, 2, 5, 6, 7, 13, 16, 17, 40}) {
      for (int64_t P : {1, 6, 33}) {             // reduction: fp32 elements, or bf16 pairs
        for (auto [c0, nc] : {std::pair<int64_t, int64_t>{0, 64}, {16, 32}, {48, 48}, {0, 128}, {32, 16}}) {
          for (int64_t kc : {P, int64_t(4)}) {
            for (bool acc : {false, true}) {
              const int64_t pool = R / 2 + 1, lda = 2 * P + 3, ldc = 200;
              const float alpha = acc ? 0.75f : 1.0f;
              std::vector<int64_t> pick(static_cast<size_t>(R));  // A row of each GEMM row: repeats allowed
              for (auto& x : pick) x = static_cast<int64_t>(rng() % static_cast<uint64_t>(pool));
              std::vector<int64_t> place(static_cast<size_t>(R));  // C row of each GEMM row: distinct, shuffled
              for (int64_t r = 0; r < R; ++r) place[static_cast<size_t>(r)] = 2 * r + 1;
              std::shuffle(place.begin(), place.end(), rng);
              const int64_t ncols_b = 128;  // two panels
              std::vector<float> init(static_cast<size_t>((2 * R + 2) * ldc));
              for (auto& x : init) x = nd(rng);
              // One GEMM through the strided entry (the picked A rows and the placed C rows copied together) and
              // through the gathered one (in place); every C element equal, rows no GEMM row maps to untouched.
              auto compare = [&](const char* path, const auto& A, auto strided, auto gathered) {
                using T = typename std::decay_t<decltype(A)>::value_type;
                std::vector<T> Ad(static_cast<size_t>(R * lda));
                std::vector<float> Cd(static_cast<size_t>(R * ldc)), Cg = init;
                std::vector<const T*> ar(static_cast<size_t>(R));
                std::vector<float*> cr(static_cast<size_t>(R));
                for (int64_t r = 0; r < R; ++r) {
                  std::copy_n(A.data() + pick[static_cast<size_t>(r)] * lda, lda, Ad.data() + r * lda);
                  std::copy_n(init.data() + place[static_cast<size_t>(r)] * ldc, ldc, Cd.data() + r * ldc);
                  ar[static_cast<size_t>(r)] = A.data() + pick[static_cast<size_t>(r)] * lda;
                  cr[static_cast<size_t>(r)] = Cg.data() + place[static_cast<size_t>(r)] * ldc;
                }
                strided(Ad.data(), Cd.data());
                gathered(ar.data(), cr.data());
                for (int64_t r = 0; r < R; ++r)
                  for (int64_t j = 0; j < ldc; ++j)
                    ASSERT_EQ(nsa::detail::f32_bits(Cd[static_cast<size_t>(r * ldc + j)]),
                              nsa::detail::f32_bits(Cg[static_cast<size_t>(place[static_cast<size_t>(r)] * ldc + j)]))
                        << path << " R=" << R << " P=" << P << " c0=" << c0 << " nc=" << nc << " kc=" << kc
                        << " r=" << r << " j=" << j;
                for (int64_t r = 0; r <= 2 * R + 1; r += 2)
                  for (int64_t j = 0; j < ldc; ++j)
                    ASSERT_EQ(nsa::detail::f32_bits(Cg[static_cast<size_t>(r * ldc + j)]),
                              nsa::detail::f32_bits(init[static_cast<size_t>(r * ldc + j)]))
                        << path << " untouched row " << r;
              };
              {
                std::vector<float> A(static_cast<size_t>(pool * lda)), B(static_cast<size_t>(P * ncols_b));
                for (auto& x : A) x = nd(rng);
                for (auto& x : B) x = nd(rng);
                compare(
                    "f32", A,
                    [&](const float* a, float* c) {
                      kt->gemm.f32(a, lda, R, B.data(), P * 64, c0, nc, P, kc, c, ldc, alpha, acc);
                    },
                    [&](const float* const* ar, float* const* cr) {
                      kt->gemm.f32_gather(ar, R, B.data(), P * 64, c0, nc, P, kc, cr, alpha, acc);
                    });
              }
              if (kt->gemm.bf16 != nullptr) {
                std::vector<uint16_t> A(static_cast<size_t>(pool * lda)), B(static_cast<size_t>(2 * P * ncols_b));
                for (auto& x : A) x = nsa::detail::f32_to_bf16(nd(rng));
                for (auto& x : B) x = nsa::detail::f32_to_bf16(nd(rng));
                compare(
                    "bf16", A,
                    [&](const uint16_t* a, float* c) {
                      kt->gemm.bf16(a, lda, R, B.data(), P * 128, c0, nc, P, kc, c, ldc, alpha, acc);
                    },
                    [&](const uint16_t* const* ar, float* const* cr) {
                      kt->gemm.bf16_gather(ar, R, B.data(), P * 128, c0, nc, P, kc, cr, alpha, acc);
                    });
              }
              ++checked;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 500);
}


// RowKernels::store_row_stream on every ISA table, bf16 / fp16 / fp32, against store_row byte for byte: rows of whole
// 64-byte lines to aligned memory (the streamed path: a line assembled in registers on AVX2 and AVX-512; the scalar
// path stores plainly) and rows that are not (the plain fallback), with NaN payloads, +-inf, signed zeros, subnormals, bf16 /
// fp16 rounding ties and values past the fp16 range.
TEST(CpuKernels, StreamedRowStoresEqualPlainStores) {
  std::mt19937_64 rng(53);
  std::normal_distribution<float> nd(0.0f, 100.0f);
  const float specials[] = {NAN, -NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f, -3e-39f, 70000.0f, -1e6f, 65520.0f,
                            nsa::detail::bits_f32(0x3f808000u), nsa::detail::bits_f32(0x3f818000u),
                            nsa::detail::bits_f32(0x7fc12345u), nsa::detail::bits_f32(0xffa00001u)};
  int checked = 0;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
      const int64_t esz = dt == DType::kF32 ? 4 : 2;
      for (int64_t n : {16, 32, 48, 64, 128, 200, 256}) {
        for (int64_t offset : {0, 2}) {  // bytes past a 64-byte boundary: 0 streams (whole lines), 2 falls back
          std::vector<float> src(static_cast<size_t>(n));
          for (float& v : src) v = nd(rng);
          for (float sp : specials) src[static_cast<size_t>(rng() % static_cast<uint64_t>(n))] = sp;
          nsa::detail::AlignedBuffer<uint8_t> a, b;
          a.reset(n * esz + 64);
          b.reset(n * esz + 64);
          std::memset(a.get(), 0x5a, static_cast<size_t>(n * esz + 64));
          std::memset(b.get(), 0x5a, static_cast<size_t>(n * esz + 64));
          kt->rows.store_row_stream(src.data(), a.get() + offset, n, dt);
          kt->rows.stream_fence();
          kt->rows.store_row(src.data(), b.get() + offset, n, dt);
          ASSERT_EQ(std::memcmp(a.get(), b.get(), static_cast<size_t>(n * esz + 64)), 0)
              << nsa::dtype_name(dt) << " n=" << n << " offset=" << offset;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 42 * static_cast<int>(supported_isas().size()));  // 3 dtypes x 7 lengths x 2 offsets per path
}

// bf16 rounding of the row stores on every ISA table (store_row, store_row_stream, normalize_row's kBf16Bits with
// l = 1, normalize_group's with G = 1), element by element against the scalar definition detail::f32_to_bf16: 16-value
// vectors of only normal values (ties, values that round up to inf), of zeros and infinities, and vectors holding
// a subnormal or a quiet NaN (which the avx512bf16 path must not pass to vcvtneps2bf16: it reads subnormals as zero).
TEST(CpuKernels, Bf16RowStoresRoundAsTheScalarDefinitionOnEveryIsa) {
  std::mt19937_64 rng(59);
  std::normal_distribution<float> nd(0.0f, 10.0f);
  const uint32_t normal_edges[] = {0x3f808000u, 0x3f818000u, 0x3f80c000u, 0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu,
                                   0xff7fffffu, 0x00800000u, 0x80800001u, 0x00808000u, 0x4b7fffffu};
  const uint32_t inf_zero[] = {0x7f800000u, 0xff800000u, 0x00000000u, 0x80000000u};
  const uint32_t subnormal[] = {0x00012345u, 0x8000ffffu, 0x00008000u, 0x00018000u, 0x007fffffu, 0x80000001u};
  const uint32_t quiet_nan[] = {0x7fc12345u, 0xffc00001u, 0x7fffffffu, 0x7fc00000u};
  const int64_t n = 256;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x(static_cast<size_t>(n));
      for (int64_t v = 0; v < n / 16; ++v) {
        float* vec = x.data() + 16 * v;
        for (int j = 0; j < 16; ++j) vec[j] = nd(rng);
        const size_t at = rng() % 16;
        switch (v % 4) {
          case 0:
            for (uint32_t e : normal_edges) vec[rng() % 16] = nsa::detail::bits_f32(e);
            break;
          case 1: vec[at] = nsa::detail::bits_f32(subnormal[rng() % std::size(subnormal)]); break;
          case 2: vec[at] = nsa::detail::bits_f32(quiet_nan[rng() % std::size(quiet_nan)]); break;
          default:
            for (uint32_t e : inf_zero) vec[rng() % 16] = nsa::detail::bits_f32(e);
            break;
        }
      }
      std::vector<uint16_t> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) want[static_cast<size_t>(i)] = nsa::detail::f32_to_bf16(x[static_cast<size_t>(i)]);
      nsa::detail::AlignedBuffer<uint16_t> got;
      got.reset(n);
      auto check = [&](const char* what) {
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(got.get()[i], want[static_cast<size_t>(i)])
              << what << " i=" << i << " x bits " << std::hex << nsa::detail::f32_bits(x[static_cast<size_t>(i)]);
      };
      kt->rows.store_row(x.data(), got.get(), n, DType::kBF16);
      check("store_row");
      std::fill(got.get(), got.get() + n, uint16_t(0x1234));
      kt->rows.store_row_stream(x.data(), got.get(), n, DType::kBF16);
      kt->rows.stream_fence();
      check("store_row_stream");
      std::vector<float> y = x;
      std::fill(got.get(), got.get() + n, uint16_t(0x1234));
      kt->rows.normalize_row(y.data(), n, 1.0f, got.get(), nsa::cpu::PStore::kBf16Bits);
      check("normalize_row");
      const float one = 1.0f;
      std::vector<float> sum(static_cast<size_t>(n));
      std::fill(got.get(), got.get() + n, uint16_t(0x1234));
      kt->rows.normalize_group(x.data(), n, 1, &one, n, got.get(), n, nsa::cpu::PStore::kBf16Bits, sum.data());
      check("normalize_group");
    }
  }
}

// detail::LineVector (per-worker scratch): every array starts on a cache line and owns the lines it touches, so
// arrays allocated one after another never share a line; growth keeps that; elements behave as in std::vector.
TEST(CpuWorkspace, LineVectorsOwnTheirCacheLines) {
  std::vector<nsa::detail::LineVector<float>> arrays;
  for (size_t n : {1, 3, 15, 16, 17, 100}) {
    arrays.emplace_back(n, 1.5f);
    arrays.emplace_back(2 * n + 1);
  }
  auto first_line = [](const void* p) { return reinterpret_cast<uintptr_t>(p) / 64; };
  auto last_line = [](const float* p, size_t n) { return (reinterpret_cast<uintptr_t>(p + n) - 1) / 64; };
  for (size_t i = 0; i < arrays.size(); ++i) {
    const auto& a = arrays[i];
    ASSERT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u) << i;
    for (size_t j = 0; j < arrays.size(); ++j) {
      if (j == i) continue;
      const auto& b = arrays[j];
      const bool apart = last_line(a.data(), a.capacity()) < first_line(b.data()) ||
                         last_line(b.data(), b.capacity()) < first_line(a.data());
      EXPECT_TRUE(apart) << "arrays " << i << " and " << j << " share a cache line";
    }
  }
  nsa::detail::LineVector<int64_t> grown;
  for (int64_t k = 0; k < 1000; ++k) {
    grown.push_back(k);
    ASSERT_EQ(reinterpret_cast<uintptr_t>(grown.data()) % 64, 0u) << k;
  }
  for (int64_t k = 0; k < 1000; ++k) ASSERT_EQ(grown[static_cast<size_t>(k)], k);
  EXPECT_EQ(arrays[0][0], 1.5f);
}

}  // namespace
}  // namespace nsa_test
