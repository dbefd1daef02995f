// Argument rules of docs/spec/window_attention.md §2-§4 and §9 (those the torch-free params carry): each violation
// is an error whose message names the argument, and no entry point (forward or backward, reference or CPU) writes
// anything when it fails. Plus the boundary values that must be accepted.
#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "wa_util.h"

namespace wa_test {
namespace {

using Mutate = std::function<void(Bound&)>;

// A valid band call: 3 batches (one empty query batch with keys), trailing zero batches, G = 2, D != Dv, one
// key/value row past the last prefix sum, the compressed mask. T1 = 9, T2 = 12.
WCase band_case() {
  WCase c = WCase::make(DType::kBF16, {4, 0, 5}, {5, 2, 5}, 4, 2, 16, 8);
  c.qlist.push_back(0);  // trailing empty batches
  c.kvlist.push_back(0);
  c.qlist.push_back(0);
  c.kvlist.push_back(0);
  c.extra_kv_rows = 1;
  c.resize();
  c.fill_uniform(6);
  c.band(4, 3, 1);
  c.compressed_mask();
  return c;
}

// A valid mode-0 call with an explicit [maxSq, maxSkv] = [5, 6] mask and a restricting band.
WCase mask_case() {
  WCase c = WCase::make(DType::kF16, {5, 3}, {6, 4}, 2, 1, 8, 8);
  c.fill_uniform(7);
  c.band(0, 2, 1);
  c.random_mask(8, 0.2, 0.0);
  return c;
}

void expect_names(const Status& st, const std::vector<std::string>& names) {
  EXPECT_FALSE(st.ok()) << "accepted";
  for (const std::string& n : names)
    EXPECT_NE(st.message().find(n), std::string::npos) << "message \"" << st.message() << "\" lacks \"" << n << "\"";
}

// Every forward and backward entry point rejects the mutated call, names each of `names`, and writes nothing.
void expect_rejected(const WCase& c, const Mutate& mutate, const std::vector<std::string>& names,
                     bool backward_too = true) {
  {
    Bound bd(c);
    mutate(bd);
    nsa::WindowAttentionShape sh;
    sh.T1 = -7;
    expect_names(nsa::validate_window_attention(bd.p, &sh), names);
    EXPECT_EQ(sh.T1, -7) << "validate wrote the shape of a rejected call";
  }
  for (Fwd b : {Fwd::kReference, Fwd::kRefFp32, Fwd::kRefFp64, Fwd::kCpu}) {
    SCOPED_TRACE("forward backend " + std::to_string(static_cast<int>(b)));
    Bound bd(c);
    mutate(bd);
    expect_names(call_forward(b, bd.p), names);
    EXPECT_TRUE(bd.forward_untouched()) << "outputs written by a rejected call";
  }
  if (!backward_too) return;
  for (Bwd b : {Bwd::kReference, Bwd::kRefFp32, Bwd::kRefFp64, Bwd::kCpu}) {
    SCOPED_TRACE("backward backend " + std::to_string(static_cast<int>(b)));
    Bound bd(c);
    bd.use_forward_outputs(c.dtype);
    mutate(bd);
    bd.g.fwd = bd.p;
    bd.g.fwd.attention_out = nullptr;  // ignored by the backward
    expect_names(call_backward(b, bd.g), names);
    EXPECT_TRUE(bd.grads_untouched()) << "gradients written by a rejected call";
  }
}

void expect_accepted(const WCase& c, const Mutate& mutate) {
  Bound bd(c);
  mutate(bd);
  const Status st = nsa::validate_window_attention(bd.p, nullptr);
  EXPECT_TRUE(st.ok()) << st.message();
  for (Fwd b : {Fwd::kReference, Fwd::kCpu}) {
    Bound x(c);
    mutate(x);
    const Status s2 = call_forward(b, x.p);
    EXPECT_TRUE(s2.ok()) << s2.message();
  }
}

TEST(WindowValidation, BaseCasesAreValid) {
  for (const WCase& c : {band_case(), mask_case()}) {
    Bound bd(c);
    nsa::WindowAttentionShape sh;
    const Status st = nsa::validate_window_attention(bd.p, &sh);
    ASSERT_TRUE(st.ok()) << st.message();
    const Oracle o = make_oracle(c);
    EXPECT_TRUE(check_forward(c, o, run_forward(c, Fwd::kCpu)));
  }
  nsa::WindowAttentionShape sh;
  Bound bd(band_case());
  ASSERT_TRUE(nsa::validate_window_attention(bd.p, &sh).ok());
  EXPECT_EQ(sh.T1, 9);
  EXPECT_EQ(sh.T2, 13);
  EXPECT_EQ(sh.N1, 4);
  EXPECT_EQ(sh.N2, 2);
  EXPECT_EQ(sh.G, 2);
  EXPECT_EQ(sh.D, 16);
  EXPECT_EQ(sh.Dv, 8);
  EXPECT_EQ(sh.B, 5);
  EXPECT_EQ(sh.max_sq, 5);
  EXPECT_EQ(sh.max_skv, 5);
  EXPECT_TRUE(sh.has_mask);
}

TEST(WindowValidation, Tensors) {
  const WCase c = band_case();
  expect_rejected(c, [](Bound& b) { b.p.dtype = static_cast<DType>(7); }, {"dtype"});
  expect_rejected(c, [](Bound& b) { b.p.query.data = nullptr; }, {"query"});
  expect_rejected(c, [](Bound& b) { b.p.key.data = nullptr; }, {"key"});
  expect_rejected(c, [](Bound& b) { b.p.value.data = nullptr; }, {"value"});
  expect_rejected(c, [](Bound& b) { b.p.query.size[2] = 0; }, {"query", "empty"});
  expect_rejected(c, [](Bound& b) { b.p.key.size[1] = 0; }, {"key", "empty"});
  expect_rejected(c, [](Bound& b) { b.p.value.size[2] = 0; }, {"value", "empty"});
  expect_rejected(c, [](Bound& b) { b.p.key.size[2] = 8; }, {"key", "head dim"});
  expect_rejected(c, [](Bound& b) { b.p.value.size[0] = 12; }, {"value", "first two dims of key"});
  expect_rejected(c, [](Bound& b) { b.p.value.size[1] = 1; }, {"value", "first two dims of key"});
  expect_rejected(c, [](Bound& b) { b.p.value.size[2] = 17; }, {"value head dim Dv"});
  expect_rejected(c, [](Bound& b) { b.p.head_num = 2; }, {"head_num"});
  expect_rejected(c, [](Bound& b) { b.p.head_num = 0; }, {"head_num"});
  expect_rejected(c, [](Bound& b) { b.p.key.size[1] = 3; b.p.value.size[1] = 3; }, {"key/value heads"});
  expect_rejected(c, [](Bound& b) { b.p.scale = std::nan(""); }, {"scale", "finite"});
  expect_rejected(c, [](Bound& b) { b.p.scale = std::numeric_limits<double>::infinity(); }, {"scale"});
  expect_rejected(c, [](Bound& b) { b.p.scale = 1e39; }, {"scale", "float32"});
}

TEST(WindowValidation, ModesAndOptions) {
  const WCase c = band_case();
  expect_rejected(c, [](Bound& b) { b.p.sparse_mode = 5; }, {"sparse_mode"});
  expect_rejected(c, [](Bound& b) { b.p.sparse_mode = -1; }, {"sparse_mode"});
  expect_rejected(c, [](Bound& b) { b.p.sparse_mode = 8; }, {"sparse_mode", "0, 1, 2, 3 or 4"});
  expect_rejected(c, [](Bound& b) { b.p.inner_precise = 3; }, {"inner_precise"});
  expect_rejected(c, [](Bound& b) { b.p.inner_precise = -1; }, {"inner_precise"});
  expect_rejected(c, [](Bound& b) { b.p.softmax_layout = static_cast<StatsLayout>(2); }, {"softmax_layout"});
  expect_rejected(c, [](Bound& b) { b.p.compressed_mask_implied = true; }, {"atten_mask", "compressed_mask_implied"});
  expect_rejected(c, [](Bound& b) {
    b.p.atten_mask.data = nullptr;
    b.p.compressed_mask_implied = true;
    b.p.sparse_mode = 1;
  }, {"compressed_mask_implied", "sparse_mode"});
  // (the forward's outputs: the backward ignores these pointers)
  expect_rejected(c, [](Bound& b) { b.p.attention_out = nullptr; }, {"attention_out"}, false);
  expect_rejected(c, [](Bound& b) { b.p.softmax_max = nullptr; }, {"softmax_max"}, false);
  expect_rejected(c, [](Bound& b) { b.p.softmax_sum = nullptr; }, {"softmax_sum"}, false);
  // accepted: the implied mask in modes 2-4; every inner_precise; both layouts
  for (int64_t mode : {2, 3, 4})
    expect_accepted(c, [mode](Bound& b) {
      b.p.atten_mask.data = nullptr;
      b.p.compressed_mask_implied = true;
      b.p.sparse_mode = mode;
    });
  expect_accepted(c, [](Bound& b) { b.p.inner_precise = 1; });
  expect_accepted(c, [](Bound& b) { b.p.inner_precise = 2; b.p.softmax_layout = StatsLayout::kTnd; });
}

TEST(WindowValidation, Lengths) {
  const WCase c = band_case();  // q = [4, 4, 9, 0, 0], kv = [5, 7, 12, 0, 0], T1 = 9, T2 = 13
  expect_rejected(c, [](Bound& b) { b.p.actual_seq_qlen.data = nullptr; }, {"actual_seq_qlen", "given"});
  expect_rejected(c, [](Bound& b) { b.p.actual_seq_kvlen.data = nullptr; }, {"actual_seq_kvlen", "given"});
  expect_rejected(c, [](Bound& b) { b.p.actual_seq_qlen.size = 0; }, {"actual_seq_qlen", "at least one"});
  expect_rejected(c, [](Bound& b) { b.p.actual_seq_kvlen.size = 4; }, {"actual_seq_kvlen", "as many elements"});
  expect_rejected(c, [](Bound& b) { b.qlist[0] = -1; }, {"actual_seq_qlen", ">= 0"});
  expect_rejected(c, [](Bound& b) { b.qlist[1] = 3; }, {"actual_seq_qlen", "non-decreasing"});
  expect_rejected(c, [](Bound& b) { b.kvlist[1] = 4; }, {"actual_seq_kvlen", "non-decreasing"});
  expect_rejected(c, [](Bound& b) { b.qlist[3] = 5; }, {"actual_seq_qlen", "non-decreasing"});  // not trailing
  expect_rejected(c, [](Bound& b) { b.qlist[2] = 8; }, {"actual_seq_qlen", "T1"});
  expect_rejected(c, [](Bound& b) { b.kvlist[2] = 14; }, {"actual_seq_kvlen", "T2"});
  expect_rejected(c, [](Bound& b) { b.kvlist[1] = 5; b.kvlist[2] = 7; b.qlist[1] = 5; }, {"actual_seq_kvlen", "batch 1"});
  expect_rejected(c, [](Bound& b) { for (auto& x : b.qlist) x = 0; }, {"actual_seq_qlen"});
  // accepted: leading empty batches, every batch's kv past its queries, kv rows past the last one
  expect_accepted(c, [](Bound& b) { b.kvlist[2] = 13; });
  expect_accepted(c, [](Bound& b) { b.kvlist[3] = 13; b.kvlist[4] = 13; });  // trailing batches with keys only
}

TEST(WindowValidation, Masks) {
  const WCase m = mask_case();  // [maxSq, maxSkv] = [5, 6]
  expect_rejected(m, [](Bound& b) { b.p.atten_mask.size[0] = 6; }, {"atten_mask", "[5, 6]"});
  expect_rejected(m, [](Bound& b) { b.p.atten_mask.size[1] = 5; }, {"atten_mask", "[maxSq, maxSkv]"});
  expect_rejected(m, [](Bound& b) { b.p.sparse_mode = 2; }, {"atten_mask", "2048"});  // not the compressed mask
  const WCase c = band_case();
  expect_rejected(c, [](Bound& b) { b.p.atten_mask.size[0] = 2047; }, {"atten_mask", "2048"});
  expect_rejected(c, [](Bound& b) { b.p.sparse_mode = 1; }, {"atten_mask", "[5, 5]"});  // mode 1 wants [maxSq, maxSkv]
  for (auto [a, col] : std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {0, 1}, {100, 99}, {100, 101}, {2047, 2047},
                                                                  {2046, 2047}, {1500, 3}}) {
    SCOPED_TRACE("flipped entry " + std::to_string(a) + "," + std::to_string(col));
    expect_rejected(c, [a = a, col = col](Bound& b) { b.mask_bytes[static_cast<size_t>(a * 2048 + col)] ^= 1; },
                    {"atten_mask", "triu", "[" + std::to_string(a) + "][" + std::to_string(col) + "]"});
  }
  // accepted: non-zero uint8 counts as 1; a transposed (column-major) compressed mask
  expect_accepted(c, [](Bound& b) {
    for (int64_t x = 1; x < 2048; ++x) b.mask_bytes[static_cast<size_t>(x)] = 7;
  });
  WCase t = band_case();
  t.mask_transposed = true;
  expect_accepted(t, [](Bound&) {});
}

TEST(WindowValidation, BandRules) {
  const WCase c = band_case();  // Sq = [4, 0, 5], Skv = [5, 2, 5]
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  // mode 4
  expect_rejected(c, [](Bound& b) { b.p.pre_tockens = -1; }, {"pre_tockens", ">= 0"});
  expect_rejected(c, [](Bound& b) { b.p.pre_tockens = 1; b.p.next_tockens = -2; }, {"next_tockens", "pre_tockens"});
  expect_rejected(c, [=](Bound& b) { b.p.pre_tockens = kMax; b.p.next_tockens = kMin; }, {"next_tockens"});
  // Sq_b - next <= Skv_b: batch 0 has Sq 4, Skv 5: next = -2 -> 6 > 5
  expect_rejected(c, [](Bound& b) { b.p.pre_tockens = 3; b.p.next_tockens = -2; }, {"next_tockens", "batch 0"});
  // batch 2 has Sq 5, Skv 5: next = -1 -> 6 > 5; next = 0 is the boundary
  expect_rejected(c, [](Bound& b) { b.p.pre_tockens = 3; b.p.next_tockens = -1; }, {"next_tockens", "batch 2"});
  expect_accepted(c, [](Bound& b) { b.p.pre_tockens = 0; b.p.next_tockens = 0; });
  // mode 3: Sq_b <= Skv_b
  expect_accepted(c, [](Bound& b) { b.p.sparse_mode = 3; });
  expect_rejected(c, [](Bound& b) { b.p.sparse_mode = 3; b.kvlist[0] = 3; }, {"sparse_mode 3", "batch 0"});
  // mode 0 with a restricting band (maxSq = 5, maxSkv = 6)
  const WCase m = mask_case();
  expect_rejected(m, [](Bound& b) { b.p.next_tockens = -1; }, {"next_tockens", ">= 0"});
  expect_rejected(m, [](Bound& b) { b.p.pre_tockens = -2; b.p.next_tockens = 1; }, {"next_tockens", "pre_tockens"});
  // Skv_b + pre >= Sq_b: batch 0 has Sq 5, Skv 6: pre = -2 (next = 2) -> 4 < 5
  expect_rejected(m, [](Bound& b) { b.p.pre_tockens = -2; b.p.next_tockens = 2; }, {"pre_tockens", "batch 0"});
  // pre = -1: batch 0 passes (5 >= 5), batch 1 (Sq 3, Skv 4) too: accepted
  expect_accepted(m, [](Bound& b) { b.p.pre_tockens = -1; b.p.next_tockens = 1; });
  expect_rejected(m, [=](Bound& b) { b.p.pre_tockens = kMin; b.p.next_tockens = kMax; }, {"pre_tockens"});
  // not restricting: pre >= maxSq and next >= maxSkv, no rule
  expect_accepted(m, [=](Bound& b) { b.p.pre_tockens = 5; b.p.next_tockens = 6; });
  expect_accepted(m, [=](Bound& b) { b.p.pre_tockens = kMax; b.p.next_tockens = kMax; });
  expect_accepted(m, [=](Bound& b) { b.p.pre_tockens = 0; b.p.next_tockens = 0; });
  // the rules hold with or without a mask (§4 decision); without one every key stays visible
  expect_rejected(c, [](Bound& b) { b.p.atten_mask.data = nullptr; b.p.pre_tockens = -1; }, {"pre_tockens"});
}

TEST(WindowValidation, BackwardArguments) {
  const WCase c = band_case();
  auto rejected_bwd = [&](const std::function<void(Bound&)>& mutate, const std::vector<std::string>& names) {
    for (Bwd b : {Bwd::kReference, Bwd::kRefFp32, Bwd::kRefFp64, Bwd::kCpu}) {
      Bound bd(c);
      ASSERT_TRUE(nsa::window_reference::forward_fp32(bd.p).ok());
      bd.use_forward_outputs(c.dtype);
      bd.g.fwd = bd.p;
      mutate(bd);
      std::fill(bd.dq.begin(), bd.dq.end(), 0xFF);
      expect_names(call_backward(b, bd.g), names);
      EXPECT_TRUE(bd.grads_untouched());
      nsa::WindowAttentionShape sh;
      sh.T1 = -3;
      EXPECT_FALSE(nsa::validate_window_attention_backward(bd.g, &sh).ok());
      EXPECT_EQ(sh.T1, -3);
    }
  };
  rejected_bwd([](Bound& b) { b.g.attention_in.data = nullptr; }, {"attention_in"});
  rejected_bwd([](Bound& b) { b.g.attention_in.size[2] = 7; }, {"attention_in", "[T1, N1, Dv]"});
  rejected_bwd([](Bound& b) { b.g.dy.data = nullptr; }, {"dy"});
  rejected_bwd([](Bound& b) { b.g.dy.size[0] = 8; }, {"dy"});
  rejected_bwd([](Bound& b) { b.g.softmax_max = nullptr; }, {"softmax_max"});
  rejected_bwd([](Bound& b) { b.g.softmax_sum = nullptr; }, {"softmax_sum"});
  rejected_bwd([](Bound& b) { b.g.grad_query = nullptr; }, {"grad_query"});
  rejected_bwd([](Bound& b) { b.g.grad_key = nullptr; }, {"grad_key"});
  rejected_bwd([](Bound& b) { b.g.grad_value = nullptr; }, {"grad_value"});
  rejected_bwd([](Bound& b) { b.g.fwd.sparse_mode = 9; }, {"sparse_mode"});
  rejected_bwd([](Bound& b) { b.g.fwd.pre_tockens = -4; }, {"pre_tockens"});
  // the forward's output pointers are not needed by the backward
  Bound bd(c);
  ASSERT_TRUE(nsa::window_reference::forward_fp32(bd.p).ok());
  bd.use_forward_outputs(c.dtype);
  bd.g.fwd = bd.p;
  bd.g.fwd.attention_out = nullptr;
  bd.g.fwd.softmax_max = nullptr;
  bd.g.fwd.softmax_sum = nullptr;
  EXPECT_TRUE(nsa::window_attention_backward_cpu(bd.g).ok());
}

TEST(WindowValidation, IsaOption) {
  Bound bd(band_case());
  const Status st = nsa::window_attention_cpu(bd.p, nsa::CpuOptions{99, 1});
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(bd.forward_untouched());
}

}  // namespace
}  // namespace wa_test
