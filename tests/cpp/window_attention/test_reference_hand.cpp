// The reference of docs/spec/window_attention.md on cases worked out by hand (§10's examples, §5's statistics layout,
// §6's rows without a visible key, rha ties), and the CPU backend on the same cases on every ISA this host runs.
#include <cfloat>
#include <string>
#include <vector>

#include "wa_util.h"

namespace wa_test {
namespace {

// One-hot values: v[j][e] = (e == j), query 0 (every score 0, P uniform over the visible keys): attention_out row i
// is the indicator of its visible set divided by its size, so the visible sets can be read off the output.
WCase one_hot_case(DType dt, int64_t sq, int64_t skv) {
  WCase c = WCase::make(dt, {sq}, {skv}, 1, 1, 4, skv > 4 ? 4 : skv);
  c.D = skv;
  c.Dv = skv;
  c.resize();
  for (int64_t j = 0; j < skv; ++j)
    for (int64_t d = 0; d < skv; ++d) {
      c.k[c.ki(j, 0, d)] = d == j ? 1.0 : 0.0;
      c.v[c.vi(j, 0, d)] = d == j ? 1.0 : 0.0;
    }
  return c;
}

// Row i of the output must be 1/|sees[i]| on sees[i] and 0 elsewhere (fp32: P = 1/n rounded once), m = 0, l = n.
void expect_sees(const WCase& c, const FwdResult& r, const std::vector<std::vector<int64_t>>& sees) {
  ASSERT_TRUE(r.status.ok()) << r.status.message();
  for (int64_t i = 0; i < static_cast<int64_t>(sees.size()); ++i) {
    const auto& s = sees[static_cast<size_t>(i)];
    const float p = 1.0f / static_cast<float>(s.size());
    for (int64_t e = 0; e < c.Dv; ++e) {
      const bool in = std::find(s.begin(), s.end(), e) != s.end();
      EXPECT_EQ(r.out[c.oi(i, 0, e)], in ? static_cast<double>(p) : 0.0) << "row " << i << " key " << e;
    }
    EXPECT_EQ(r.smax[static_cast<size_t>(stat_index(c, i, 0))], 0.0f) << "row " << i;
    EXPECT_EQ(r.ssum[static_cast<size_t>(stat_index(c, i, 0))], static_cast<float>(s.size())) << "row " << i;
  }
}

void expect_sees_everywhere(const WCase& c, const std::vector<std::vector<int64_t>>& sees) {
  {
    SCOPED_TRACE("reference");
    expect_sees(c, run_forward(c, Fwd::kReference), sees);
  }
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(std::string("cpu isa=") + nsa::cpu_isa_name(isa));
    expect_sees(c, run_forward(c, Fwd::kCpu, static_cast<int>(isa)), sees);
  }
}

TEST(WindowHand, WorkedExampleWindow3) {
  // §10: one sequence of 5 tokens, window 3 (sparse_mode 4, pre 2, next 0).
  const std::vector<std::vector<int64_t>> sees = {{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}};
  WCase c = one_hot_case(DType::kF32, 5, 5);
  c.band(4, 2, 0);
  c.compressed_mask();
  expect_sees_everywhere(c, sees);
  c.mask_kind = MaskKind::kImplied;  // the same without a mask tensor
  expect_sees_everywhere(c, sees);
  c.layout = StatsLayout::kTnd;
  expect_sees_everywhere(c, sees);
}

TEST(WindowHand, UnequalLengthsTable) {
  // §10: Sq = 2, Skv = 5 (o = 3).
  WCase c = one_hot_case(DType::kF32, 2, 5);
  c.compressed_mask();
  c.band(2);
  expect_sees_everywhere(c, {{0}, {0, 1}});
  c.band(3);
  expect_sees_everywhere(c, {{0, 1, 2, 3}, {0, 1, 2, 3, 4}});
  c.band(4, 1, 0);
  expect_sees_everywhere(c, {{2, 3}, {3, 4}});
  c.band(0, 1, 0);
  c.explicit_mask();  // all zero, [maxSq, maxSkv] = [2, 5]
  expect_sees_everywhere(c, {{0}, {0, 1}});
  c.band(1);  // allMask: the mask alone
  expect_sees_everywhere(c, {{0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}});
  c.mask_at(0, 0) = 1;
  c.mask_at(1, 4) = 1;
  expect_sees_everywhere(c, {{1, 2, 3, 4}, {0, 1, 2, 3}});
}

TEST(WindowHand, NoMaskSeesEverythingWhateverTheMode) {
  // §4: without atten_mask the mode, pre_tockens and next_tockens have no effect.
  WCase c = one_hot_case(DType::kF32, 2, 5);
  for (int64_t mode : {0, 1, 2, 3, 4}) {
    SCOPED_TRACE("mode " + std::to_string(mode));
    c.band(mode, mode == 0 ? kNoLimit : 1, 0);
    expect_sees_everywhere(c, {{0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}});
  }
}

TEST(WindowHand, FirstRowsWithoutKeysAreAnError) {
  // §10: Sq = 5, Skv = 2 in mode 4 with next_tockens = 0 (5 - 0 > 2).
  WCase c = one_hot_case(DType::kF32, 5, 2);
  c.band(4, 1, 0);
  c.compressed_mask();
  const FwdResult r = run_forward(c, Fwd::kReference);
  ASSERT_FALSE(r.status.ok());
  EXPECT_NE(r.status.message().find("next_tockens"), std::string::npos) << r.status.message();
  c.band(4, 1, 3);  // with next = 3 the first row sees key 0: accepted
  EXPECT_TRUE(run_forward(c, Fwd::kReference).status.ok());
}

TEST(WindowHand, Numels) {
  // §10: N1 = 4 with [3, 5] twice gives 4 (3*3 + 2*2) = 52; N1 = 1 with [2, 5, 9, 0, 0] twice gives 110.
  const std::vector<int64_t> a = {3, 5}, b = {2, 5, 9, 0, 0};
  EXPECT_EQ(nsa::window_attention_numels(4, {a.data(), 2}, {a.data(), 2}), 52);
  EXPECT_EQ(nsa::window_attention_numels(1, {b.data(), 5}, {b.data(), 5}), 110);
}

TEST(WindowHand, StatisticsLayoutExample) {
  // §5: B = 2, Sq = [3, 2], N1 = 4: (row 3, head 2) is at float 128 per batch and at 112 with "TND".
  const nsa::window_detail::WBatch b1{3, 2, 3, 2};
  EXPECT_EQ(nsa::window_detail::stat_offset(StatsLayout::kPerBatch, 4, b1, 2, 0), 128);
  EXPECT_EQ(nsa::window_detail::stat_offset(StatsLayout::kTnd, 4, b1, 2, 0), 112);
  WCase c = WCase::make(DType::kF32, {3, 2}, {3, 2}, 4, 2, 8, 8);
  c.fill_uniform(3);
  const FwdResult per = run_forward(c, Fwd::kReference);
  c.layout = StatsLayout::kTnd;
  const FwdResult tnd = run_forward(c, Fwd::kReference);
  ASSERT_TRUE(per.status.ok() && tnd.status.ok());
  EXPECT_EQ(per.smax[128], tnd.smax[112]);
  EXPECT_EQ(per.ssum[128], tnd.ssum[112]);
  const Model md = make_model(c);
  EXPECT_NEAR(per.smax[128], md.m[3 * 4 + 2], 1e-6);
  for (int64_t t = 0; t < 5; ++t)
    for (int64_t h = 0; h < 4; ++h) {
      c.layout = StatsLayout::kPerBatch;
      const int64_t a = stat_index(c, t, h);
      c.layout = StatsLayout::kTnd;
      const int64_t b = stat_index(c, t, h);
      EXPECT_EQ(per.smax[static_cast<size_t>(a)], tnd.smax[static_cast<size_t>(b)]);
      EXPECT_EQ(per.ssum[static_cast<size_t>(a)], tnd.ssum[static_cast<size_t>(b)]);
    }
}

TEST(WindowHand, RowsWithoutVisibleKey) {
  // §6, bf16, Skv = 3, row 0 fully masked by the explicit mask (mode 1): inner_precise 0/1 give
  // rha(sum_j rha(1/3) v_j) with rha(1/3) = 0.333984375 (bf16 0x3EAB): v = 1, 2, 3 gives 2.00390625 -> 2.0;
  // inner_precise 2 gives 0 with softmax_sum = FLT_MAX. Row 1 sees key 1 only: its output is v_1.
  WCase c = WCase::make(DType::kBF16, {2}, {3}, 1, 1, 2, 1);
  c.band(1);
  c.explicit_mask();
  for (int64_t j = 0; j < 3; ++j) {
    c.mask_at(0, j) = 1;
    c.mask_at(1, j) = j != 1;
    c.v[c.vi(j, 0, 0)] = static_cast<double>(j + 1);
    c.k[c.ki(j, 0, 0)] = 0.5;
  }
  c.q[c.qi(0, 0, 0)] = 1.0;
  c.q[c.qi(1, 0, 0)] = 1.0;
  for (int64_t ip : {0, 1, 2}) {
    SCOPED_TRACE("inner_precise " + std::to_string(ip));
    c.inner_precise = ip;
    std::vector<FwdResult> runs = {run_forward(c, Fwd::kReference)};
    for (CpuIsa isa : supported_isas()) runs.push_back(run_forward(c, Fwd::kCpu, static_cast<int>(isa)));
    for (const FwdResult& r : runs) {
      ASSERT_TRUE(r.status.ok()) << r.status.message();
      EXPECT_EQ(r.out[0], ip == 2 ? 0.0 : 2.0);
      EXPECT_EQ(r.smax[0], -FLT_MAX);
      EXPECT_EQ(r.ssum[0], ip == 2 ? FLT_MAX : 3.0f);
      EXPECT_EQ(r.out[1], 2.0);
      EXPECT_EQ(r.smax[8], 0.5f * static_cast<float>(c.scale));
      EXPECT_EQ(r.ssum[8], 1.0f);
    }
  }
}

TEST(WindowHand, OutputRoundsTiesAwayFromZero) {
  // §5 step 4: rha_T. bf16: row 1 of a causal call averages v = 256 and 258 (P = 1/2 exactly): 257 is the tie
  // between 256 and 258 -> 258 (nearest-even would give 256). fp16: 2048 and 2050 -> 2049 -> 2050. Negative:
  // -256 and -258 -> -258.
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    const double a = dt == DType::kBF16 ? 256 : 2048, b = a + 2;
    WCase c = WCase::make(dt, {2}, {2}, 1, 1, 2, 2);
    c.band(2);
    c.compressed_mask();
    c.v = {a, -a, b, -b};
    std::vector<FwdResult> runs = {run_forward(c, Fwd::kReference)};
    for (CpuIsa isa : supported_isas()) runs.push_back(run_forward(c, Fwd::kCpu, static_cast<int>(isa)));
    for (const FwdResult& r : runs) {
      ASSERT_TRUE(r.status.ok()) << r.status.message();
      EXPECT_EQ(r.out[0], a);
      EXPECT_EQ(r.out[1], -a);
      EXPECT_EQ(r.out[2], b);
      EXPECT_EQ(r.out[3], -b);
    }
  }
}

TEST(WindowHand, RhaHelpers) {
  using nsa::window_detail::f32_to_bf16_rha;
  using nsa::window_detail::f32_to_f16_rha;
  EXPECT_EQ(f32_to_bf16_rha(257.0f), 0x4381);   // 258
  EXPECT_EQ(f32_to_bf16_rha(-257.0f), 0xC381);  // -258
  EXPECT_EQ(f32_to_bf16_rha(256.5f), 0x4380);   // below the tie: 256
  EXPECT_EQ(f32_to_f16_rha(2049.0f), 0x6801);   // 2050
  EXPECT_EQ(f32_to_f16_rha(65520.0f), 0x7C00);  // inf
  EXPECT_EQ(f32_to_f16_rha(65519.0f), 0x7BFF);  // 65504
  EXPECT_EQ(f32_to_f16_rha(1.5f * 5.9604645e-8f), 0x0002);  // subnormal tie 1.5 * 2^-24 -> 2 * 2^-24
  EXPECT_EQ(f32_to_f16_rha(-2.5f * 5.9604645e-8f), 0x8003);
  EXPECT_EQ(f32_to_f16_rha(1023.5f * 5.9604645e-8f), 0x0400);  // rounds up to the smallest normal
  EXPECT_EQ(f32_to_f16_rha(std::numeric_limits<float>::quiet_NaN()) & 0x7e00, 0x7e00);
  EXPECT_EQ(f32_to_bf16_rha(std::numeric_limits<float>::infinity()), 0x7F80);
  // every fp32 value that is not a tie rounds like the nearest-even conversions
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; ++i) {
    float x = u(rng) * (i % 3 == 0 ? 1e-6f : 1.0f);
    if (i % 7 == 0) x *= 1e-3f;
    const uint16_t a = f32_to_bf16_rha(x), b = nsa::detail::f32_to_bf16(x);
    const uint16_t c = f32_to_f16_rha(x), d = nsa::detail::f32_to_f16(x);
    const bool bf_tie = (nsa::detail::f32_bits(x) & 0xffff) == 0x8000;
    if (!bf_tie) {
      EXPECT_EQ(a, b) << x;
    }
    if (c != d) {  // only on an exact fp16 tie, where rha goes away from zero: one step in magnitude
      EXPECT_EQ((c & 0x7fff), (d & 0x7fff) + 1) << x;
      const double lo = nsa::detail::f16_to_f32(d), hi = nsa::detail::f16_to_f32(c);
      EXPECT_EQ(static_cast<double>(x) - lo, hi - static_cast<double>(x)) << x;
    }
  }
}


TEST(WindowHand, RhaRowStoresAgreeOnEveryIsa) {
  // the vectorized row stores of the CPU backend equal the scalar rha bit for bit: random values over the whole
  // range, ties, subnormal results, overflow, inf, NaN, signed zeros; odd lengths for the vector tails
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> x(1037);
  for (size_t i = 0; i < x.size(); ++i) x[i] = nsa::detail::bits_f32(bits(rng));
  const float special[] = {0.0f, -0.0f, 257.0f, -257.0f, 2049.0f, 65520.0f, 65519.0f, 1.5f * 5.9604645e-8f,
                           1e-40f, -3e-39f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                           1.0000001f, 3.4028235e38f};
  for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); ++i) x[i * 7] = special[i];
  for (size_t i = 200; i < 600; ++i) x[i] = std::ldexp(x[i] == x[i] ? std::fmod(x[i], 1.0f) : 0.5f, -14 - int(i % 12));
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t n : {int64_t(1037), int64_t(16), int64_t(5)}) {
      std::vector<uint8_t> want(static_cast<size_t>(n) * 4), got(want.size());
      nsa::window_detail::store_row_rha(x.data(), want.data(), n, dt);
      for (CpuIsa isa : supported_isas()) {
        std::fill(got.begin(), got.end(), 0xAB);
        nsa::window_cpu::store_rha(x.data(), got.data(), n, dt, isa);
        EXPECT_EQ(0, std::memcmp(want.data(), got.data(), static_cast<size_t>(n) * nsa::dtype_size(dt)))
            << nsa::dtype_name(dt) << " n=" << n << " isa=" << nsa::cpu_isa_name(isa);
      }
    }
  }
}
}  // namespace
}  // namespace wa_test
