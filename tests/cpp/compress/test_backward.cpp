// The backward (docs/spec/compress.md §6) as the derivative of the forward, in fp64 through the CPU backend:
//   - adjoint identities of the bilinear map out = F(input, weight):
//       <grad, F(input, weight)> = <input_grad, input> = <weight_grad, weight>;
//   - central finite differences of L = <grad, F(input, weight)> along random directions of input and weight;
//   - the library's fp64 model (compress_ref::forward_model / backward_model) agrees with the test's own.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "compress_test_util.h"
#include "ops/compress/reference.h"

namespace nsa_compress_test {
namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double abs_dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += std::fabs(a[i] * b[i]);
  return s;
}

Case fp64_case(std::vector<int64_t> batches, int64_t N, int64_t D, int64_t l, int64_t d, uint64_t seed) {
  Case cs = Case::make(DType::kF64, batches, N, D, l, d);
  std::mt19937_64 rng(seed);
  cs.fill_uniform(rng, -1, 1);
  return cs;
}

TEST(CompressBackward, AdjointIdentitiesFp64) {
  const Case cases[] = {fp64_case({40, 0, 9, 35}, 2, 7, 8, 3, 1), fp64_case({64}, 1, 16, 32, 16, 2),
                        fp64_case({20, 20}, 3, 5, 4, 4, 3), fp64_case({17}, 2, 3, 17, 1, 4)};
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.describe());
    const FwdResult f = run_forward(cs, Backend::kCpu, -1, 3);
    const BwdResult b = run_backward(cs, Backend::kCpu, -1, 3);
    ASSERT_TRUE(f.status.ok() && b.status.ok());
    const double lhs = dot(cs.grad, f.out);
    const double scale = abs_dot(cs.grad, f.out) + abs_dot(b.in_grad, cs.input) + abs_dot(b.w_grad, cs.weight) + 1e-300;
    EXPECT_NEAR(dot(b.in_grad, cs.input), lhs, 1e-12 * scale);
    EXPECT_NEAR(dot(b.w_grad, cs.weight), lhs, 1e-12 * scale);
  }
}

TEST(CompressBackward, FiniteDifferencesFp64) {
  const Case cs = fp64_case({30, 5, 26}, 2, 6, 6, 4, 7);
  const BwdResult b = run_backward(cs, Backend::kCpu);
  ASSERT_TRUE(b.status.ok());
  std::mt19937_64 rng(8);
  std::normal_distribution<double> nd;
  auto loss = [&](const Case& c) { return dot(c.grad, run_forward(c, Backend::kCpu).out); };
  const double h = 1e-3;  // the loss is linear in each argument: the central difference is exact up to rounding
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<double> dx(cs.input.size()), dw(cs.weight.size());
    for (double& v : dx) v = nd(rng);
    for (double& v : dw) v = nd(rng);
    Case p = cs, m = cs;
    for (size_t i = 0; i < dx.size(); ++i) p.input[i] += h * dx[i], m.input[i] -= h * dx[i];
    EXPECT_NEAR((loss(p) - loss(m)) / (2 * h), dot(b.in_grad, dx), 1e-9 * (1 + std::fabs(dot(b.in_grad, dx))));
    p = cs;
    m = cs;
    for (size_t i = 0; i < dw.size(); ++i) p.weight[i] += h * dw[i], m.weight[i] -= h * dw[i];
    EXPECT_NEAR((loss(p) - loss(m)) / (2 * h), dot(b.w_grad, dw), 1e-9 * (1 + std::fabs(dot(b.w_grad, dw))));
  }
}

TEST(CompressBackward, LibraryModelAgreesWithTheTestModel) {
  for (DType dt : kAllDtypes) {
    Case cs = Case::make(dt, {33, 4, 50}, 3, 11, 9, 4);
    std::mt19937_64 rng(9);
    cs.fill_uniform(rng, -1, 1);
    const Model m = make_model(cs);
    Bound bd(cs);
    std::vector<double> v, a, ig, iga, wg, wga;
    ASSERT_TRUE(nsa::compress_ref::forward_model(bd.p, &v, &a).ok());
    ASSERT_TRUE(nsa::compress_ref::backward_model(bd.g, &ig, &iga, &wg, &wga).ok());
    ASSERT_EQ(v.size(), m.out.size());
    ASSERT_EQ(ig.size(), m.in_grad.size());
    ASSERT_EQ(wg.size(), m.w_grad.size());
    for (size_t i = 0; i < v.size(); ++i) {
      EXPECT_NEAR(v[i], m.out[i], 1e-13 * (1 + m.out_abs[i]));
      EXPECT_NEAR(a[i], m.out_abs[i], 1e-13 * (1 + m.out_abs[i]));
    }
    for (size_t i = 0; i < ig.size(); ++i) EXPECT_NEAR(ig[i], m.in_grad[i], 1e-13 * (1 + m.in_grad_abs[i]));
    for (size_t i = 0; i < wg.size(); ++i) EXPECT_NEAR(wg[i], m.w_grad[i], 1e-12 * (1 + m.w_grad_abs[i]));
    EXPECT_TRUE(bd.untouched()) << "the model functions write no output";
  }
}

// A gradient of zeros gives exact zeros; a grad that is 1 on a single row gives input_grad = weight on that
// window's rows and weight_grad = that window's inputs summed over j.
TEST(CompressBackward, UnitGradients) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = Case::make(dt, {26}, 1, 3, 8, 6);  // C = 4
    std::mt19937_64 rng(10);
    cs.fill_ints(rng, -4, 4);
    std::fill(cs.grad.begin(), cs.grad.end(), 0.0);
    BwdResult b = run_backward(cs, Backend::kCpu, -1, 2);
    ASSERT_TRUE(b.status.ok());
    for (double x : b.in_grad) EXPECT_EQ(x, 0.0);
    for (double x : b.w_grad) EXPECT_EQ(x, 0.0);
    for (int64_t j = 0; j < 3; ++j) cs.grad[cs.gi(2, 0, j)] = 1;  // window 2: rows [12, 20)
    b = run_backward(cs, Backend::kCpu, -1, 2);
    for (int64_t t = 0; t < 26; ++t)
      for (int64_t j = 0; j < 3; ++j)
        EXPECT_EQ(b.in_grad[cs.ii(t, 0, j)], (t >= 12 && t < 20) ? cs.weight[cs.wi(t - 12, 0)] : 0.0) << t;
    for (int64_t w = 0; w < 8; ++w) {
      double want = 0;
      for (int64_t j = 0; j < 3; ++j) want += cs.input[cs.ii(12 + w, 0, j)];
      EXPECT_EQ(b.w_grad[cs.wi(w, 0)], want);
    }
  }
}

}  // namespace
}  // namespace nsa_compress_test
