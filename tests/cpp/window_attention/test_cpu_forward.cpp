// window_attention_cpu against the fp64 model of docs/spec/window_attention.md (wa_util.h: an independent dense
// model; the tolerance rule of §10), on EVERY CpuIsa path this host runs:
//   - every sparse_mode, windows of 1, small and larger than the sequence, Sq != Skv, varlen with empty and
//     trailing zero batches, G = 1 and G > 1, D != Dv (odd too), rows without a visible key under inner_precise
//     0/1/2, both statistics layouts, strided inputs and masks, all dtypes;
//   - the chunked (two-pass) path of long spans, through small Tuning values;
//   - small-integer inputs with equal scores and power-of-two visible counts: bitwise equal to the reference;
//   - determinism: bitwise equal over thread counts 1, 2, 3, 7 and over strip sizes.
#include <string>
#include <vector>

#include "wa_util.h"

namespace wa_test {
namespace {

// The reference's own fp64 model against the independent one, then every ISA path against the rule.
void check_cpu(const WCase& c, const nsa::window_cpu::Tuning* tu = nullptr) {
  SCOPED_TRACE(c.describe());
  const Oracle o = make_oracle(c);
  ASSERT_TRUE(o.model.status.ok()) << o.model.status.message();
  ASSERT_TRUE(o.plain.status.ok()) << o.plain.status.message();
  EXPECT_TRUE(check_complete(c, o.model));
  for (size_t i = 0; i < o.md.out.size(); ++i)
    ASSERT_LE(std::fabs(o.model.out[i] - o.md.out[i]), ulp_of(c.dtype, o.md.out[i])) << "reference fp64 at " << i;
  EXPECT_TRUE(check_stats(c, o.model, o.md)) << "(reference fp64)";
  EXPECT_TRUE(check_stats(c, o.plain, o.md)) << "(reference fp32)";
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(std::string("cpu_isa=") + nsa::cpu_isa_name(isa));
    EXPECT_TRUE(check_forward(c, o, run_forward(c, Fwd::kCpu, static_cast<int>(isa), 0, tu)));
  }
}

// A varlen case: batches of different lengths including an empty one in the middle and trailing zero batches.
WCase varlen(DType dt, std::vector<int64_t> sq, std::vector<int64_t> skv, int64_t N1, int64_t N2, int64_t D, int64_t Dv,
             uint64_t seed, int trailing = 0) {
  WCase c = WCase::make(dt, std::move(sq), std::move(skv), N1, N2, D, Dv);
  for (int i = 0; i < trailing; ++i) {
    c.qlist.push_back(0);
    c.kvlist.push_back(0);
  }
  c.extra_kv_rows = 3;
  c.resize();
  c.fill_uniform(seed, -2, 2);
  return c;
}

const DType kDtypes[] = {DType::kBF16, DType::kF16, DType::kF32, DType::kF64};

TEST(WindowCpu, BandMode4Windows) {
  for (DType dt : kDtypes)
    for (auto [pre, next] : std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {5, 0}, {200, 0}, {3, 2}, {6, -2}}) {
      SCOPED_TRACE("pre " + std::to_string(pre) + " next " + std::to_string(next));
      // next < 0 needs Sq_b - next <= Skv_b: two more keys than queries there
      WCase c = next < 0 ? varlen(dt, {37, 0, 70, 9}, {39, 4, 72, 12}, 4, 2, 24, 16, 10 + pre, 2)
                         : varlen(dt, {37, 0, 70, 9}, {37, 4, 70, 12}, 4, 2, 24, 16, 10 + pre, 2);
      c.band(4, pre, next);
      c.compressed_mask();
      check_cpu(c);
    }
}

TEST(WindowCpu, CausalModesAndUnequalLengths) {
  for (DType dt : kDtypes) {
    WCase c = varlen(dt, {20, 0, 45, 7}, {33, 5, 45, 7}, 4, 1, 16, 16, 21);
    c.compressed_mask();
    c.band(2);
    check_cpu(c);
    c.band(3);
    check_cpu(c);
    c.band(4, 9, 1);  // bottom-right anchored band with Sq < Skv
    check_cpu(c);
    WCase d = varlen(dt, {30, 12}, {18, 12}, 2, 2, 8, 8, 22);  // mode 2 with Sq > Skv
    d.compressed_mask();
    d.band(2);
    check_cpu(d);
    d.mask_kind = MaskKind::kImplied;
    d.layout = StatsLayout::kTnd;
    check_cpu(d);
  }
}

TEST(WindowCpu, ExplicitMasksAndRowsWithoutKeys) {
  for (DType dt : kDtypes)
    for (int64_t ip : {0, 1, 2}) {
      SCOPED_TRACE("inner_precise " + std::to_string(ip));
      WCase c = varlen(dt, {13, 0, 29}, {17, 3, 26}, 4, 2, 24, 8, 30 + ip, 1);
      c.inner_precise = ip;
      c.band(1);
      c.random_mask(40 + ip, 0.3, 0.2);
      check_cpu(c);
      c.band(0, 4, 2);  // mask and band
      c.layout = StatsLayout::kTnd;
      check_cpu(c);
      c.band(0, 100, 100);  // unrestricted band: the mask alone
      check_cpu(c);
    }
}

TEST(WindowCpu, NoMaskSeesEverything) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    WCase c = varlen(dt, {19, 40}, {25, 31}, 4, 2, 16, 16, 50);
    c.band(4, 2, 10);  // no effect without atten_mask (§4)
    check_cpu(c);
  }
}

TEST(WindowCpu, GroupSizesAndHeadDims) {
  for (int64_t G : {1, 3, 8, 16, 70}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    WCase c = varlen(DType::kBF16, {23, 41}, {23, 41}, 2 * G, 2, 16, 8, 60 + G);
    if (G == 70) c = varlen(DType::kBF16, {9, 5}, {9, 5}, G, 1, 16, 8, 60 + G);
    c.band(4, 7, 0);
    c.mask_kind = MaskKind::kImplied;
    check_cpu(c);
  }
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (auto [D, Dv] : std::vector<std::pair<int64_t, int64_t>>{{13, 7}, {1, 1}, {72, 65}, {130, 3}}) {
      SCOPED_TRACE("D=" + std::to_string(D) + " Dv=" + std::to_string(Dv));
      WCase c = varlen(dt, {18, 30}, {18, 30}, 2, 1, D, Dv, 70 + D);
      c.band(3);
      c.compressed_mask();
      check_cpu(c);
    }
}

TEST(WindowCpu, StridedInputsAndMasks) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    WCase c = varlen(dt, {21, 14}, {25, 14}, 4, 2, 20, 12, 80);
    c.q_layout.order = {1, 0, 2};
    c.q_layout.pad = {1, 2, 3};
    c.k_layout.step = 2;
    c.k_layout.order = {0, 2, 1};
    c.v_layout.order = {2, 1, 0};
    c.band(0, 3, 1);
    c.random_mask(81, 0.2, 0.1);
    c.mask_transposed = true;
    check_cpu(c);
    c.band(4, 5, 0);
    c.compressed_mask();
    c.mask_transposed = true;
    check_cpu(c);
  }
  // stride 0 along the head dim of key/value (one KV head: constant along it)
  WCase z = varlen(DType::kBF16, {16}, {16}, 4, 1, 16, 16, 82);
  z.k_layout.zero_dim = 1;
  z.v_layout.zero_dim = 1;
  z.band(2);
  z.compressed_mask();
  check_cpu(z);
}

TEST(WindowCpu, ChunkedPathOfLongSpans) {
  // chunk_keys = 64 with tiles of 16 rows: causal and full rows span several chunks (two-pass softmax), with
  // strips of a few tiles; and rows without keys inside such strips.
  nsa::window_cpu::Tuning tu;
  tu.tile_rows = 16;
  tu.chunk_keys = 64;
  tu.strip_rows = 40;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    WCase c = varlen(dt, {150, 0, 97}, {170, 10, 97}, 4, 2, 16, 16, 90, 1);
    c.band(3);
    c.compressed_mask();
    check_cpu(c, &tu);
    c.band(4, 120, 3);  // wide band: first tiles single, later ones chunked
    check_cpu(c, &tu);
    c.band(1);
    c.random_mask(91, 0.3, 0.1);
    c.inner_precise = 2;
    check_cpu(c, &tu);
    c.mask_kind = MaskKind::kNone;  // full attention
    check_cpu(c, &tu);
  }
}

// Equal scores in every row (all keys of a batch equal) and power-of-two visible counts: P = 1/2^k exactly, so every
// rounding is exact and every backend must agree bit for bit (§10), including the rha of ties.
TEST(WindowCpu, SmallIntegersBitwise) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    WCase c = varlen(dt, {8, 0, 16}, {11, 2, 19}, 4, 2, 12, 8, 0);
    c.fill_ints(95, -6, 6);
    for (int64_t r = 0; r < c.kv_end(); ++r)
      for (int64_t n = 0; n < c.N2; ++n)
        for (int64_t d = 0; d < c.D; ++d) c.k[c.ki(r, n, d)] = static_cast<double>(d % 3 - 1);
    for (int64_t r = 0; r < c.kv_end(); ++r)  // values near 256: sums of two give rha ties in bf16
      for (int64_t n = 0; n < c.N2; ++n)
        for (int64_t e = 0; e < c.Dv; ++e) c.v[c.vi(r, n, e)] = round_to(dt, 256.0 + 2.0 * ((r * 7 + e) % 5));
    c.band(4, 3, 0);  // o = 3: every row sees exactly 4 keys
    c.compressed_mask();
    const FwdResult ref = run_forward(c, Fwd::kReference);
    ASSERT_TRUE(ref.status.ok());
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " " + nsa::cpu_isa_name(isa));
      EXPECT_TRUE(bitwise_equal(ref, run_forward(c, Fwd::kCpu, static_cast<int>(isa))));
    }
    c.band(1);  // explicit mask: 2 visible keys per row
    c.explicit_mask();
    for (int64_t i = 0; i < c.mask_rows; ++i)
      for (int64_t j = 0; j < c.mask_cols; ++j) c.mask_at(i, j) = !(j == i % 2 || j == 2);
    const FwdResult ref2 = run_forward(c, Fwd::kReference);
    for (CpuIsa isa : supported_isas()) EXPECT_TRUE(bitwise_equal(ref2, run_forward(c, Fwd::kCpu, static_cast<int>(isa))));
  }
}

TEST(WindowCpu, ThreadCountsAndStripsBitwise) {
  nsa::window_cpu::Tuning small;
  small.strip_tokens = 8;
  nsa::window_cpu::Tuning chunked;
  chunked.tile_rows = 16;
  chunked.chunk_keys = 64;
  chunked.strip_rows = 32;
  nsa::window_cpu::Tuning chunked2 = chunked;
  chunked2.strip_rows = 16;
  chunked2.strip_tokens = 4;
  for (DType dt : {DType::kBF16, DType::kF32}) {
    WCase c = varlen(dt, {90, 0, 61, 33}, {90, 6, 80, 33}, 8, 2, 32, 16, 100, 1);
    c.band(4, 17, 0);
    c.compressed_mask();
    for (const nsa::window_cpu::Tuning* tu : std::vector<const nsa::window_cpu::Tuning*>{nullptr, &small}) {
      const FwdResult base = run_forward(c, Fwd::kCpu, -1, 1, tu);
      for (int threads : {2, 3, 7}) EXPECT_TRUE(bitwise_equal(base, run_forward(c, Fwd::kCpu, -1, threads, tu)));
      EXPECT_TRUE(bitwise_equal(base, run_forward(c, Fwd::kCpu, -1, 1)));  // strips never change a result
    }
    c.band(2);
    const FwdResult base = run_forward(c, Fwd::kCpu, -1, 1, &chunked);
    for (int threads : {2, 3, 7}) {
      EXPECT_TRUE(bitwise_equal(base, run_forward(c, Fwd::kCpu, -1, threads, &chunked)));
      EXPECT_TRUE(bitwise_equal(base, run_forward(c, Fwd::kCpu, -1, threads, &chunked2)));
    }
  }
}

TEST(WindowCpu, SequenceAloneEqualsSequenceInBatch) {
  WCase alone = varlen(DType::kBF16, {40}, {40}, 4, 2, 16, 16, 0);
  alone.fill_uniform(120);
  alone.band(4, 6, 0);
  alone.mask_kind = MaskKind::kImplied;
  alone.layout = StatsLayout::kTnd;
  WCase both = varlen(DType::kBF16, {40, 40}, {40, 40}, 4, 2, 16, 16, 0);
  both.band(4, 6, 0);
  both.mask_kind = MaskKind::kImplied;
  both.layout = StatsLayout::kTnd;
  // batch 1 of `both` holds `alone`'s sequence
  for (int64_t t = 0; t < 40; ++t)
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t d = 0; d < 16; ++d) both.q[both.qi(40 + t, h, d)] = alone.q[alone.qi(t, h, d)];
  for (int64_t r = 0; r < 40; ++r)
    for (int64_t n = 0; n < 2; ++n)
      for (int64_t d = 0; d < 16; ++d) {
        both.k[both.ki(40 + r, n, d)] = alone.k[alone.ki(r, n, d)];
        both.v[both.vi(40 + r, n, d)] = alone.v[alone.vi(r, n, d)];
      }
  const FwdResult a = run_forward(alone, Fwd::kCpu), b = run_forward(both, Fwd::kCpu);
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  const size_t n = a.out_bytes.size();
  EXPECT_EQ(0, std::memcmp(a.out_bytes.data(), b.out_bytes.data() + n, n));
  EXPECT_EQ(0, std::memcmp(a.smax.data(), b.smax.data() + a.smax.size(), a.smax.size() * 4));
}

TEST(WindowCpu, RandomConfigurations) {
  // a seeded fuzz over modes, lengths, heads, dims, masks and dtypes (small, so that it stays fast)
  std::mt19937_64 rng(2024);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int it = 0; it < 24; ++it) {
    const DType dt = kDtypes[pick(0, 3)];
    const int64_t B = pick(1, 3), N2 = pick(1, 2), G = pick(1, 4), D = pick(1, 40), Dv = pick(1, D);
    std::vector<int64_t> sq, skv;
    const int64_t mode = pick(0, 4);
    for (int64_t b = 0; b < B; ++b) {
      int64_t s = pick(0, 40), k = pick(s == 0 ? 0 : 1, 50);
      if (mode == 3 || mode == 4) k = std::max(k, s);
      if (s > 0) k = std::max<int64_t>(k, 1);
      sq.push_back(s);
      skv.push_back(k);
    }
    if (std::accumulate(sq.begin(), sq.end(), int64_t(0)) == 0) sq[0] = 3, skv[0] = std::max<int64_t>(skv[0], 3);
    WCase c = varlen(dt, sq, skv, N2 * G, N2, D, Dv, 300 + it, static_cast<int>(pick(0, 1)));
    c.inner_precise = pick(0, 2);
    c.layout = pick(0, 1) ? StatsLayout::kTnd : StatsLayout::kPerBatch;
    switch (mode) {
      case 0: c.band(0, pick(0, 30), pick(0, 30)); c.random_mask(400 + it, 0.2, 0.1); break;
      case 1: c.band(1); c.random_mask(400 + it, 0.3, 0.15); break;
      case 2: c.band(2); c.compressed_mask(); break;
      case 3: c.band(3); c.mask_kind = MaskKind::kImplied; break;
      default: c.band(4, pick(0, 30), pick(0, 3)); c.compressed_mask(); break;
    }
    Bound bd(c);
    if (!nsa::validate_window_attention(bd.p, nullptr).ok()) continue;  // e.g. a mode-0 band rule
    check_cpu(c);
  }
}

}  // namespace
}  // namespace wa_test
