// The reference on cases worked out by hand (docs/spec/compress_attention.md §3, §4, §5, §8). Every expectation below is a
// number derived on paper, not the output of another implementation. The same expectations are
// also applied to the CPU backend on every ISA path this host runs: the cases are exact.
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "common/group_sum.h"
#include "ops/compress_attention/batches.h"
#include "test_util.h"

namespace nsa_test {
namespace {

// An implementation under test: the public reference, or the CPU backend forced to one ISA.
struct Impl {
  std::string name;
  Backend backend;
  int isa;
};

std::vector<Impl> impls() {
  std::vector<Impl> out = {{"reference", Backend::kReference, -1}};
  for (CpuIsa isa : supported_isas()) out.push_back({std::string("cpu/") + nsa::cpu_isa_name(isa), Backend::kCpu, static_cast<int>(isa)});
  return out;
}

Result run_impl(const Case& cs, const Impl& im) {
  Result r = run(cs, im.backend, im.isa);
  EXPECT_TRUE(r.status.ok()) << im.name << ": " << r.status.message();
  return r;
}

std::vector<int32_t> topk_row(const Case& cs, const Result& r, int64_t t, int64_t n2 = 0) {
  const auto* p = &r.topk[static_cast<size_t>((t * cs.N2 + n2) * cs.K)];
  return std::vector<int32_t>(p, p + cs.K);
}
std::vector<int32_t> iota_k(int64_t K) {
  std::vector<int32_t> v(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) v[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  return v;
}
double out_at(const Case& cs, const Result& r, int64_t t, int64_t h, int64_t j) {
  return r.out[static_cast<size_t>((t * cs.N1 + h) * cs.D2 + j)];
}
float max_at(const Case& cs, const Result& r, int64_t t, int64_t h) { return r.smax[static_cast<size_t>(stat_index(cs, t, h))]; }
float sum_at(const Case& cs, const Result& r, int64_t t, int64_t h) { return r.ssum[static_cast<size_t>(stat_index(cs, t, h))]; }

// Makes compressed token `hot` the only one with a non-zero probability for row t (single head):
// q[t] = e_0, k_c[0] = 0 for hot tokens and -200 for the others (exp(-200) is 0 in fp32).
void set_hot_tokens(Case& cs, int64_t t, const std::vector<int64_t>& hot, int64_t batch = 0) {
  for (int64_t j = 0; j < cs.D; ++j) cs.set_q(t, 0, j, j == 0 ? 1.0 : 0.0);
  const int64_t c0 = cs.c_begin(batch);
  for (int64_t c = 0; c < cs.c[static_cast<size_t>(batch)]; ++c) {
    const bool is_hot = std::find(hot.begin(), hot.end(), c) != hot.end();
    cs.set_k(c0 + c, 0, 0, is_hot ? 0.0 : -200.0);
  }
}

// --------------------------------------------------------------------------------------------
// §8: l = 32, d = 16, l' = 64, the causal mask of §9, C = 63, Sel = 16, w = [1, 2, 2, 2, 1].
// Query rows s = 0..127 stand for the tokens t = s. With all queries zero every visible token
// has the same score, so P is uniform over the visible tokens. v_c = [c, 1].
TEST(ReferenceHand, Spec8CausalExample) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = Case::make(dt, {128}, {63}, 1, 1, 16, 2, 32, 16, 64, 16);
    std::mt19937_64 rng(8);
    cs.fill_uniform(rng, -1, 1);
    for (int64_t t = 0; t < 128; ++t)
      for (int64_t j = 0; j < 16; ++j) cs.set_q(t, 0, j, 0.0);
    for (int64_t c = 0; c < 63; ++c) {
      cs.set_v(c, 0, 0, static_cast<double>(c));
      cs.set_v(c, 0, 1, 1.0);
    }
    cs.set_causal_mask();
    // The mask itself: t = 0..30 see nothing, 31..46 see {0}, 100 sees {0..4}.
    for (int64_t t : {0, 30}) EXPECT_EQ(cs.atten_at(t, 0), 1);
    EXPECT_EQ(cs.atten_at(31, 0), 0);
    EXPECT_EQ(cs.atten_at(46, 1), 1);
    EXPECT_EQ(cs.atten_at(47, 1), 0);
    EXPECT_EQ(cs.atten_at(100, 4), 0);
    EXPECT_EQ(cs.atten_at(100, 5), 1);
    EXPECT_EQ(cs.sel(0), 16);

    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      const Result r = run_impl(cs, im);
      // Fully masked rows t = 0..30 (§5): P = 1/63, out = mean of V = [31, 1],
      // softmax_max = -FLT_MAX, softmax_sum = 63. Scores: blocks 0..14 get 8/63, block 15 uses
      // only P[60..62] (5/63): order [0, 1, ..., 15].
      for (int64_t t : {0, 17, 30}) {
        EXPECT_EQ(max_at(cs, r, t, 0), -FLT_MAX);
        EXPECT_EQ(sum_at(cs, r, t, 0), 63.0f);
        if (dt == DType::kBF16) {
          // cast(1/63) = 0.015869140625 (8 bits); sum_c c * that = 30.992431640625 exactly in
          // fp32, rounded to bf16: 31. The 63 copies of it: 0.999755859375 -> 1.
          EXPECT_EQ(out_at(cs, r, t, 0, 0), 31.0);
          EXPECT_EQ(out_at(cs, r, t, 0, 1), 1.0);
        } else {
          EXPECT_NEAR(out_at(cs, r, t, 0, 0), 31.0, 31 * 1e-5);
          EXPECT_NEAR(out_at(cs, r, t, 0, 1), 1.0, 1e-5);
        }
        EXPECT_EQ(topk_row(cs, r, t), iota_k(16));
      }
      // t = 31..46 see {0}: P[0] = 1, out = v_0 = [0, 1], m = 0, l_sum = 1; score[0] = w_4 P[0] = 1.
      for (int64_t t : {31, 40, 46}) {
        EXPECT_EQ(max_at(cs, r, t, 0), 0.0f);
        EXPECT_EQ(sum_at(cs, r, t, 0), 1.0f);
        EXPECT_EQ(out_at(cs, r, t, 0, 0), 0.0);
        EXPECT_EQ(out_at(cs, r, t, 0, 1), 1.0);
        EXPECT_EQ(topk_row(cs, r, t), iota_k(16));
      }
      // t = 47 sees {0, 1}: P = 1/2 each, out = [0.5, 1], l_sum = 2.
      EXPECT_EQ(sum_at(cs, r, 47, 0), 2.0f);
      EXPECT_EQ(out_at(cs, r, 47, 0, 0), 0.5);
      EXPECT_EQ(out_at(cs, r, 47, 0, 1), 1.0);
      // t = 100 sees {0..4}: P = 1/5, out[0] = (0+1+2+3+4)/5 = 2, l_sum = 5; scores
      // [P0+2P1+2P2+2P3+P4, P4, 0, ...] = [8/5, 1/5, 0, ...] -> [0, 1, 2, ..., 15].
      EXPECT_EQ(sum_at(cs, r, 100, 0), 5.0f);
      EXPECT_NEAR(out_at(cs, r, 100, 0, 0), 2.0, dt == DType::kBF16 ? 0.0 : 2e-6);
      EXPECT_EQ(topk_row(cs, r, 100), iota_k(16));
    }
  }
}

// The weights [1, 2, 2, 2, 1] through the top-k order, with a crafted P: four hot tokens
// {12, 13, 22, 40} with P = 1/4 each (all others exactly 0), C = 63, no mask.
//   block 2: tokens 12..8   -> w_0 P12              = 1/4
//   block 3: tokens 16..12  -> w_3 P13 + w_4 P12    = 2/4 + 1/4 = 3/4
//   block 5: tokens 24..20  -> w_2 P22              = 2/4
//   block 9: tokens 40..36  -> w_0 P40              = 1/4
//   block 10: tokens 44..40 -> w_4 P40              = 1/4
// Order: 3, 5, then the ties 2, 9, 10 by index, then the zero blocks by index.
TEST(ReferenceHand, WeightsThroughTopkOrder) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = Case::make(dt, {1}, {63}, 1, 1, 16, 1, 32, 16, 64, 16);
    cs.scale = 1.0;
    set_hot_tokens(cs, 0, {12, 13, 22, 40});
    for (int64_t c = 0; c < 63; ++c) cs.set_v(c, 0, 0, static_cast<double>(c));
    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      const Result r = run_impl(cs, im);
      EXPECT_EQ(topk_row(cs, r, 0), (std::vector<int32_t>{3, 5, 2, 9, 10, 0, 1, 4, 6, 7, 8, 11, 12, 13, 14, 15}));
      EXPECT_EQ(max_at(cs, r, 0, 0), 0.0f);
      EXPECT_EQ(sum_at(cs, r, 0, 0), 4.0f);
      EXPECT_EQ(out_at(cs, r, 0, 0, 0), (12 + 13 + 22 + 40) / 4.0);  // 21.75, exact in bf16
    }
  }
}

// The weight vectors of §8, directly and through the top-k order of a single hot token x
// (P[x] = 1): block k scores w_{M(k+1)-x}, so the non-zero blocks come first ordered by weight.
TEST(ReferenceHand, WeightVectorsOfSpec8) {
  struct Cfg {
    int64_t l, d, lp;
    std::vector<int> w;
  };
  const std::vector<Cfg> cfgs = {{32, 16, 64, {1, 2, 2, 2, 1}},
                                 {64, 16, 64, {1, 2, 3, 4, 3, 2, 1}},
                                 {32, 32, 64, {1, 1}},
                                 {16, 16, 16, {1}},
                                 {32, 16, 128, {1, 2, 2, 2, 2, 2, 2, 2, 1}}};
  for (const Cfg& cf : cfgs) {
    SCOPED_TRACE("(l,d,l')=(" + std::to_string(cf.l) + "," + std::to_string(cf.d) + "," + std::to_string(cf.lp) + ")");
    const int64_t M = cf.lp / cf.d, N = cf.l / cf.d;
    EXPECT_EQ(nsa::detail::selection_weights(M, N), cf.w);
    const int64_t C = 3 * M + 1, Sel = 4;
    Case cs = Case::make(DType::kF32, {1}, {C}, 1, 1, 16, 1, cf.l, cf.d, cf.lp, Sel);
    cs.scale = 1.0;
    ASSERT_EQ(cs.sel(0), Sel);
    for (int64_t x = 0; x < C; ++x) {
      SCOPED_TRACE("hot token " + std::to_string(x));
      set_hot_tokens(cs, 0, {x});
      // Expected by hand from the weights: score[k] = w[M(k+1) - x] where that index is valid.
      std::vector<int> score(static_cast<size_t>(Sel), 0);
      for (int64_t k = 0; k < Sel; ++k) {
        const int64_t i = M * (k + 1) - x;
        if (i >= 0 && i < static_cast<int64_t>(cf.w.size())) score[static_cast<size_t>(k)] = cf.w[static_cast<size_t>(i)];
      }
      std::vector<int32_t> want = iota_k(Sel);
      std::stable_sort(want.begin(), want.end(), [&](int32_t a, int32_t b) { return score[a] > score[b]; });
      for (const Impl& im : impls()) {
        SCOPED_TRACE(im.name);
        EXPECT_EQ(topk_row(cs, run_impl(cs, im), 0), want);
      }
    }
  }
}

// (32, 32, 64): M = 2, N = 1, w = [1, 1], score[k] = P[2k+2] + P[2k+1]: P[0] never counts.
// C = 9, Sel = 5 (block 4 would read P[10], P[9]: always 0).
TEST(ReferenceHand, KPlusOneShift) {
  Case cs = Case::make(DType::kF32, {1}, {9}, 1, 1, 16, 1, 32, 32, 64, 5);
  cs.scale = 1.0;
  const std::vector<std::pair<int64_t, std::vector<int32_t>>> expect = {
      {0, {0, 1, 2, 3, 4}},  // dominant token 0: every score is 0 -> ascending order
      {1, {0, 1, 2, 3, 4}},  // token 1 -> block 0 (2*0+1)
      {2, {0, 1, 2, 3, 4}},  // token 2 -> block 0 (2*0+2)
      {3, {1, 0, 2, 3, 4}},  // token 3 -> block 1
      {6, {2, 0, 1, 3, 4}},  // token 6 -> block 2 (2*2+2)
      {8, {3, 0, 1, 2, 4}},  // token 8 -> block 3 (2*3+2); block 4 can never score
  };
  for (const auto& [x, want] : expect) {
    SCOPED_TRACE("dominant token " + std::to_string(x));
    set_hot_tokens(cs, 0, {x});
    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      EXPECT_EQ(topk_row(cs, run_impl(cs, im), 0), want);
    }
  }
  // Token 0 dominant but not alone: tokens 0 and 5 with P = 1/2 -> block 2 (2*2+1 = 5) first.
  set_hot_tokens(cs, 0, {0, 5});
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    EXPECT_EQ(topk_row(cs, run_impl(cs, im), 0), (std::vector<int32_t>{2, 0, 1, 3, 4}));
  }
}

// A value type that records the expression tree of the additions.
struct Expr {
  std::string s;
  Expr() = default;
  Expr(int zero) : s(std::to_string(zero)) {}  // NOLINT: T(0) of the template
  Expr(std::string x) : s(std::move(x)) {}     // NOLINT
  friend Expr operator+(const Expr& a, const Expr& b) { return Expr("(" + a.s + "+" + b.s + ")"); }
};

std::string tree(int n) {
  std::vector<Expr> v;
  for (int i = 0; i < n; ++i) v.emplace_back(std::string(1, static_cast<char>('a' + i)));
  return nsa::detail::pairwise_group_sum(v.data(), n).s;
}

// §3.6: pairwise over g in order, halving; an odd last element is carried up.
TEST(ReferenceHand, PairwiseGroupSumOrder) {
  EXPECT_EQ(tree(1), "a");
  EXPECT_EQ(tree(2), "(a+b)");
  EXPECT_EQ(tree(3), "((a+b)+c)");
  EXPECT_EQ(tree(4), "((a+b)+(c+d))");
  EXPECT_EQ(tree(5), "(((a+b)+(c+d))+e)");
  EXPECT_EQ(tree(6), "(((a+b)+(c+d))+(e+f))");
  EXPECT_EQ(tree(7), "(((a+b)+(c+d))+((e+f)+g))");
  EXPECT_EQ(tree(8), "(((a+b)+(c+d))+((e+f)+(g+h)))");

  // The same in float, with values where the order changes the result.
  {
    float v[4] = {1e8f, 1.0f, -1e8f, 1.0f};  // (1e8+1) = 1e8, (-1e8+1) = -1e8: total 0 (left to right: 1)
    EXPECT_EQ(nsa::detail::pairwise_group_sum(v, 4), 0.0f);
  }
  {
    float v[3] = {1.0f, 1e8f, -1e8f};  // (1+1e8) - 1e8 = 0 (right to left: 1)
    EXPECT_EQ(nsa::detail::pairwise_group_sum(v, 3), 0.0f);
  }
  {
    float v[5] = {1e8f, 1.0f, -1e8f, 1.0f, 1.0f};  // 0 + 1 (left to right: 2)
    EXPECT_EQ(nsa::detail::pairwise_group_sum(v, 5), 1.0f);
  }
  {
    float v[2] = {0.5f, 0.25f};
    EXPECT_EQ(nsa::detail::pairwise_group_sum(v, 0), 0.0f);
  }
}

// §3.7/§5: forced blocks beat everything, among themselves by index; more forced than K: the
// smallest indices. C = 32, Sel = 8, K = 3; hot token 14 gives block 3 the score w_2 = 2.
TEST(ReferenceHand, ForcedBlocks) {
  Case cs = Case::make(DType::kF32, {6}, {32}, 1, 1, 16, 1, 32, 16, 64, 3);
  cs.scale = 1.0;
  for (int64_t t = 0; t < 6; ++t) set_hot_tokens(cs, t, {14});
  cs.enable_topk_mask();
  const std::vector<std::vector<int>> forced = {{}, {6}, {3}, {6, 2, 5, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {7, 1}};
  const std::vector<std::vector<int32_t>> want = {{3, 0, 1}, {6, 3, 0}, {3, 0, 1}, {2, 5, 6}, {0, 1, 2}, {1, 7, 3}};
  for (int64_t s = 0; s < 6; ++s)
    for (int k : forced[static_cast<size_t>(s)]) cs.topk_at(s, k) = 1;
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    for (int64_t s = 0; s < 6; ++s) EXPECT_EQ(topk_row(cs, r, s), want[static_cast<size_t>(s)]) << "row " << s;
  }
}

// §3.8: equal scores go to the smaller index first. C = 16, Sel = 4, K = 4.
TEST(ReferenceHand, TiesGoToSmallerIndex) {
  Case cs = Case::make(DType::kF32, {2}, {16}, 1, 1, 16, 1, 32, 16, 64, 4);
  cs.scale = 1.0;
  // Row 0: zero keys and query -> uniform P = 1/16: blocks 0..2 score 8/16, block 3 (tokens
  // 16..12, 16 absent) 7/16.
  // Row 1: tokens 6 and 10 with P = 1/2: block 1 (w_2 P6) and block 2 (w_2 P10) tie at 1.
  set_hot_tokens(cs, 1, {6, 10});
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    EXPECT_EQ(topk_row(cs, r, 0), (std::vector<int32_t>{0, 1, 2, 3}));
    EXPECT_EQ(topk_row(cs, r, 1), (std::vector<int32_t>{1, 2, 0, 3}));
    EXPECT_EQ(sum_at(cs, r, 0, 0), 16.0f);
    EXPECT_EQ(sum_at(cs, r, 1, 0), 2.0f);
  }
}

// §4 layout: B = 2, Sq = [3, 2], N1 = 4. Each (t, h) gets its own softmax_max a = 1 + 4t + h:
// C_b = 2 with k_0 = e_0 and k_1 = 0, q[t][h] = a e_0, so S = [a, 0], m = a, l_sum = 1 + e^-a.
TEST(ReferenceHand, StatisticsLayout) {
  Case cs = Case::make(DType::kF32, {3, 2}, {2, 2}, 4, 1, 16, 1, 32, 16, 64, 1);
  cs.scale = 1.0;
  for (int64_t r = 0; r < 4; ++r) cs.set_k(r, 0, 0, r % 2 == 0 ? 1.0 : 0.0);
  for (int64_t t = 0; t < 5; ++t)
    for (int64_t h = 0; h < 4; ++h) cs.set_q(t, h, 0, static_cast<double>(1 + 4 * t + h));
  // Where each value must be, written out from §4: batch 0 at [0, 96) as [h][s][8], batch 1 from 96.
  std::vector<float> want(5 * 4 * 8, 0.0f);
  for (int64_t h = 0; h < 4; ++h) {
    for (int64_t s = 0; s < 3; ++s)
      for (int i = 0; i < 8; ++i) want[static_cast<size_t>((h * 3 + s) * 8 + i)] = static_cast<float>(1 + 4 * s + h);
    for (int64_t s = 0; s < 2; ++s)
      for (int i = 0; i < 8; ++i) want[static_cast<size_t>(96 + (h * 2 + s) * 8 + i)] = static_cast<float>(1 + 4 * (3 + s) + h);
  }
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    // The value of batch 1, s = 0, head 2 (t = 3: a = 15) at float 96 + (2*2 + 0)*8 = 128.
    for (int i = 0; i < 8; ++i) EXPECT_EQ(r.smax[static_cast<size_t>(128 + i)], 15.0f);
    EXPECT_EQ(r.smax, want);
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(r.ssum[i], 1.0 + std::exp(-static_cast<double>(want[i])), 2.5e-7) << "float " << i;
  }
}

// The same with an empty batch in the middle (Sq = [2, 0, 1], N1 = 2): batch 2 starts at float
// 8 * 2 * 2 = 32; the empty batch occupies nothing.
TEST(ReferenceHand, StatisticsLayoutWithEmptyBatch) {
  Case cs = Case::make(DType::kF32, {2, 0, 1}, {2, 3, 2}, 2, 2, 16, 1, 32, 16, 64, 1);
  cs.scale = 1.0;
  const int64_t rows[] = {0, 1, 5, 6};  // first and second key row of batches 0 and 2 (batch 1: rows 2..4)
  for (int64_t n = 0; n < 2; ++n) {
    cs.set_k(rows[0], n, 0, 1.0);
    cs.set_k(rows[2], n, 0, 1.0);
  }
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t h = 0; h < 2; ++h) cs.set_q(t, h, 0, static_cast<double>(1 + 2 * t + h));
  const std::vector<float> want = {1, 1, 1, 1, 1, 1, 1, 1,   // b0 h0 s0: t0 h0
                                   3, 3, 3, 3, 3, 3, 3, 3,   // b0 h0 s1: t1 h0
                                   2, 2, 2, 2, 2, 2, 2, 2,   // b0 h1 s0: t0 h1
                                   4, 4, 4, 4, 4, 4, 4, 4,   // b0 h1 s1: t1 h1
                                   5, 5, 5, 5, 5, 5, 5, 5,   // b2 h0 s0: t2 h0
                                   6, 6, 6, 6, 6, 6, 6, 6};  // b2 h1 s0: t2 h1
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    EXPECT_EQ(run_impl(cs, im).smax, want);
  }
}

// One query row and C = 2 compressed tokens ((l, d, l') = (16, 16, 16), D = 16) with the scores 0 and s1:
// q = e_0, k_0 = 0, k_1 = e_0, scale = s1.
Case two_token_case(DType dt, double s1, int64_t D2, int64_t K) {
  Case cs = Case::make(dt, {1}, {2}, 1, 1, 16, D2, 16, 16, 16, K);
  cs.scale = s1;
  cs.set_q(0, 0, 0, 1.0);
  cs.set_k(1, 0, 0, 1.0);
  return cs;
}

// A 2-token softmax with exact numbers: scores 0 and ln 3 -> P = [1/4, 3/4], l_sum = 4/3.
// v_0 = [1, 0], v_1 = [0, 1] so out = P.
TEST(ReferenceHand, TwoTokenSoftmax) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = two_token_case(dt, std::log(3.0), 2, 2);
    cs.set_v(0, 0, 0, 1.0);
    cs.set_v(1, 0, 1, 1.0);
    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      const Result r = run_impl(cs, im);
      const double tol = dt == DType::kF32 ? 2.5e-7 : 0.0;  // 1/4 and 3/4 are exact in bf16/fp16
      EXPECT_NEAR(out_at(cs, r, 0, 0, 0), 0.25, tol);
      EXPECT_NEAR(out_at(cs, r, 0, 0, 1), 0.75, tol);
      EXPECT_EQ(max_at(cs, r, 0, 0), static_cast<float>(std::log(3.0)));
      EXPECT_NEAR(sum_at(cs, r, 0, 0), 4.0 / 3.0, 2.5e-7);
      // (16, 16, 16): score[k] = P[k+1]: block 0 = 3/4, block 1 = 0 -> [0, 1].
      EXPECT_EQ(topk_row(cs, r, 0), (std::vector<int32_t>{0, 1}));
    }
  }
}

// §3.4: P is rounded to the input dtype before the product. Scores 0 and ln 5 give P = [1/6, 5/6],
// whose roundings go opposite ways and lie far from any rounding boundary:
//   bf16: cast(1/6) = 0.1669921875, cast(5/6) = 0.83203125
//   fp16: cast(1/6) = 0.1666259765625, cast(5/6) = 0.83349609375
// With v = [5, -1] the exact P would give 5/6 - 5/6 = 0; the rounded P give
//   bf16: 5 * 0.1669921875 - 0.83203125 = 0.0029296875 (= 3 * 2^-10)
//   fp16: 5 * 0.1666259765625 - 0.83349609375 = -0.0003662109375 (= -3 * 2^-13)
// Fully masked rows use the same rounding (P = cast(1/C)): C = 3, v = [2, 2, 1]:
//   bf16: 5 * 0.333984375 = 1.669921875 -> bf16 1.671875 (exact P: 5/3 -> 1.6640625)
//   fp16: 5 * 0.333251953125 = 1.666259765625 -> fp16 1.666015625 (exact P: 5/3 -> 1.6669921875)
TEST(ReferenceHand, PRoundedToDtypeBeforePV) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = two_token_case(dt, std::log(5.0), 2, 1);
    cs.set_v(0, 0, 0, 5.0);
    cs.set_v(1, 0, 0, -1.0);
    cs.set_v(0, 0, 1, 1.0);  // column 1: cast(P0) alone
    Case full = Case::make(dt, {1}, {3}, 1, 1, 16, 1, 16, 16, 16, 1);
    const double fv[3] = {2, 2, 1};
    for (int64_t c = 0; c < 3; ++c) full.set_v(c, 0, 0, fv[c]);
    full.enable_atten_mask();
    std::fill(full.atten.begin(), full.atten.end(), 1);
    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      const Result r = run_impl(cs, im), rf = run_impl(full, im);
      if (dt == DType::kBF16) {
        EXPECT_EQ(out_at(cs, r, 0, 0, 0), 0.0029296875);
        EXPECT_EQ(out_at(cs, r, 0, 0, 1), 0.1669921875);
        EXPECT_EQ(out_at(full, rf, 0, 0, 0), 1.671875);
      } else if (dt == DType::kF16) {
        EXPECT_EQ(out_at(cs, r, 0, 0, 0), -0.0003662109375);
        EXPECT_EQ(out_at(cs, r, 0, 0, 1), 0.1666259765625);
        EXPECT_EQ(out_at(full, rf, 0, 0, 0), 1.666015625);
      } else {
        EXPECT_NEAR(out_at(cs, r, 0, 0, 0), 0.0, 1e-6);
        EXPECT_NEAR(out_at(cs, r, 0, 0, 1), 1.0 / 6.0, 1e-7);
        EXPECT_NEAR(out_at(full, rf, 0, 0, 0), 5.0 / 3.0, 4e-7);
      }
    }
  }
}

// §3.4: the output is rounded to nearest EVEN. Two tokens with equal scores (P = 1/2 each, exact)
// and values whose mean lies exactly halfway between two representable numbers:
//   bf16 (8 bits): mean(258, 256) = 257 -> 256;  mean(260, 258) = 259 -> 260;  -257 -> -256
//   fp16 (11 bits): mean(2050, 2048) = 2049 -> 2048;  mean(2052, 2050) = 2051 -> 2052;  -2049 -> -2048
TEST(ReferenceHand, OutputRoundingTiesToEven) {
  struct Cfg {
    DType dt;
    double a[3], b[3], want[3];
  };
  const Cfg cfgs[] = {{DType::kBF16, {258, 260, -258}, {256, 258, -256}, {256, 260, -256}},
                      {DType::kF16, {2050, 2052, -2050}, {2048, 2050, -2048}, {2048, 2052, -2048}}};
  for (const Cfg& cf : cfgs) {
    SCOPED_TRACE(nsa::dtype_name(cf.dt));
    Case cs = Case::make(cf.dt, {1}, {2}, 1, 1, 16, 3, 16, 16, 16, 1);
    for (int j = 0; j < 3; ++j) {
      cs.set_v(0, 0, j, cf.a[j]);
      cs.set_v(1, 0, j, cf.b[j]);
      ASSERT_EQ(cs.v[cs.vi(0, 0, j)], cf.a[j]);  // the inputs themselves are representable
    }
    for (const Impl& im : impls()) {
      SCOPED_TRACE(im.name);
      const Result r = run_impl(cs, im);
      for (int j = 0; j < 3; ++j) EXPECT_EQ(out_at(cs, r, 0, 0, j), cf.want[j]) << "column " << j;
    }
  }
}

// §3.1: the dot product accumulates in fp32 and the scale multiplies the fp32 result.
// bf16 q = [256, 1, 1], k = [1, 1, 1]: fp32 dot = 258 (bf16 accumulation would give 256);
// q = [3], scale 0.1: S = 3.0f * 0.1f (folding the scale into bf16 q would give 0.30078125).
TEST(ReferenceHand, DotProductInFp32ScaleAfter) {
  Case cs = Case::make(DType::kBF16, {2}, {1}, 1, 1, 16, 1, 16, 16, 16, 1);
  cs.scale = 1.0;
  for (int j = 0; j < 3; ++j) {
    cs.set_q(0, 0, j, j == 0 ? 256.0 : 1.0);
    cs.set_k(0, 0, j, 1.0);
  }
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    EXPECT_EQ(max_at(cs, r, 0, 0), 258.0f);
    EXPECT_EQ(sum_at(cs, r, 0, 0), 1.0f);
  }
  Case c2 = Case::make(DType::kBF16, {1}, {1}, 1, 1, 16, 1, 16, 16, 16, 1);
  c2.scale = 0.1;
  c2.set_q(0, 0, 0, 3.0);
  c2.set_k(0, 0, 0, 1.0);
  volatile float three = 3.0f, tenth = 0.1f;
  const float want = three * tenth;
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    EXPECT_EQ(max_at(c2, run_impl(c2, im), 0, 0), want);
  }
}

// §3.2/§5: a masked score is replaced by -FLT_MAX (not -inf, not added). Row 0 masks every token
// although the raw scores are [0, -1e32, 1e32] (an addition would overflow to -inf and give NaN):
// P = 1/3, out = mean of V, softmax_max = -FLT_MAX, softmax_sum = 3. Row 1 masks only token 2
// (the largest raw score): P = [1, 0, 0] since -1e32 underflows, out = v_0, m = 0, l_sum = 1.
// (16,16,16): score[k] = P[k+1]: row 0 -> [1/3, 1/3, 0] -> [0, 1, 2]; row 1 -> all 0 -> [0, 1, 2].
TEST(ReferenceHand, MaskedScoresAreReplaced) {
  Case cs = Case::make(DType::kF32, {2}, {3}, 1, 1, 16, 2, 16, 16, 16, 3);
  cs.scale = 1.0;
  for (int64_t t = 0; t < 2; ++t) cs.set_q(t, 0, 0, 1e16);
  cs.set_k(1, 0, 0, -1e16);
  cs.set_k(2, 0, 0, 1e16);
  const double vv[3][2] = {{3, -6}, {6, 0}, {-3, 12}};
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t j = 0; j < 2; ++j) cs.set_v(c, 0, j, vv[c][j]);
  cs.enable_atten_mask();
  for (int64_t c = 0; c < 3; ++c) cs.atten_at(0, c) = 1;
  cs.atten_at(1, 2) = 1;
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    EXPECT_EQ(max_at(cs, r, 0, 0), -FLT_MAX);
    EXPECT_EQ(sum_at(cs, r, 0, 0), 3.0f);
    EXPECT_NEAR(out_at(cs, r, 0, 0, 0), 2.0, 2e-6);  // (3 + 6 - 3) / 3
    EXPECT_NEAR(out_at(cs, r, 0, 0, 1), 2.0, 2e-6);  // (-6 + 0 + 12) / 3
    EXPECT_EQ(topk_row(cs, r, 0), (std::vector<int32_t>{0, 1, 2}));
    EXPECT_EQ(max_at(cs, r, 1, 0), 0.0f);
    EXPECT_EQ(sum_at(cs, r, 1, 0), 1.0f);
    EXPECT_EQ(out_at(cs, r, 1, 0, 0), 3.0);
    EXPECT_EQ(out_at(cs, r, 1, 0, 1), -6.0);
    EXPECT_EQ(topk_row(cs, r, 1), (std::vector<int32_t>{0, 1, 2}));
  }
}

// §3.2/§3.3 taken literally when unmasked scores overflow: fp32 q.k = 1e20 * -1e20 = -inf for
// tokens 1 and 2, token 0 is masked (-FLT_MAX). The row maximum is then the masked -FLT_MAX, so
// P = [exp(0), exp(-inf), exp(-inf)] / 1 = [1, 0, 0]: out = v_0, softmax_max = -FLT_MAX,
// softmax_sum = 1 (the row is not "fully masked"; §5's closed form does not apply).
TEST(ReferenceHand, OverflowedScoresBelowTheMaskValue) {
  Case cs = Case::make(DType::kF32, {1}, {3}, 1, 1, 16, 1, 16, 16, 16, 3);
  cs.scale = 1.0;
  cs.set_q(0, 0, 0, 1e20);
  cs.set_k(1, 0, 0, -1e20);
  cs.set_k(2, 0, 0, -1e20);
  for (int64_t c = 0; c < 3; ++c) cs.set_v(c, 0, 0, 5.0 + c);
  cs.enable_atten_mask();
  cs.atten_at(0, 0) = 1;
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    EXPECT_EQ(max_at(cs, r, 0, 0), -FLT_MAX);
    EXPECT_EQ(sum_at(cs, r, 0, 0), 1.0f);
    EXPECT_EQ(out_at(cs, r, 0, 0, 0), 5.0);
    // (16,16,16): score[k] = P[k+1] = 0 for every block -> [0, 1, 2].
    EXPECT_EQ(topk_row(cs, r, 0), (std::vector<int32_t>{0, 1, 2}));
  }
  // The same with many masked tokens: C = 40, tokens 0..31 masked, 32..39 overflow to -inf. Then
  // P = 1/32 on the masked tokens 0..31 and 0 elsewhere: out = mean(v_0..v_31) = mean(0..31) = 15.5,
  // softmax_max = -FLT_MAX, softmax_sum = 32. (32,16,64): blocks 0..6 score 8/32, block 7 (tokens
  // 32..28) 7/32, blocks 8, 9 zero -> [0, 1, ..., 9] with K = 10.
  Case many = Case::make(DType::kF32, {1}, {40}, 1, 1, 16, 1, 32, 16, 64, 10);
  many.scale = 1.0;
  many.set_q(0, 0, 0, 1e20);
  for (int64_t c = 0; c < 40; ++c) {
    many.set_k(c, 0, 0, -1e20);
    many.set_v(c, 0, 0, static_cast<double>(c));
  }
  many.enable_atten_mask();
  for (int64_t c = 0; c < 32; ++c) many.atten_at(0, c) = 1;
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name + " (C = 40)");
    const Result r = run_impl(many, im);
    EXPECT_EQ(max_at(many, r, 0, 0), -FLT_MAX);
    EXPECT_EQ(sum_at(many, r, 0, 0), 32.0f);
    EXPECT_EQ(out_at(many, r, 0, 0, 0), 15.5);  // sum_c c / 32: exact
    EXPECT_EQ(topk_row(many, r, 0), iota_k(10));
  }
}

// §2: query head h reads KV head h / G. N1 = 4, N2 = 2 (G = 2): KV head n has the single token
// value n + 1 (C = 1, P = 1), so out[h] = h / 2 + 1. Batches index their own key rows: batch 1's
// value rows hold 10 + n.
TEST(ReferenceHand, HeadGroupsAndBatchRows) {
  Case cs = Case::make(DType::kF32, {1, 2}, {1, 1}, 4, 2, 16, 1, 16, 16, 16, 1);
  for (int64_t n = 0; n < 2; ++n) {
    cs.set_v(0, n, 0, 1.0 + n);
    cs.set_v(1, n, 0, 10.0 + n);
  }
  for (const Impl& im : impls()) {
    SCOPED_TRACE(im.name);
    const Result r = run_impl(cs, im);
    for (int64_t h = 0; h < 4; ++h) {
      EXPECT_EQ(out_at(cs, r, 0, h, 0), 1.0 + h / 2);
      EXPECT_EQ(out_at(cs, r, 1, h, 0), 10.0 + h / 2);
      EXPECT_EQ(out_at(cs, r, 2, h, 0), 10.0 + h / 2);
    }
  }
}

}  // namespace
}  // namespace nsa_test
