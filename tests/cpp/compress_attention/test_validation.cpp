// docs/spec/compress_attention.md §6 argument rules: each violation is an error whose message names the argument, and no
// entry point writes anything when it fails (outputs keep their 0xFF fill). Plus the boundary
// values that must be accepted.
#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace nsa_test {
namespace {

using Mutate = std::function<void(CompressAttentionParams&)>;

// A valid call exercising every argument: 3 batches (one with Sq = 0), masks, the selection list,
// one key/value row past the last prefix sum. M = 4: Sel = [2, 2, 2], K = 2. T = 7, T2 = 20.
Case base_case() {
  Case cs = Case::make(DType::kBF16, {3, 0, 4}, {5, 8, 6}, 4, 2, 16, 8, 32, 16, 64, 2);
  cs.extra_kv_rows = 1;
  cs.resize();
  std::mt19937_64 rng(6);
  cs.fill_uniform(rng, -1, 1);
  cs.set_causal_mask();
  cs.set_local_topk_mask();
  cs.pass_sel = true;
  return cs;
}

// Every entry point rejects the mutated call, names each of `names`, and writes nothing.
void expect_rejected(const Mutate& mutate, const std::vector<std::string>& names, const Case& cs = base_case()) {
  {
    Bound bd(cs);
    mutate(bd.p);
    nsa::CompressAttentionShape sh;
    sh.T = -7;
    const Status st = nsa::validate_compress_attention(bd.p, &sh);
    EXPECT_FALSE(st.ok()) << "validate_compress_attention accepted it";
    for (const std::string& n : names)
      EXPECT_NE(st.message().find(n), std::string::npos) << "message \"" << st.message() << "\" lacks \"" << n << "\"";
    EXPECT_EQ(sh.T, -7) << "validate wrote the shape of a rejected call";
  }
  for (Backend b : {Backend::kReference, Backend::kRefFp32, Backend::kRefFp64, Backend::kCpu}) {
    SCOPED_TRACE(backend_name(b));
    Bound bd(cs);
    mutate(bd.p);
    const Status st = call(b, bd.p);
    EXPECT_FALSE(st.ok());
    for (const std::string& n : names)
      EXPECT_NE(st.message().find(n), std::string::npos) << "message \"" << st.message() << "\" lacks \"" << n << "\"";
    EXPECT_TRUE(bd.outputs_untouched()) << "outputs written by a rejected call";
  }
}

TEST(Validation, BaseCaseIsValid) {
  const Case cs = base_case();
  Bound bd(cs);
  nsa::CompressAttentionShape sh;
  const Status st = nsa::validate_compress_attention(bd.p, &sh);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(sh.T, 7);
  EXPECT_EQ(sh.N1, 4);
  EXPECT_EQ(sh.D, 16);
  EXPECT_EQ(sh.T2, 20);
  EXPECT_EQ(sh.N2, 2);
  EXPECT_EQ(sh.D2, 8);
  EXPECT_EQ(sh.G, 2);
  EXPECT_EQ(sh.B, 3);
  EXPECT_EQ(sh.M, 4);
  EXPECT_EQ(sh.N, 2);
  EXPECT_EQ(sh.K, 2);
  EXPECT_EQ(sh.max_sq, 4);
  EXPECT_EQ(sh.max_c, 8);
  EXPECT_EQ(sh.max_sel, 2);
  for (Backend b : {Backend::kReference, Backend::kRefFp32, Backend::kRefFp64, Backend::kCpu}) {
    SCOPED_TRACE(backend_name(b));
    EXPECT_TRUE(check_complete(cs, run(cs, b)));
  }
}

// ---------------------------------------------------------------- tensors
TEST(Validation, NullInputs) {
  expect_rejected([](auto& p) { p.query.data = nullptr; }, {"query"});
  expect_rejected([](auto& p) { p.key.data = nullptr; }, {"key"});
  expect_rejected([](auto& p) { p.value.data = nullptr; }, {"value"});
}

TEST(Validation, EmptyInputs) {
  for (int dim = 0; dim < 3; ++dim) {
    SCOPED_TRACE(dim);
    expect_rejected([dim](auto& p) { p.query.size[dim] = 0; }, {"query"});
    expect_rejected([dim](auto& p) { p.key.size[dim] = 0; }, {"key"});  // dim 1: N2 = 0
    expect_rejected([dim](auto& p) { p.value.size[dim] = 0; }, {"value"});
  }
  expect_rejected([](auto& p) { p.query.size[2] = -1; }, {"query"});
}

TEST(Validation, Dtype) {
  expect_rejected([](auto& p) { p.dtype = static_cast<DType>(7); }, {"dtype"});
  expect_rejected([](auto& p) { p.dtype = static_cast<DType>(-1); }, {"dtype"});
}

TEST(Validation, HeadDims) {
  expect_rejected([](auto& p) { p.key.size[2] = 15; }, {"key"});           // D of key != D of query
  expect_rejected([](auto& p) { p.query.size[2] = 15; }, {"key"});         // (either side)
  expect_rejected([](auto& p) { p.value.size[2] = 17; }, {"value", "D2"});  // D2 > D
}

TEST(Validation, ValueShape) {
  expect_rejected([](auto& p) { p.value.size[0] = 19; }, {"value"});
  expect_rejected([](auto& p) { p.value.size[1] = 1; }, {"value"});
}

TEST(Validation, ScaleValue) {
  const double bad[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                        -std::numeric_limits<double>::infinity(), 1e39, -1e300};
  for (double s : bad) {
    SCOPED_TRACE(s);
    expect_rejected([s](auto& p) { p.scale_value = s; }, {"scale_value"});
  }
}

TEST(Validation, HeadNum) {
  expect_rejected([](auto& p) { p.head_num = 3; }, {"head_num"});
  expect_rejected([](auto& p) { p.head_num = 0; }, {"head_num"});
  expect_rejected([](auto& p) { p.head_num = 8; }, {"head_num"});
}

TEST(Validation, HeadGroupsMustDivide) {
  // N1 = 4 query heads over N2 = 3 key/value heads.
  expect_rejected(
      [](auto& p) {
        p.key.size[1] = 3;
        p.value.size[1] = 3;
      },
      {"query", "key"});
}

TEST(Validation, BlockSizes) {
  for (int64_t l : {0, 8, 24, 127, 144, -32}) {
    SCOPED_TRACE(l);
    expect_rejected([l](auto& p) { p.compress_block_size = l; }, {"compress_block_size"});
  }
  for (int64_t d : {0, 8, 40, 80, -16}) {
    SCOPED_TRACE(d);
    expect_rejected([d](auto& p) { p.compress_stride = d; }, {"compress_stride"});
  }
  for (int64_t lp : {0, 8, 72, 144}) {
    SCOPED_TRACE(lp);
    expect_rejected([lp](auto& p) { p.select_block_size = lp; }, {"select_block_size"});
  }
}

TEST(Validation, BlockSizeOrder) {
  // d <= l
  expect_rejected(
      [](auto& p) {
        p.compress_block_size = 16;
        p.compress_stride = 32;
      },
      {"compress_stride"});
  // l <= l'
  expect_rejected(
      [](auto& p) {
        p.compress_block_size = 64;
        p.select_block_size = 32;
      },
      {"compress_block_size", "select_block_size"});
  // l' % d == 0
  expect_rejected(
      [](auto& p) {
        p.compress_block_size = 32;
        p.compress_stride = 32;
        p.select_block_size = 48;
      },
      {"select_block_size"});
}

TEST(Validation, SelectBlockCount) {
  for (int64_t K : {0, -1, 33, 100}) {
    SCOPED_TRACE(K);
    expect_rejected([K](auto& p) { p.select_block_count = K; }, {"select_block_count"});
  }
  // K <= min_b Sel_b = 2.
  expect_rejected([](auto& p) { p.select_block_count = 3; }, {"select_block_count"});
  // The smallest Sel_b counts, not the largest: C = [5, 8, 6] with l' = 128 (M = 8): Sel = [1, 1, 1].
  expect_rejected(
      [](auto& p) {
        p.select_block_size = 128;
        p.actual_sel_seq_kvlen = {};
        p.topk_mask = {};
      },
      {"select_block_count"});
}

TEST(Validation, SeqQlen) {
  static const int64_t decreasing[] = {3, 2, 7}, negative[] = {-1, 3, 7}, short_last[] = {3, 3, 6},
                       long_last[] = {3, 3, 8};
  expect_rejected([](auto& p) { p.actual_seq_qlen = {}; }, {"actual_seq_qlen"});
  expect_rejected([](auto& p) { p.actual_seq_qlen.size = 0; }, {"actual_seq_qlen"});
  expect_rejected([](auto& p) { p.actual_seq_qlen = {decreasing, 3}; }, {"actual_seq_qlen"});
  expect_rejected([](auto& p) { p.actual_seq_qlen = {negative, 3}; }, {"actual_seq_qlen"});
  // Query rows past the last prefix sum are an error (stricter than the NPU), and so is a sum past T.
  expect_rejected([](auto& p) { p.actual_seq_qlen = {short_last, 3}; }, {"actual_seq_qlen"});
  expect_rejected([](auto& p) { p.actual_seq_qlen = {long_last, 3}; }, {"actual_seq_qlen"});
}

TEST(Validation, CmpSeqKvlen) {
  static const int64_t decreasing[] = {5, 4, 19}, negative[] = {-1, 13, 19}, too_long[] = {5, 13, 21},
                       empty_batch[] = {5, 5, 19}, empty_first[] = {0, 13, 19}, two[] = {5, 13};
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {}; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen.size = 0; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {two, 2}; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {decreasing, 3}; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {negative, 3}; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {too_long, 3}; }, {"actual_cmp_seq_kvlen"});
  // C_b = 0 is an error (no softmax exists), for a middle and for the first batch.
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {empty_batch, 3}; }, {"actual_cmp_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_cmp_seq_kvlen = {empty_first, 3}; }, {"actual_cmp_seq_kvlen"});
}

TEST(Validation, SelSeqKvlen) {
  static const int64_t wrong[] = {2, 4, 5}, counts[] = {2, 2, 2}, two[] = {2, 4};
  expect_rejected([](auto& p) { p.actual_sel_seq_kvlen = {wrong, 3}; }, {"actual_sel_seq_kvlen"});
  expect_rejected([](auto& p) { p.actual_sel_seq_kvlen = {counts, 3}; }, {"actual_sel_seq_kvlen"});  // not prefix sums
  expect_rejected([](auto& p) { p.actual_sel_seq_kvlen = {two, 2}; }, {"actual_sel_seq_kvlen"});
}

TEST(Validation, MaskShapes) {
  // atten_mask must be [maxSq, maxC] = [4, 8]; topk_mask [maxSq, maxSel] = [4, 2].
  expect_rejected([](auto& p) { p.atten_mask.size[0] = 5; }, {"atten_mask"});
  expect_rejected([](auto& p) { p.atten_mask.size[0] = 3; }, {"atten_mask"});
  expect_rejected([](auto& p) { p.atten_mask.size[1] = 7; }, {"atten_mask"});
  expect_rejected([](auto& p) { p.atten_mask.size[1] = 19; }, {"atten_mask"});  // sum of C, not max
  expect_rejected([](auto& p) { p.topk_mask.size[0] = 7; }, {"topk_mask"});     // T, not maxSq
  expect_rejected([](auto& p) { p.topk_mask.size[1] = 3; }, {"topk_mask"});
  expect_rejected([](auto& p) { p.topk_mask.size[1] = 8; }, {"topk_mask"});  // maxC, not maxSel
}

TEST(Validation, NullOutputs) {
  expect_rejected([](auto& p) { p.attention_out = nullptr; }, {"attention_out"});
  expect_rejected([](auto& p) { p.topk_indices = nullptr; }, {"topk_indices"});
  expect_rejected([](auto& p) { p.softmax_max = nullptr; }, {"softmax_max"});
  expect_rejected([](auto& p) { p.softmax_sum = nullptr; }, {"softmax_sum"});
}

// options.isa = isa is an error naming options.isa; nothing is written.
void expect_isa_rejected(int isa) {
  SCOPED_TRACE(isa);
  Bound bd(base_case());
  const Status st = nsa::compress_attention_cpu(bd.p, nsa::CpuOptions{isa, 0});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("options.isa"), std::string::npos) << st.message();
  EXPECT_TRUE(bd.outputs_untouched());
}

TEST(Validation, CpuIsaOutOfRange) {
  for (int isa : {-2, 4, 100}) expect_isa_rejected(isa);
}

TEST(Validation, CpuIsaUnsupported) {
  const int best = static_cast<int>(nsa::cpu_detected_isa());
  if (best >= static_cast<int>(CpuIsa::kAvx512Bf16)) GTEST_SKIP() << "this host runs every CpuIsa path";
  for (int isa = best + 1; isa <= static_cast<int>(CpuIsa::kAvx512Bf16); ++isa) expect_isa_rejected(isa);
}

// A late error (found only after looking at every batch) still writes nothing.
TEST(Validation, LateErrorWritesNothing) {
  static const int64_t sel[] = {2, 4, 7};  // only the last element is wrong
  expect_rejected([](auto& p) { p.actual_sel_seq_kvlen = {sel, 3}; }, {"actual_sel_seq_kvlen"});
  expect_rejected([](auto& p) { p.softmax_sum = nullptr; }, {"softmax_sum"});
}

// ---------------------------------------------------------------- accepted boundary values

void expect_accepted(const Case& cs) {
  SCOPED_TRACE(cs.describe());
  {
    Bound bd(cs);
    const Status st = nsa::validate_compress_attention(bd.p, nullptr);
    EXPECT_TRUE(st.ok()) << st.message();
  }
  for (Backend b : {Backend::kReference, Backend::kCpu}) {
    SCOPED_TRACE(backend_name(b));
    EXPECT_TRUE(check_complete(cs, run(cs, b)));
  }
}

TEST(Validation, AcceptsBoundaryBlockSizes) {
  struct Cfg {
    int64_t l, d, lp;
  };
  for (Cfg cf : {Cfg{128, 64, 128}, Cfg{16, 16, 16}, Cfg{16, 16, 128}, Cfg{128, 16, 128}, Cfg{64, 64, 128},
                 Cfg{32, 32, 64}}) {
    Case cs = Case::make(DType::kF32, {5, 3}, {9, 4}, 2, 1, 16, 16, cf.l, cf.d, cf.lp, 1);
    std::mt19937_64 rng(static_cast<uint64_t>(cf.l * 1000 + cf.d * 10 + cf.lp));
    cs.fill_uniform(rng, -1, 1);
    cs.set_causal_mask();
    cs.set_local_topk_mask();
    cs.pass_sel = true;
    expect_accepted(cs);
  }
}

TEST(Validation, AcceptsK32) {
  // (16, 16, 16): M = 1, Sel_b = C_b; K = 32 = min Sel.
  Case a = Case::make(DType::kBF16, {4, 2}, {32, 40}, 2, 2, 16, 8, 16, 16, 16, 32);
  std::mt19937_64 rng(32);
  a.fill_uniform(rng, -1, 1);
  expect_accepted(a);
  // M = 4: C = 125 -> Sel = 32.
  Case b = Case::make(DType::kF16, {3}, {125}, 1, 1, 16, 16, 32, 16, 64, 32);
  b.fill_uniform(rng, -1, 1);
  b.set_random_topk_mask(rng, 0.3);
  expect_accepted(b);
}

TEST(Validation, AcceptsOtherBoundaries) {
  std::mt19937_64 rng(7);
  // Key/value rows past the last compressed prefix sum (NaN-filled: they must be ignored).
  Case a = Case::make(DType::kF32, {3, 4}, {5, 6}, 2, 2, 16, 16);
  a.extra_kv_rows = 9;
  a.resize();
  a.fill_uniform(rng, -1, 1);
  expect_accepted(a);
  // Selection list given and correct; empty first and last batches; D = 1, D2 = 1.
  Case b = Case::make(DType::kF64, {0, 3, 0}, {4, 9, 1}, 3, 1, 1, 1, 32, 16, 64, 1);
  b.fill_uniform(rng, -1, 1);
  b.pass_sel = true;
  b.set_causal_mask();
  expect_accepted(b);
  // Scale 0 and negative scales are fine; num_threads <= 0 means default.
  for (double s : {0.0, -0.5, 1e30}) {
    Case c = Case::make(DType::kBF16, {2}, {3}, 1, 1, 16, 4);
    c.fill_uniform(rng, -1, 1);
    c.scale = s;
    expect_accepted(c);
  }
  Case d = Case::make(DType::kBF16, {2}, {3}, 1, 1, 16, 4);
  d.fill_uniform(rng, -1, 1);
  for (int nt : {-3, 0, 1, 64}) {
    SCOPED_TRACE(nt);
    EXPECT_TRUE(check_complete(d, run(d, Backend::kCpu, -1, nt)));
  }
  // Every supported ISA can be forced; -1 too.
  for (CpuIsa isa : supported_isas()) EXPECT_TRUE(check_complete(d, run_cpu(d, isa))) << nsa::cpu_isa_name(isa);
}

}  // namespace
}  // namespace nsa_test
