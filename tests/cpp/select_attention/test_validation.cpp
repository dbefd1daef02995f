// docs/spec/select_attention.md §7 argument rules: each violation is an error whose message names the argument,
// and no entry point writes anything when it fails (outputs keep their 0xFF fill); the boundary values that must be
// accepted are accepted.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "select_util.h"

namespace sel_test {
namespace {

using Mutate = std::function<void(SelectAttentionParams&)>;
using MutateBwd = std::function<void(SelectAttentionGradParams&)>;

// A valid call using every argument: 3 batches (one with Sq = 0, one with a partial last block), G = 2, D != Dv,
// -1 slots and duplicates, one key/value row past the last prefix sum. l' = 4: blocks per batch [2, 1, 3].
SCase base_case() {
  SCase cs = SCase::make(DType::kBF16, {3, 0, 4}, {5, 4, 9}, 4, 2, 8, 6, 4, 3);
  cs.extra_kv_rows = 1;
  cs.resize();
  std::mt19937_64 rng(6);
  cs.fill_uniform(rng, -1, 1);
  cs.random_indices(rng, 0.2, 0.2);
  return cs;
}

void expect_message(const Status& st, const std::vector<std::string>& names) {
  EXPECT_FALSE(st.ok()) << "accepted";
  for (const std::string& n : names)
    EXPECT_NE(st.message().find(n), std::string::npos) << "message \"" << st.message() << "\" lacks \"" << n << "\"";
}

// Every forward entry point rejects the mutated call, names each of `names`, and writes nothing.
void expect_rejected(const Mutate& mutate, const std::vector<std::string>& names, const SCase& cs = base_case()) {
  {
    SBound bd(cs);
    mutate(bd.p);
    nsa::SelectAttentionShape sh;
    sh.T1 = -7;
    expect_message(nsa::validate_select_attention(bd.p, &sh), names);
    EXPECT_EQ(sh.T1, -7) << "validate wrote the shape of a rejected call";
  }
  for (SBackend b : {SBackend::kReference, SBackend::kRefFp32, SBackend::kRefFp64, SBackend::kCpu}) {
    SCOPED_TRACE(backend_name(b));
    SBound bd(cs);
    mutate(bd.p);
    expect_message(call(b, bd.p), names);
    EXPECT_TRUE(bd.outputs_untouched()) << "outputs written by a rejected call";
  }
}

// Every backward entry point rejects the mutated call, names each of `names`, and writes nothing.
void expect_rejected_bwd(const MutateBwd& mutate, const std::vector<std::string>& names) {
  const SCase cs = base_case();
  std::mt19937_64 rng(9);
  const BwdInputs in = make_bwd_inputs(cs, rng);
  {
    SBoundBwd bd(cs, in);
    mutate(bd.p);
    nsa::SelectAttentionShape sh;
    sh.T1 = -7;
    expect_message(nsa::validate_select_attention_backward(bd.p, &sh), names);
    EXPECT_EQ(sh.T1, -7);
  }
  for (BwdBackend b : {BwdBackend::kReference, BwdBackend::kRefFp32, BwdBackend::kRefFp64, BwdBackend::kCpu}) {
    SBoundBwd bd(cs, in);
    mutate(bd.p);
    expect_message(call_bwd(b, bd.p), names);
    EXPECT_TRUE(bd.outputs_untouched()) << "gradients written by a rejected call (backend " << static_cast<int>(b) << ")";
  }
}

TEST(SelectValidation, BaseCaseIsValid) {
  const SCase cs = base_case();
  SBound bd(cs);
  nsa::SelectAttentionShape sh;
  const Status st = nsa::validate_select_attention(bd.p, &sh);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(sh.T1, 7);
  EXPECT_EQ(sh.N1, 4);
  EXPECT_EQ(sh.D, 8);
  EXPECT_EQ(sh.T2, 19);
  EXPECT_EQ(sh.N2, 2);
  EXPECT_EQ(sh.Dv, 6);
  EXPECT_EQ(sh.G, 2);
  EXPECT_EQ(sh.K, 3);
  EXPECT_EQ(sh.block, 4);
  EXPECT_EQ(sh.B, 3);
  EXPECT_EQ(sh.max_sq, 4);
  EXPECT_EQ(sh.max_skv, 9);
  EXPECT_EQ(sh.max_blocks, 3);
  EXPECT_EQ(sh.kv_end, 18);
  for (SBackend b : {SBackend::kReference, SBackend::kRefFp32, SBackend::kRefFp64, SBackend::kCpu})
    EXPECT_TRUE(check_complete(cs, run(cs, b))) << backend_name(b);
}

// ------------------------------------------------------------------------------------ tensors and scalars

TEST(SelectValidation, Dtype) {
  expect_rejected([](SelectAttentionParams& p) { p.dtype = static_cast<DType>(7); }, {"dtype"});
}

TEST(SelectValidation, QueryKeyValueShapes) {
  expect_rejected([](SelectAttentionParams& p) { p.query.data = nullptr; }, {"query", "null"});
  expect_rejected([](SelectAttentionParams& p) { p.query.size[1] = 0; }, {"query"});
  expect_rejected([](SelectAttentionParams& p) { p.query.size[0] = -1; }, {"query"});
  expect_rejected([](SelectAttentionParams& p) { p.key.data = nullptr; }, {"key", "null"});
  expect_rejected([](SelectAttentionParams& p) { p.value.data = nullptr; }, {"value", "null"});
  expect_rejected([](SelectAttentionParams& p) { p.value.size[2] = 0; }, {"value"});
  expect_rejected([](SelectAttentionParams& p) { p.key.size[2] = 7; }, {"key", "head dim D"});
  expect_rejected([](SelectAttentionParams& p) { p.value.size[1] = 1; }, {"value", "first two dims of key"});
  expect_rejected([](SelectAttentionParams& p) { p.value.size[0] = 18; }, {"value", "first two dims of key"});
  expect_rejected([](SelectAttentionParams& p) { p.value.size[2] = 9; }, {"value head dim Dv", "<="});
}

TEST(SelectValidation, Heads) {
  expect_rejected([](SelectAttentionParams& p) { p.head_num = 2; }, {"head_num", "4"});
  expect_rejected(
      [](SelectAttentionParams& p) {
        p.key.size[1] = 3;
        p.value.size[1] = 3;
        p.topk_indices.size[1] = 3;
      },
      {"query heads", "key/value heads"});
}

TEST(SelectValidation, BlockSizeAndCount) {
  expect_rejected([](SelectAttentionParams& p) { p.select_block_size = 0; }, {"select_block_size", ">= 1"});
  expect_rejected([](SelectAttentionParams& p) { p.select_block_size = -4; }, {"select_block_size"});
  expect_rejected([](SelectAttentionParams& p) { p.select_block_count = 0; }, {"select_block_count", ">= 1"});
  expect_rejected([](SelectAttentionParams& p) { p.select_block_count = 2; }, {"topk_indices", "select_block_count"});
}

TEST(SelectValidation, TopkIndicesShapeAndDtype) {
  expect_rejected([](SelectAttentionParams& p) { p.topk_indices.size[0] = 6; }, {"topk_indices", "[T1, N2, K]"});
  expect_rejected([](SelectAttentionParams& p) { p.topk_indices.size[1] = 1; }, {"topk_indices", "[T1, N2, K]"});
  expect_rejected([](SelectAttentionParams& p) { p.topk_indices.data = nullptr; }, {"topk_indices", "null"});
  expect_rejected([](SelectAttentionParams& p) { p.index_dtype = static_cast<IndexDType>(5); }, {"topk_indices", "int32 or int64"});
}

TEST(SelectValidation, ScaleValue) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), -1e300, 1e39})
    expect_rejected([bad](SelectAttentionParams& p) { p.scale_value = bad; }, {"scale_value", "finite"});
}

TEST(SelectValidation, Outputs) {
  expect_rejected([](SelectAttentionParams& p) { p.attention_out = nullptr; }, {"attention_out"});
  expect_rejected([](SelectAttentionParams& p) { p.softmax_max = nullptr; }, {"softmax_max"});
  expect_rejected([](SelectAttentionParams& p) { p.softmax_sum = nullptr; }, {"softmax_sum"});
}

// ------------------------------------------------------------------------------------ lengths

TEST(SelectValidation, Lengths) {
  static const int64_t dec[] = {3, 2, 7}, neg[] = {-1, 3, 7}, short_q[] = {3, 3, 6}, big_kv[] = {5, 9, 20};
  static const int64_t two[] = {3, 7};
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_qlen = {}; }, {"actual_seq_qlen", "given"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_kvlen = {}; }, {"actual_seq_kvlen", "given"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_qlen.size = 0; }, {"actual_seq_qlen", "at least one"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_qlen = {dec, 3}; }, {"actual_seq_qlen", "non-decreasing"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_qlen = {neg, 3}; }, {"actual_seq_qlen", "non-negative"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_kvlen = {dec, 3}; }, {"actual_seq_kvlen", "non-decreasing"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_kvlen = {two, 2}; }, {"actual_seq_kvlen", "as many elements"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_qlen = {short_q, 3}; }, {"actual_seq_qlen[-1]", "T1"});
  expect_rejected([](SelectAttentionParams& p) { p.actual_seq_kvlen = {big_kv, 3}; }, {"actual_seq_kvlen[-1]", "T2"});
}

// ------------------------------------------------------------------------------------ indices (§7, stricter than the NPU)

// Every out-of-range index is reported with its row, head, slot and value: past the batch's blocks (block counts
// differ per batch: an index valid in another batch is rejected), below -1, int64 values beyond int32, and
// partial last blocks count as blocks.
TEST(SelectValidation, IndicesOutOfRange) {
  struct Bad {
    int64_t t, n2, j, x;
  };
  // batches: rows 0..2 (Skv 5: blocks 0, 1), rows 3..6 (Skv 9: blocks 0..2)
  const Bad bads[] = {{0, 0, 0, 2}, {2, 1, 2, 2}, {6, 1, 1, 3}, {4, 0, 0, -2}, {0, 1, 1, -1000}, {5, 0, 2, 99}};
  for (const Bad& b : bads) {
    SCase cs = base_case();
    cs.index(b.t, b.n2, b.j) = b.x;
    SCOPED_TRACE("t " + std::to_string(b.t) + " x " + std::to_string(b.x));
    const std::string where = "topk_indices[" + std::to_string(b.t) + "][" + std::to_string(b.n2) + "][" + std::to_string(b.j) +
                              "] = " + std::to_string(b.x);
    expect_rejected([](SelectAttentionParams&) {}, {where, "out of range"}, cs);
  }
  for (int64_t big : {int64_t(1) << 32, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}) {
    SCase cs = base_case();
    cs.index_dtype = IndexDType::kInt64;
    cs.index(6, 0, 0) = big;
    expect_rejected([](SelectAttentionParams&) {}, {"topk_indices[6][0][0] = " + std::to_string(big)}, cs);
  }
}

// The boundary values are accepted: -1 everywhere, the last (partial) block, Skv_b = 0 with only -1, T1 = 0.
TEST(SelectValidation, BoundaryIndicesAccepted) {
  SCase cs = base_case();
  cs.index(0, 0, 0) = 1;   // last block of batch 0 (keys 4: partial, Skv = 5)
  cs.index(6, 1, 2) = 2;   // last block of batch 2 (key 8: partial, Skv = 9)
  cs.index(1, 1, 1) = -1;
  for (SBackend b : {SBackend::kReference, SBackend::kCpu}) EXPECT_TRUE(run(cs, b).status.ok()) << backend_name(b);
  SCase z = SCase::make(DType::kF32, {2, 3}, {0, 6}, 2, 1, 4, 4, 3, 2);
  std::mt19937_64 rng(3);
  z.fill_uniform(rng, -1, 1);
  z.index(3, 0, 0) = 1;
  for (SBackend b : {SBackend::kReference, SBackend::kCpu}) EXPECT_TRUE(run(z, b).status.ok()) << backend_name(b);
  z.index(0, 0, 1) = 0;  // batch 0 has no key: only -1 is valid
  expect_rejected([](SelectAttentionParams&) {}, {"topk_indices[0][0][1] = 0", "[0, 0)"}, z);
}

// ------------------------------------------------------------------------------------ backward

TEST(SelectValidation, BackwardForwardRulesApply) {
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.fwd.head_num = 3; }, {"head_num"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.fwd.select_block_count = 4; }, {"topk_indices", "select_block_count"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.fwd.scale_value = std::nan(""); }, {"scale_value"});
}

TEST(SelectValidation, BackwardIndexOutOfRange) {
  SCase cs = base_case();
  std::mt19937_64 rng(9);
  const BwdInputs in = make_bwd_inputs(cs, rng);
  cs.index(3, 1, 0) = 3;
  for (BwdBackend b : {BwdBackend::kReference, BwdBackend::kCpu}) {
    SBoundBwd bd(cs, in);
    expect_message(call_bwd(b, bd.p), {"topk_indices[3][1][0] = 3"});
    EXPECT_TRUE(bd.outputs_untouched());
  }
}

TEST(SelectValidation, BackwardTensors) {
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.grad.size[2] = 5; }, {"grad", "[T1, N1, Dv]"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.grad.data = nullptr; }, {"grad", "null"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.attention_out.size[0] = 6; }, {"attention_out", "[T1, N1, Dv]"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.attention_out.data = nullptr; }, {"attention_out", "null"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.softmax_max.size[2] = 1; }, {"softmax_max", "[T1, N1, 8]"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.softmax_max.data = nullptr; }, {"softmax_max", "null"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.softmax_sum.size[1] = 2; }, {"softmax_sum", "[T1, N1, 8]"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.softmax_sum.data = nullptr; }, {"softmax_sum", "null"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.grad_query = nullptr; }, {"grad_query"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.grad_key = nullptr; }, {"grad_key"});
  expect_rejected_bwd([](SelectAttentionGradParams& p) { p.grad_value = nullptr; }, {"grad_value"});
}

// An unsupported ISA request is an error naming options.isa, nothing written (forward and backward).
TEST(SelectValidation, UnsupportedIsa) {
  const SCase cs = base_case();
  SBound bd(cs);
  const Status st = nsa::select_attention_cpu(bd.p, nsa::CpuOptions{99, 0});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("isa"), std::string::npos) << st.message();
  EXPECT_TRUE(bd.outputs_untouched());
  std::mt19937_64 rng(2);
  const BwdInputs in = make_bwd_inputs(cs, rng);
  SBoundBwd bb(cs, in);
  const Status sb = nsa::select_attention_backward_cpu(bb.p, nsa::CpuOptions{99, 0});
  EXPECT_FALSE(sb.ok());
  EXPECT_NE(sb.message().find("isa"), std::string::npos) << sb.message();
  EXPECT_TRUE(bb.outputs_untouched());
}

}  // namespace
}  // namespace sel_test
