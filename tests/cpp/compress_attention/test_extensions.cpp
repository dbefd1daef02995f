// The §10 extensions of CompressAttentionParams (causal, larger_masks, short_batches), on the reference (fp32 and
// fp64) and on every CPU ISA path this host runs, forward and backward:
//   causal         equals the call with the §9 masks materialised (make_atten_mask / make_topk_mask), bitwise;
//   larger_masks   a mask inside a larger buffer (extra rows and columns set) equals the exact-size call, bitwise;
//   short_batches  rows of a batch with Sel_b < K hold the batch's own top-Sel_b order, then -1;
// and the rules: each flag off keeps the NPU's rule (§6), causal refuses explicit masks, nothing written on error.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "../test_util.h"

namespace {

using namespace nsa_test;
using nsa::CompressAttentionGradParams;
using nsa::Mask2;

enum class Run { kRef32, kRef64, kCpu };

Status forward(Run r, const CompressAttentionParams& p, CpuIsa isa) {
  switch (r) {
    case Run::kRef32: return nsa::reference::forward_fp32(p);
    case Run::kRef64: return nsa::reference::forward_fp64(p);
    case Run::kCpu: return nsa::compress_attention_cpu(p, nsa::CpuOptions{static_cast<int>(isa), 3});
  }
  return Status::Error("bad run");
}

Status backward(Run r, const CompressAttentionGradParams& g, CpuIsa isa) {
  switch (r) {
    case Run::kRef32: return nsa::reference::backward_fp32(g);
    case Run::kRef64: return nsa::reference::backward_fp64(g);
    case Run::kCpu: return nsa::compress_attention_backward_cpu(g, nsa::CpuOptions{static_cast<int>(isa), 3});
  }
  return Status::Error("bad run");
}

// Every (run, isa) to compare: both references, then the CPU backend on each ISA path.
std::vector<std::pair<Run, CpuIsa>> runs() {
  std::vector<std::pair<Run, CpuIsa>> out = {{Run::kRef32, CpuIsa::kScalar}, {Run::kRef64, CpuIsa::kScalar}};
  for (CpuIsa isa : supported_isas()) out.push_back({Run::kCpu, isa});
  return out;
}

// The backward of a bound forward call: dO drawn from rng, the forward's outputs (already computed in bd) as
// saved tensors; returns the three gradients' raw bytes (status in *st).
std::vector<unsigned char> grads(const Case& cs, Bound& bd, Run r, CpuIsa isa, uint64_t seed, Status* st) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  const size_t es = nsa::dtype_size(cs.dtype);
  const int64_t n_out = cs.T() * cs.N1 * cs.D2;
  std::vector<unsigned char> go(std::max<size_t>(1, static_cast<size_t>(n_out) * es));
  for (int64_t i = 0; i < n_out; ++i) nsa::detail::store_f64(go.data(), i, round_to(cs.dtype, u(rng)), cs.dtype);
  std::vector<unsigned char> gq(std::max<size_t>(1, static_cast<size_t>(cs.T() * cs.N1 * cs.D) * es), 0xFF);
  std::vector<unsigned char> gk(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.D) * es), 0xFF);
  std::vector<unsigned char> gv(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.D2) * es), 0xFF);
  CompressAttentionGradParams g;
  g.fwd = bd.p;
  auto view = [&](const void* data) {
    nsa::Tensor3 t;
    t.data = data;
    t.size[0] = cs.T(), t.size[1] = cs.N1, t.size[2] = cs.D2;
    t.stride[0] = cs.N1 * cs.D2, t.stride[1] = cs.D2, t.stride[2] = 1;
    return t;
  };
  g.attention_out = view(bd.out.data());
  g.grad_out = view(go.data());
  g.softmax_max = bd.smax.data();
  g.softmax_sum = bd.ssum.data();
  g.grad_query = gq.data();
  g.grad_key = gk.data();
  g.grad_value = gv.data();
  *st = backward(r, g, isa);
  gq.insert(gq.end(), gk.begin(), gk.end());
  gq.insert(gq.end(), gv.begin(), gv.end());
  return gq;
}

Case causal_case(DType dt, uint64_t seed) {
  // four sequences, one empty; l = 32, d = 16, l' = 64 (M = 4); K = 1 <= min Sel_b
  Case cs = Case::make(dt, {150, 0, 77, 31}, {9, 2, 4, 1}, 4, 2, 32, 24, 32, 16, 64, 1);
  std::mt19937_64 rng(seed);
  cs.fill_uniform(rng, -2, 2);
  return cs;
}

TEST(CausalExtension, EqualsTheMaterialisedMasksBitwiseForwardAndBackward) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    Case explicit_cs = causal_case(dt, 7);
    explicit_cs.set_causal_mask();
    explicit_cs.set_local_topk_mask();
    const Case plain_cs = causal_case(dt, 7);
    for (auto [r, isa] : runs()) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " run " + std::to_string(static_cast<int>(r)) + " isa " +
                   nsa::cpu_isa_name(isa));
      Bound a(explicit_cs), b(plain_cs);
      b.p.causal = true;
      ASSERT_TRUE(forward(r, a.p, isa).ok());
      const Status sb = forward(r, b.p, isa);
      ASSERT_TRUE(sb.ok()) << sb.message();
      EXPECT_TRUE(bitwise_equal(collect(explicit_cs, a, Status::Ok()), collect(plain_cs, b, Status::Ok())));
      Status ga, gb;
      const auto da = grads(explicit_cs, a, r, isa, 11, &ga);
      const auto db = grads(plain_cs, b, r, isa, 11, &gb);
      ASSERT_TRUE(ga.ok() && gb.ok()) << ga.message() << gb.message();
      EXPECT_EQ(da, db) << "gradients differ";
    }
  }
}

TEST(CausalExtension, RowsBeforeTheFirstWindowAreFullyMaskedAndForcedBlocksComeFirst) {
  Case cs = Case::make(DType::kF32, {300}, {17}, 2, 1, 16, 16, 32, 16, 64, 5);
  std::mt19937_64 rng(3);
  cs.fill_uniform(rng, -1, 1);
  Bound bd(cs);
  bd.p.causal = true;
  ASSERT_TRUE(nsa::compress_attention_cpu(bd.p).ok());
  // §5: rows s < l - 1 see nothing: softmax_max = -FLT_MAX, softmax_sum = C
  for (int64_t s : {0, 30}) {
    EXPECT_EQ(bd.smax[static_cast<size_t>(stat_index(cs, s, 0))], -FLT_MAX);
    EXPECT_EQ(bd.ssum[static_cast<size_t>(stat_index(cs, s, 0))], 17.0f);
  }
  EXPECT_GT(bd.smax[static_cast<size_t>(stat_index(cs, 31, 0))], -FLT_MAX);
  // row 299 forces {0, 3, 4} (299 / 64 = 4): they lead its top-k in index order (all +FLT_MAX, ties by index)
  const int32_t* row = bd.topk.data() + 299 * cs.K;
  EXPECT_EQ(row[0], 0);
  EXPECT_EQ(row[1], 3);
  EXPECT_EQ(row[2], 4);
}

TEST(CausalExtension, ExplicitMasksAreRefusedNamingThemNothingWritten) {
  for (bool atten : {true, false}) {
    Case cs = causal_case(DType::kBF16, 1);
    if (atten) cs.set_causal_mask();
    else cs.set_local_topk_mask();
    for (auto [r, isa] : runs()) {
      Bound bd(cs);
      bd.p.causal = true;
      const Status st = r == Run::kRef64 ? nsa::compress_attention_reference(bd.p) : forward(r, bd.p, isa);
      ASSERT_FALSE(st.ok());
      EXPECT_NE(st.message().find(atten ? "atten_mask must be absent when causal" : "topk_mask must be absent"),
                std::string::npos)
          << st.message();
      EXPECT_TRUE(bd.outputs_untouched());
    }
  }
}

// cs's masks copied into buffers with 3 more rows and 5 more columns, the extra entries set (removed / forced).
void embed_larger(const Case& cs, Storage2* am, Storage2* tm, CompressAttentionParams* p) {
  auto embed = [](const std::vector<uint8_t>& m, int64_t rows, int64_t cols, Storage2* out, Mask2* view) {
    const int64_t R = rows + 3, C = cols + 5;
    std::vector<uint8_t> big(static_cast<size_t>(R * C), 1);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) big[static_cast<size_t>(r * C + c)] = m[static_cast<size_t>(r * cols + c)];
    materialize2(big, R, C, Layout2{}, out);
    *view = out->view;
  };
  embed(cs.atten, cs.max_sq(), cs.max_c(), am, &p->atten_mask);
  embed(cs.topk, cs.max_sq(), cs.max_sel(), tm, &p->topk_mask);
}

TEST(LargerMasksExtension, TopLeftPartUsedBitwiseForwardAndBackward) {
  Case cs = Case::make(DType::kBF16, {40, 0, 57}, {7, 3, 12}, 4, 2, 32, 32, 32, 16, 64, 1);
  std::mt19937_64 rng(5);
  cs.fill_uniform(rng, -2, 2);
  cs.set_random_mask(rng, 0.3, 0.1);
  cs.set_random_topk_mask(rng, 0.2);
  for (auto [r, isa] : runs()) {
    SCOPED_TRACE(std::to_string(static_cast<int>(r)) + " " + nsa::cpu_isa_name(isa));
    Bound a(cs), b(cs);
    Storage2 am, tm;
    embed_larger(cs, &am, &tm, &b.p);
    // without the flag: the NPU's exact-shape rule
    const Status refused = forward(r, b.p, isa);
    ASSERT_FALSE(refused.ok());
    EXPECT_NE(refused.message().find("atten_mask must have shape"), std::string::npos) << refused.message();
    EXPECT_TRUE(b.outputs_untouched());
    b.p.larger_masks = true;
    ASSERT_TRUE(forward(r, a.p, isa).ok());
    ASSERT_TRUE(forward(r, b.p, isa).ok());
    EXPECT_TRUE(bitwise_equal(collect(cs, a, Status::Ok()), collect(cs, b, Status::Ok())));
    Status ga, gb;
    EXPECT_EQ(grads(cs, a, r, isa, 3, &ga), grads(cs, b, r, isa, 3, &gb));
    EXPECT_TRUE(ga.ok() && gb.ok()) << ga.message() << gb.message();
  }
  // smaller than [maxSq, maxC] stays an error with the flag
  Bound c(cs);
  c.p.larger_masks = true;
  c.p.atten_mask.size[1] -= 1;
  const Status st = nsa::compress_attention_cpu(c.p);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("atten_mask must have at least [57, 12]"), std::string::npos) << st.message();
}

TEST(ShortBatchesExtension, MissingSlotsHoldMinusOneAndTheRestIsTheBatchAlone) {
  // M = 4: Sel = [3, 1, 2]; K = 3
  Case cs = Case::make(DType::kF32, {40, 30, 20}, {12, 3, 5}, 4, 2, 16, 16, 32, 16, 64, 3);
  std::mt19937_64 rng(9);
  cs.fill_uniform(rng, -2, 2);
  for (auto [r, isa] : runs()) {
    SCOPED_TRACE(std::to_string(static_cast<int>(r)) + " " + nsa::cpu_isa_name(isa));
    Bound bd(cs);
    const Status refused = forward(r, bd.p, isa);
    ASSERT_FALSE(refused.ok());
    EXPECT_NE(refused.message().find("select_block_count (3) must be <="), std::string::npos) << refused.message();
    bd.p.short_batches = true;
    ASSERT_TRUE(forward(r, bd.p, isa).ok());
    for (int64_t b = 0; b < cs.B(); ++b) {
      // the batch alone with K = Sel_b gives the first Sel_b slots; attention_out and statistics are those of
      // the full call (K plays no part in them)
      Case one = Case::make(DType::kF32, {cs.sq[b]}, {cs.c[b]}, 4, 2, 16, 16, 32, 16, 64, cs.sel(b));
      one.scale = cs.scale;
      for (int64_t t = 0; t < cs.sq[b]; ++t)
        for (int64_t h = 0; h < 4; ++h)
          for (int64_t j = 0; j < 16; ++j) one.q[one.qi(t, h, j)] = cs.q[cs.qi(cs.q_begin(b) + t, h, j)];
      for (int64_t c = 0; c < cs.c[b]; ++c)
        for (int64_t n = 0; n < 2; ++n)
          for (int64_t j = 0; j < 16; ++j) {
            one.k[one.ki(c, n, j)] = cs.k[cs.ki(cs.c_begin(b) + c, n, j)];
            one.v[one.vi(c, n, j)] = cs.v[cs.vi(cs.c_begin(b) + c, n, j)];
          }
      Bound ob(one);
      ASSERT_TRUE(forward(r, ob.p, isa).ok());
      for (int64_t t = 0; t < cs.sq[b]; ++t)
        for (int64_t n = 0; n < 2; ++n)
          for (int64_t i = 0; i < cs.K; ++i) {
            const int32_t got = bd.topk[static_cast<size_t>(((cs.q_begin(b) + t) * 2 + n) * cs.K + i)];
            const int32_t want = i < cs.sel(b) ? ob.topk[static_cast<size_t>((t * 2 + n) * one.K + i)] : -1;
            ASSERT_EQ(got, want) << "batch " << b << " row " << t << " slot " << i;
          }
      for (int64_t t = 0; t < cs.sq[b]; ++t)
        for (int64_t h = 0; h < 4; ++h) {
          const size_t j = static_cast<size_t>((cs.q_begin(b) + t) * 4 + h) * 16;
          EXPECT_EQ(0, std::memcmp(bd.out.data() + j * 4, ob.out.data() + static_cast<size_t>(t * 4 + h) * 64, 64));
          EXPECT_EQ(bd.smax[static_cast<size_t>(stat_index(cs, cs.q_begin(b) + t, h))],
                    ob.smax[static_cast<size_t>(stat_index(one, t, h))]);
        }
    }
    Status gs;
    grads(cs, bd, r, isa, 1, &gs);  // the backward accepts the call too
    EXPECT_TRUE(gs.ok()) << gs.message();
  }
}

}  // namespace
