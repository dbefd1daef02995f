// docs/spec/compress.md §7 argument rules: each violation is an error whose message names the argument, and no
// entry point (validate, reference, CPU; forward and backward) writes anything when it fails: the outputs keep
// their 0xFF fill. Plus the boundary values that must be accepted (§7 "Wider than the NPU").
#include <functional>
#include <string>
#include <vector>

#include "compress_test_util.h"

namespace nsa_compress_test {
namespace {

using Mutate = std::function<void(Bound&)>;

// A valid call using every feature: an empty first batch (leading 0), a short batch, a batch with a tail.
Case base_case() {
  Case cs;
  cs.dtype = DType::kBF16;
  cs.N = 2;
  cs.D = 8;
  cs.l = 4;
  cs.d = 2;
  cs.lens = {0, 3, 12};  // batches of 0, 3 (< l) and 9 tokens (C = 3, one tail token)
  cs.resize();
  std::mt19937_64 rng(1);
  cs.fill_uniform(rng, -1, 1);
  return cs;
}

void expect_message(const Status& st, const std::vector<std::string>& names, const char* who) {
  EXPECT_FALSE(st.ok()) << who << " accepted it";
  for (const std::string& n : names)
    EXPECT_NE(st.message().find(n), std::string::npos) << who << ": message \"" << st.message() << "\" lacks \"" << n << "\"";
}

// Every forward entry point rejects the mutated call, names each of `names`, and writes nothing.
void expect_forward_rejected(const Mutate& mutate, const std::vector<std::string>& names, const Case& cs = base_case()) {
  {
    Bound bd(cs);
    mutate(bd);
    nsa::CompressShape sh;
    sh.R = -7;
    expect_message(nsa::validate_compress(bd.p, &sh), names, "validate_compress");
    EXPECT_EQ(sh.R, -7) << "validate wrote the shape of a rejected call";
  }
  for (int which = 0; which < 3; ++which) {
    Bound bd(cs);
    mutate(bd);
    const Status st = which == 0 ? nsa::compress_reference(bd.p)
                      : which == 1 ? nsa::compress_cpu(bd.p)
                                   : nsa::compress_cpu(bd.p, nsa::CpuOptions{0, 3});
    expect_message(st, names, which == 0 ? "compress_reference" : "compress_cpu");
    EXPECT_TRUE(bd.untouched()) << "outputs written by a rejected call (" << which << ")";
  }
}

// The same for the backward (the mutation applies to the backward's params, bd.g).
void expect_backward_rejected(const Mutate& mutate, const std::vector<std::string>& names, const Case& cs = base_case()) {
  {
    Bound bd(cs);
    mutate(bd);
    nsa::CompressShape sh;
    sh.R = -7;
    expect_message(nsa::validate_compress_backward(bd.g, &sh), names, "validate_compress_backward");
    EXPECT_EQ(sh.R, -7);
  }
  for (int which = 0; which < 3; ++which) {
    Bound bd(cs);
    mutate(bd);
    const Status st = which == 0 ? nsa::compress_backward_reference(bd.g)
                      : which == 1 ? nsa::compress_backward_cpu(bd.g)
                                   : nsa::compress_backward_cpu(bd.g, nsa::CpuOptions{0, 3});
    expect_message(st, names, which == 0 ? "compress_backward_reference" : "compress_backward_cpu");
    EXPECT_TRUE(bd.untouched()) << "outputs written by a rejected call (" << which << ")";
  }
}

// Applies a forward mutation to both the forward params and the backward's copy of them.
void expect_rejected_both(const std::function<void(nsa::CompressParams&)>& m, const std::vector<std::string>& names,
                          const Case& cs = base_case()) {
  expect_forward_rejected([&](Bound& bd) { m(bd.p); }, names, cs);
  expect_backward_rejected([&](Bound& bd) { m(bd.g.fwd); }, names, cs);
}

TEST(CompressValidation, BaseCaseIsValid) {
  const Case cs = base_case();
  Bound bd(cs);
  nsa::CompressShape sh;
  ASSERT_TRUE(nsa::validate_compress(bd.p, &sh).ok());
  EXPECT_EQ(sh.T, 12);
  EXPECT_EQ(sh.N, 2);
  EXPECT_EQ(sh.D, 8);
  EXPECT_EQ(sh.B, 3);
  EXPECT_EQ(sh.R, 3);
  ASSERT_TRUE(nsa::validate_compress_backward(bd.g, &sh).ok());
  EXPECT_TRUE(nsa::compress_cpu(bd.p).ok());
  EXPECT_TRUE(nsa::compress_backward_cpu(bd.g).ok());
}

// ---- dtype
TEST(CompressValidation, Dtype) {
  expect_rejected_both([](nsa::CompressParams& p) { p.dtype = static_cast<DType>(7); }, {"dtype"});
  expect_rejected_both([](nsa::CompressParams& p) { p.dtype = static_cast<DType>(-1); }, {"dtype"});
}

// ---- input: 3-D with N > 0 and D > 0 (T may be 0), not null when T > 0
TEST(CompressValidation, InputShapeAndPointer) {
  expect_rejected_both([](nsa::CompressParams& p) { p.input.size[1] = 0; }, {"input", "N > 0"});
  expect_rejected_both([](nsa::CompressParams& p) { p.input.size[2] = 0; }, {"input", "D > 0"});
  expect_rejected_both([](nsa::CompressParams& p) { p.input.size[0] = -1; }, {"input"});
  expect_rejected_both([](nsa::CompressParams& p) { p.input.data = nullptr; }, {"input must not be null"});
  expect_rejected_both([](nsa::CompressParams& p) { p.input.size[0] = int64_t(1) << 40; p.input.size[1] = int64_t(1) << 20; p.input.size[2] = int64_t(1) << 10; },
                       {"input is too large"});
}

// ---- weight: [l, N], not null
TEST(CompressValidation, WeightShapeAndPointer) {
  expect_rejected_both([](nsa::CompressParams& p) { p.weight.size[0] = 3; }, {"weight", "[4, 2]", "[3, 2]"});
  expect_rejected_both([](nsa::CompressParams& p) { p.weight.size[1] = 1; }, {"weight", "compress_block_size, N"});
  expect_rejected_both([](nsa::CompressParams& p) { p.weight.data = nullptr; }, {"weight must not be null"});
  // weight with the shape of the old l after l changes: named as weight
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_block_size = 6; }, {"weight", "[6, 2]"});
}

// ---- l, d
TEST(CompressValidation, BlockSizeAndStride) {
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_block_size = 0; }, {"compress_block_size", ">= 1"});
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_block_size = -4; }, {"compress_block_size"});
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_stride = 0; }, {"compress_stride", ">= 1"});
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_stride = -1; }, {"compress_stride"});
  expect_rejected_both([](nsa::CompressParams& p) { p.compress_stride = 5; }, {"compress_stride (5)", "<= compress_block_size (4)"});
}

// ---- actual_seq_len
TEST(CompressValidation, Lengths) {
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.data = nullptr; p.actual_seq_len.size = 0; },
                       {"actual_seq_len must be given"});
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.size = 0; }, {"actual_seq_len", "at least one"});
  static const int64_t negative[] = {-1, 12};
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.data = negative; p.actual_seq_len.size = 2; },
                       {"actual_seq_len[0]", ">= 0"});
  static const int64_t decreasing[] = {5, 3, 12};
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.data = decreasing; p.actual_seq_len.size = 3; },
                       {"actual_seq_len", "non-decreasing", "element 1 (3)"});
  static const int64_t short_total[] = {0, 3, 11};
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.data = short_total; },
                       {"actual_seq_len[-1]", "T = input.size(0) = 12", "got 11"});
  static const int64_t long_total[] = {0, 3, 13};
  expect_rejected_both([](nsa::CompressParams& p) { p.actual_seq_len.data = long_total; }, {"actual_seq_len[-1]"});
}

// ---- outputs
TEST(CompressValidation, OutputPointers) {
  expect_forward_rejected([](Bound& bd) { bd.p.output = nullptr; }, {"output must not be null"});
  expect_backward_rejected([](Bound& bd) { bd.g.input_grad = nullptr; }, {"input_grad must not be null"});
  expect_backward_rejected([](Bound& bd) { bd.g.weight_grad = nullptr; }, {"weight_grad must not be null"});
}

// ---- grad: [R, N, D], not null
TEST(CompressValidation, GradShape) {
  expect_backward_rejected([](Bound& bd) { bd.g.grad.size[0] = 4; }, {"grad", "[3, 2, 8]", "[4, 2, 8]"});
  expect_backward_rejected([](Bound& bd) { bd.g.grad.size[0] = 2; }, {"grad", "[R, N, D]"});
  expect_backward_rejected([](Bound& bd) { bd.g.grad.size[1] = 1; }, {"grad"});
  expect_backward_rejected([](Bound& bd) { bd.g.grad.size[2] = 7; }, {"grad"});
  expect_backward_rejected([](Bound& bd) { bd.g.grad.data = nullptr; }, {"grad must not be null"});
}

// ---- the CPU options
TEST(CompressValidation, CpuIsaOption) {
  Bound bd(base_case());
  const Status st = nsa::compress_cpu(bd.p, nsa::CpuOptions{42, 1});
  expect_message(st, {"options.isa"}, "compress_cpu");
  EXPECT_TRUE(bd.untouched());
  const Status sb = nsa::compress_backward_cpu(bd.g, nsa::CpuOptions{-5, 1});
  expect_message(sb, {"options.isa"}, "compress_backward_cpu");
  EXPECT_TRUE(bd.untouched());
}

// ---- accepted: the NPU's limits do not apply (§7 "Wider than the NPU"), and empty cases
TEST(CompressValidation, WiderThanTheNpuAccepted) {
  struct Shape {
    int64_t N, D, l, d;
    std::vector<int64_t> lens;
  };
  const Shape shapes[] = {
      {1, 1, 1, 1, {1}},                 // the smallest call
      {3, 5, 7, 7, {7, 21}},            // l = d, not multiples of 16
      {2, 3, 5, 2, {0, 0, 4, 30}},      // leading zeros, short batch
      {130, 2, 129, 1, {129}},          // N > 128, l > 128
      {1, 257, 3, 1, {4}},              // D > 256
      {2, 4, 16, 16, {15}},             // R = 0 (every batch short)
      {2, 4, 16, 16, {0}},              // T = 0
  };
  for (const Shape& s : shapes) {
    Case cs;
    cs.dtype = DType::kF16;
    cs.N = s.N;
    cs.D = s.D;
    cs.l = s.l;
    cs.d = s.d;
    cs.lens = s.lens;
    cs.resize();
    std::mt19937_64 rng(2);
    cs.fill_uniform(rng, -1, 1);
    SCOPED_TRACE(cs.describe());
    Bound bd(cs);
    nsa::CompressShape sh;
    ASSERT_TRUE(nsa::validate_compress(bd.p, &sh).ok()) << nsa::validate_compress(bd.p, &sh).message();
    EXPECT_EQ(sh.R, cs.R());
    EXPECT_TRUE(nsa::compress_cpu(bd.p).ok());
    EXPECT_TRUE(nsa::compress_reference(bd.p).ok());
    EXPECT_TRUE(nsa::compress_backward_cpu(bd.g).ok());
    EXPECT_TRUE(nsa::compress_backward_reference(bd.g).ok());
  }
}

// R = 0 and T = 0: null output / input / grad / input_grad pointers are fine where nothing is read or written.
TEST(CompressValidation, NullPointersWhereNothingIsAccessed) {
  Case cs = Case::make(DType::kF32, {3, 2}, 2, 4, 4, 2);  // R = 0
  ASSERT_EQ(cs.R(), 0);
  Bound bd(cs);
  bd.p.output = nullptr;
  EXPECT_TRUE(nsa::compress_cpu(bd.p).ok());
  EXPECT_TRUE(nsa::compress_reference(bd.p).ok());
  bd.g.grad.data = nullptr;
  EXPECT_TRUE(nsa::compress_backward_cpu(bd.g).ok());
  Case empty = Case::make(DType::kF32, {0}, 2, 4, 4, 2);  // T = 0
  Bound be(empty);
  be.p.input.data = nullptr;
  be.p.output = nullptr;
  be.g.fwd = be.p;
  be.g.grad.data = nullptr;
  be.g.input_grad = nullptr;
  EXPECT_TRUE(nsa::compress_cpu(be.p).ok());
  const Status st = nsa::compress_backward_cpu(be.g);
  ASSERT_TRUE(st.ok()) << st.message();
  // weight_grad is all zeros (§5)
  for (size_t i = 0; i < be.w_grad.size(); ++i) EXPECT_EQ(be.w_grad[i], 0) << i;
}

}  // namespace
}  // namespace nsa_compress_test
