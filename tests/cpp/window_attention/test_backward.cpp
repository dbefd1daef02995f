// Backward (docs/spec/window_attention.md §7): the reference against finite differences of the fp64 forward and
// against the independent fp64 model of wa_util.h; window_attention_backward_cpu against the fp64 reference with
// the project's rule (max error <= 2 x the max error of the plain fp32 reference, plus a rounding floor per
// element) on every ISA this host runs, over the modes, varlen batches, G, D != Dv, rows without a visible key
// (inner_precise 0 and 2), strided dy, the chunked dQ path; determinism over thread counts and strip sizes; key
// rows that no query sees get zeros.
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "wa_util.h"

namespace wa_test {
namespace {

// sum_{t,h,e} dy * attention_out of the fp64 reference forward (fp64 inputs): the loss whose gradient §7 gives.
double loss(const WCase& c) {
  const FwdResult r = run_forward(c, Fwd::kRefFp64);
  EXPECT_TRUE(r.status.ok()) << r.status.message();
  double s = 0;
  for (size_t i = 0; i < r.out.size(); ++i) s += c.dy[i] * r.out[i];
  return s;
}

// Central differences of loss() for every element of q, k, v against the reference backward (fp64).
void gradcheck(WCase c) {
  SCOPED_TRACE(c.describe());
  ASSERT_EQ(c.dtype, DType::kF64);
  const BwdResult g = run_backward(c, Bwd::kRefFp64);
  ASSERT_TRUE(g.status.ok()) << g.status.message();
  const double h = 1e-6;
  auto check = [&](std::vector<double>& x, const std::vector<double>& grad, size_t valid, const char* name) {
    for (size_t i = 0; i < valid; ++i) {
      const double x0 = x[i];
      x[i] = x0 + h;
      const double lp = loss(c);
      x[i] = x0 - h;
      const double lm = loss(c);
      x[i] = x0;
      const double fd = (lp - lm) / (2 * h);
      // the backward recomputes P from float32 statistics: relative error ~1e-7 of the gradient's terms
      EXPECT_NEAR(grad[i], fd, 2e-6 * (1 + std::fabs(fd))) << name << "[" << i << "]";
    }
  };
  check(c.q, g.dq, c.q.size(), "dq");
  check(c.k, g.dk, static_cast<size_t>(c.kv_end() * c.N2 * c.D), "dk");
  check(c.v, g.dv, static_cast<size_t>(c.kv_end() * c.N2 * c.Dv), "dv");
  for (size_t i = static_cast<size_t>(c.kv_end() * c.N2 * c.D); i < g.dk.size(); ++i) EXPECT_EQ(g.dk[i], 0.0);
  for (size_t i = static_cast<size_t>(c.kv_end() * c.N2 * c.Dv); i < g.dv.size(); ++i) EXPECT_EQ(g.dv[i], 0.0);
}

WCase small(std::vector<int64_t> sq, std::vector<int64_t> skv, int64_t N1, int64_t N2, int64_t D, int64_t Dv,
            uint64_t seed, DType dt = DType::kF64) {
  WCase c = WCase::make(dt, std::move(sq), std::move(skv), N1, N2, D, Dv);
  c.extra_kv_rows = 2;
  c.resize();
  c.fill_uniform(seed, -1.5, 1.5);
  return c;
}

TEST(WindowBackwardReference, GradcheckEveryMode) {
  WCase c = small({5, 0, 4}, {7, 2, 4}, 4, 2, 3, 2, 1);
  c.compressed_mask();
  c.band(4, 2, 0);
  gradcheck(c);
  c.band(3);
  gradcheck(c);
  c.band(2);
  gradcheck(c);
  c.mask_kind = MaskKind::kNone;
  gradcheck(c);
  for (int64_t ip : {0, 2}) {  // rows without a visible key: the uniform average (ip 0) and zeros (ip 2)
    WCase m = small({6, 3}, {5, 4}, 2, 1, 3, 3, 2);
    m.inner_precise = ip;
    m.band(1);
    m.random_mask(3, 0.4, 0.0);
    for (int64_t j = 0; j < m.mask_cols; ++j) m.mask_at(1, j) = 1;  // row 1 of each batch sees nothing
    gradcheck(m);
    m.band(0, 1, 1);
    m.layout = StatsLayout::kTnd;
    gradcheck(m);
  }
}

// Exact zeros and shares of §7 for rows without a visible key.
TEST(WindowBackwardReference, RowsWithoutKeys) {
  for (int64_t ip : {0, 2}) {
    WCase c = small({4}, {3}, 2, 1, 2, 2, 5);
    c.inner_precise = ip;
    c.band(1);
    c.explicit_mask();
    for (int64_t j = 0; j < 3; ++j) c.mask_at(2, j) = 1;  // row 2 sees nothing
    std::fill(c.dy.begin(), c.dy.end(), 0.0);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t e = 0; e < 2; ++e) c.dy[c.oi(2, h, e)] = 3.0;  // gradient only through row 2
    for (Bwd b : {Bwd::kReference, Bwd::kCpu}) {
      const BwdResult g = run_backward(c, b);
      ASSERT_TRUE(g.status.ok());
      for (double x : g.dq) EXPECT_EQ(x, 0.0);
      for (double x : g.dk) EXPECT_EQ(x, 0.0);
      for (int64_t j = 0; j < 3; ++j)  // dv_j = sum over heads of dy / Skv = 2 * 3 / 3
        for (int64_t e = 0; e < 2; ++e) EXPECT_EQ(g.dv[c.vi(j, 0, e)], ip == 2 ? 0.0 : 2.0);
    }
  }
}

TEST(WindowBackwardReference, MatchesIndependentModel) {
  for (DType dt : {DType::kF32, DType::kF64}) {
    WCase c = small({9, 0, 12}, {11, 3, 12}, 4, 2, 6, 5, 7, dt);
    c.band(4, 3, 1);
    c.compressed_mask();
    const BwdResult g = run_backward(c, Bwd::kRefFp64);
    const Model md = make_model(c, true);
    ASSERT_TRUE(g.status.ok());
    const double rtol = dt == DType::kF64 ? 1e-6 : 1e-5;  // float32 statistics; fp32 attention_in
    for (size_t i = 0; i < md.dq.size(); ++i) EXPECT_NEAR(g.dq[i], md.dq[i], rtol * md.dq_abs[i] + 1e-12) << i;
    for (size_t i = 0; i < md.dk.size(); ++i) EXPECT_NEAR(g.dk[i], md.dk[i], rtol * md.dk_abs[i] + 1e-12) << i;
    for (size_t i = 0; i < md.dv.size(); ++i) EXPECT_NEAR(g.dv[i], md.dv[i], rtol * md.dv_abs[i] + 1e-12) << i;
  }
}

// ---------------------------------------------------------------------------------------------- CPU backend
// err <= 2 x max|plain - model| + ulp(model) + (acc_eps + round_eps) * magnitude, per gradient array; round_eps
// covers the bf16 rounding of P and dS on the bf16 dot-product path (§7 allows it).
AssertionResult check_grads(const WCase& c, const BwdResult& got, const BwdResult& model, const BwdResult& plain,
                            const Model& md, bool dot_path) {
  if (!got.status.ok()) return AssertionFailure() << "call failed: " << got.status.message();
  const double acc_eps = c.dtype == DType::kF64 ? DBL_EPSILON * (16 + static_cast<double>(c.max_sq() * c.G()))
                                                : 16 * FLT_EPSILON * (1 + std::log2(1.0 + c.max_sq() * c.G()));
  const double round_eps = dot_path ? std::ldexp(1.0, -7) : 0.0;
  struct Arr {
    const char* name;
    const std::vector<double>& g;
    const std::vector<double>& m;
    const std::vector<double>& p;
    const std::vector<double>& mag;
  };
  for (const Arr& a : {Arr{"dq", got.dq, model.dq, plain.dq, md.dq_abs}, Arr{"dk", got.dk, model.dk, plain.dk, md.dk_abs},
                       Arr{"dv", got.dv, model.dv, plain.dv, md.dv_abs}}) {
    double plain_err = 0;
    for (size_t i = 0; i < a.m.size(); ++i) plain_err = std::max(plain_err, std::fabs(a.p[i] - a.m[i]));
    for (size_t i = 0; i < a.m.size(); ++i) {
      if (std::isnan(a.g[i])) return AssertionFailure() << a.name << "[" << i << "] is NaN (not written?)";
      const double err = std::fabs(a.g[i] - a.m[i]);
      const double tol = 2 * plain_err + ulp_of(c.dtype, a.m[i]) + (acc_eps + round_eps) * a.mag[i];
      if (!(err <= tol))
        return AssertionFailure() << a.name << "[" << i << "]: got " << a.g[i] << ", model " << a.m[i] << ", error "
                                  << err << " > " << tol << " (plain error " << plain_err << ", magnitude " << a.mag[i]
                                  << ")";
    }
  }
  return AssertionSuccess();
}

void check_cpu_backward(const WCase& c, const nsa::window_cpu::Tuning* tu = nullptr) {
  SCOPED_TRACE(c.describe());
  const BwdResult model = run_backward(c, Bwd::kRefFp64);
  const BwdResult plain = c.dtype == DType::kF64 ? model : run_backward(c, Bwd::kRefFp32);
  ASSERT_TRUE(model.status.ok()) << model.status.message();
  const Model md = make_model(c, true);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(std::string("cpu_isa=") + nsa::cpu_isa_name(isa));
    const bool dot = c.dtype == DType::kBF16 && nsa::cpu::kernels_for(isa)->gemm.bf16 != nullptr;
    EXPECT_TRUE(check_grads(c, run_backward(c, Bwd::kCpu, static_cast<int>(isa), 0, tu), model, plain, md, dot));
  }
}

const DType kDtypes[] = {DType::kBF16, DType::kF16, DType::kF32, DType::kF64};

TEST(WindowBackwardCpu, BandAndCausalModes) {
  for (DType dt : kDtypes) {
    WCase c = small({37, 0, 70, 9}, {37, 4, 70, 12}, 4, 2, 24, 16, 10, dt);
    c.qlist.push_back(0);
    c.kvlist.push_back(0);
    c.compressed_mask();
    for (auto [pre, next] : std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {6, 0}, {200, 0}, {3, 2}}) {
      c.band(4, pre, next);
      check_cpu_backward(c);
    }
    c.band(3);
    check_cpu_backward(c);
    c.band(2);
    c.mask_kind = MaskKind::kImplied;
    c.layout = StatsLayout::kTnd;
    check_cpu_backward(c);
  }
}

TEST(WindowBackwardCpu, MasksAndRowsWithoutKeys) {
  for (DType dt : kDtypes)
    for (int64_t ip : {0, 2}) {
      WCase c = small({13, 0, 29}, {17, 3, 26}, 4, 2, 24, 8, 30 + ip, dt);
      c.inner_precise = ip;
      c.band(1);
      c.random_mask(40 + ip, 0.3, 0.2);
      check_cpu_backward(c);
      c.band(0, 4, 2);
      check_cpu_backward(c);
    }
}

TEST(WindowBackwardCpu, GroupsDimsAndStrides) {
  for (int64_t G : {1, 3, 16, 70}) {
    WCase c = G == 70 ? small({9, 5}, {9, 5}, G, 1, 16, 8, 60, DType::kBF16)
                      : small({23, 41}, {23, 41}, 2 * G, 2, 16, 8, 60 + G, DType::kBF16);
    c.band(4, 7, 0);
    c.mask_kind = MaskKind::kImplied;
    check_cpu_backward(c);
  }
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (auto [D, Dv] : std::vector<std::pair<int64_t, int64_t>>{{13, 7}, {1, 1}, {72, 65}}) {
      WCase c = small({18, 30}, {18, 30}, 2, 1, D, Dv, 70 + D, dt);
      c.band(3);
      c.compressed_mask();
      c.q_layout.order = {1, 0, 2};
      c.k_layout.step = 2;
      c.v_layout.order = {2, 1, 0};
      c.dy_layout.order = {1, 2, 0};
      c.dy_layout.pad = {0, 1, 2};
      check_cpu_backward(c);
    }
}

TEST(WindowBackwardCpu, ChunkedQueryStrips) {
  nsa::window_cpu::Tuning tu;
  tu.tile_rows = 16;
  tu.chunk_keys = 64;
  tu.strip_rows = 40;
  tu.strip_keys = 64;
  for (DType dt : {DType::kBF16, DType::kF32}) {
    WCase c = small({150, 0, 97}, {170, 10, 97}, 4, 2, 16, 16, 90, dt);
    c.band(3);
    c.compressed_mask();
    check_cpu_backward(c, &tu);
    c.band(1);
    c.random_mask(91, 0.3, 0.1);
    check_cpu_backward(c, &tu);
  }
}

TEST(WindowBackwardCpu, ThreadCountsAndStripsBitwise) {
  nsa::window_cpu::Tuning a;
  a.strip_tokens = 4;
  a.strip_keys = 64;
  nsa::window_cpu::Tuning b;
  b.chunk_keys = 64;
  b.strip_rows = 16;
  for (DType dt : {DType::kBF16, DType::kF32}) {
    WCase c = small({90, 0, 61, 33}, {90, 6, 80, 33}, 8, 2, 32, 16, 100, dt);
    c.band(4, 70, 0);
    c.compressed_mask();
    const BwdResult base = run_backward(c, Bwd::kCpu, -1, 1);
    ASSERT_TRUE(base.status.ok());
    for (int threads : {1, 2, 3, 7})
      for (const nsa::window_cpu::Tuning* tu : std::vector<const nsa::window_cpu::Tuning*>{nullptr, &a, &b}) {
        const BwdResult r = run_backward(c, Bwd::kCpu, -1, threads, tu);
        ASSERT_TRUE(r.status.ok());
        EXPECT_TRUE(r.bytes == base.bytes) << "threads " << threads;
      }
  }
}

TEST(WindowBackwardCpu, UnseenKeysGetZeros) {
  // Batch 1 has keys but no queries, batch 0's first keys are seen by nobody (mode 4 with o = 20, pre 2), and two
  // rows lie past max(actual_seq_kvlen): all of them get dk = dv = 0.
  WCase c = small({5, 0}, {25, 6}, 2, 1, 8, 8, 110, DType::kBF16);
  c.band(4, 2, 0);
  c.compressed_mask();
  const BwdResult g = run_backward(c, Bwd::kCpu);
  ASSERT_TRUE(g.status.ok());
  for (int64_t r = 0; r < c.T2(); ++r) {
    const bool seen = r >= 18 && r < 25;
    if (seen) continue;
    for (int64_t d = 0; d < 8; ++d) {
      EXPECT_EQ(g.dk[c.ki(r, 0, d)], 0.0) << "row " << r;
      EXPECT_EQ(g.dv[c.vi(r, 0, d)], 0.0) << "row " << r;
    }
  }
  check_cpu_backward(c);
}

}  // namespace
}  // namespace wa_test
