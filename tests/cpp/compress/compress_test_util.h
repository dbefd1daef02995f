// Test support for the compression operator (docs/spec/compress.md): a Case owning logical fp64 values of
// input [T][N][D], weight [l][N] and grad [R][N][D] (already representable in the case's dtype), materialized
// with any memory layout (padding filled with NaN so that a backend reading it is caught); runners for every
// backend with sentinel-filled outputs; an independent fp64 model written here (scatter form: each input row
// adds into the windows that cover it, the window counts found by enumeration), and the §9 comparison rule.
//
//   Case cs = Case::make(DType::kBF16, {0, 40, 17}, /*N=*/2, /*D=*/24, /*l=*/32, /*d=*/16);  // lengths, not sums
//   cs.fill_uniform(rng, -1, 1);
//   FwdResult r = run_forward(cs, Backend::kCpu, isa, threads);
//   EXPECT_TRUE(check_forward(cs, r));     // §9 vs the model; bitwise_equal(...) vs the reference
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/numeric.h"
#include "common/test_tensors.h"
#include "nsa/compress.h"
#include "ops/compress/rounding.h"

namespace nsa_compress_test {

using nsa::CpuIsa;
using nsa::DType;
using nsa::Status;
using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

using nsa_test::kAllDtypes;
using nsa_test::supported_isas;

// ------------------------------------------------------------------------------------ rounding model
// Precision p (significant bits), smallest normal exponent emin and largest exponent emax of each dtype.
struct Format {
  int p, emin, emax;
};
inline Format format_of(DType dt) {
  switch (dt) {
    case DType::kBF16: return {8, -126, 127};
    case DType::kF16: return {11, -14, 15};
    case DType::kF32: return {24, -126, 127};
    case DType::kF64: return {53, -1022, 1023};
  }
  return {53, -1022, 1023};
}

// x (a double) rounded to the dtype's values, to nearest with ties away from zero (away) or to even, computed
// directly from x (no intermediate float): the exact rule the contract states, written independently of
// rounding.h. NaN stays NaN; values whose rounding exceeds the largest finite value give +-inf.
inline double round_model(double x, DType dt, bool away) {
  if (std::isnan(x) || std::isinf(x) || x == 0) return x;
  const Format f = format_of(dt);
  const double a = std::fabs(x);
  int e = std::ilogb(a);             // a in [2^e, 2^(e+1))
  if (e < f.emin) e = f.emin;        // subnormal spacing below the normals
  const double q = std::ldexp(a, f.p - 1 - e);  // a in units of the spacing 2^(e - p + 1): exact scaling
  const double fl = std::floor(q), frac = q - fl;  // exact (q < 2^p <= 2^53)
  double r = fl;
  if (frac > 0.5 || (frac == 0.5 && (away || std::fmod(fl, 2.0) == 1.0))) r = fl + 1;
  double y = std::ldexp(r, e - f.p + 1);
  const double max_finite = std::ldexp(std::ldexp(1.0, f.p) - 1, f.emax - f.p + 1);
  if (y > max_finite) y = std::numeric_limits<double>::infinity();
  return std::copysign(y, x);
}

// Exact value of a stored element of a dtype.
inline double as_double(const void* base, int64_t i, DType dt) { return nsa::detail::load_f64(base, i, dt); }

// x rounded to nearest even to the dtype (to make logical values representable).
inline double representable(DType dt, double x) { return round_model(x, dt, false); }

// ------------------------------------------------------------------------------------ layouts
// Memory layout of a 3-D array: order lists the logical dims from outermost to innermost; pad adds elements per
// logical dim; step is the stride of the innermost dim; zero_dim (0..2) gets stride 0 (data must then be constant
// along it); reverse_dim (0..2) is walked backwards (negative stride).
struct Layout3 {
  std::array<int, 3> order{{0, 1, 2}};
  std::array<int64_t, 3> pad{{0, 0, 0}};
  int64_t step = 1;
  int zero_dim = -1;
  int reverse_dim = -1;
};

// A 2-D layout (weight): transposed stores [N][l]; pad per logical dim; step of the innermost dim.
struct Layout2 {
  bool transposed = false;
  std::array<int64_t, 2> pad{{0, 0}};
  int64_t step = 1;
};

struct Storage3 {
  std::vector<unsigned char> bytes;
  nsa::Tensor3 view;
};
struct Storage2 {
  std::vector<unsigned char> bytes;
  nsa::Tensor2 view;
};

inline void store_value(void* base, int64_t i, double x, DType dt) { nsa::detail::store_f64(base, i, x, dt); }

inline void materialize3(const std::vector<double>& vals, const int64_t size[3], const Layout3& lay, DType dt,
                         Storage3* out) {
  int64_t ext[3], stride[3];
  for (int i = 0; i < 3; ++i) ext[i] = (lay.zero_dim == i) ? 1 : size[i] + lay.pad[i];
  int64_t s = lay.step;
  for (int idx = 2; idx >= 0; --idx) {
    const int dim = lay.order[static_cast<size_t>(idx)];
    stride[dim] = (lay.zero_dim == dim) ? 0 : s;
    s *= ext[dim];
  }
  const size_t es = nsa::dtype_size(dt);
  out->bytes.assign(static_cast<size_t>(std::max<int64_t>(s, 1)) * es, 0xFF);  // all-ones: NaN in every dtype
  int64_t origin = 0;
  if (lay.reverse_dim >= 0 && lay.reverse_dim != lay.zero_dim && size[lay.reverse_dim] > 0) {
    origin = (size[lay.reverse_dim] - 1) * stride[lay.reverse_dim];
    stride[lay.reverse_dim] = -stride[lay.reverse_dim];
  }
  for (int64_t i = 0; i < size[0]; ++i)
    for (int64_t j = 0; j < size[1]; ++j)
      for (int64_t k = 0; k < size[2]; ++k)
        store_value(out->bytes.data(), origin + i * stride[0] + j * stride[1] + k * stride[2],
                    vals[static_cast<size_t>((i * size[1] + j) * size[2] + k)], dt);
  out->view.data = out->bytes.data() + origin * static_cast<int64_t>(es);
  for (int i = 0; i < 3; ++i) {
    out->view.size[i] = size[i];
    out->view.stride[i] = stride[i];
  }
}

inline void materialize2(const std::vector<double>& vals, int64_t rows, int64_t cols, const Layout2& lay, DType dt,
                         Storage2* out) {
  const int64_t er = rows + lay.pad[0], ec = cols + lay.pad[1];
  int64_t sr, sc;
  if (lay.transposed) {
    sr = lay.step;
    sc = er * lay.step;
  } else {
    sc = lay.step;
    sr = ec * lay.step;
  }
  const size_t es = nsa::dtype_size(dt);
  out->bytes.assign(static_cast<size_t>(std::max<int64_t>(er * ec * lay.step, 1)) * es, 0xFF);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) store_value(out->bytes.data(), r * sr + c * sc, vals[static_cast<size_t>(r * cols + c)], dt);
  out->view.data = out->bytes.data();
  out->view.size[0] = rows;
  out->view.size[1] = cols;
  out->view.stride[0] = sr;
  out->view.stride[1] = sc;
}

// ------------------------------------------------------------------------------------ Case
struct Case {
  DType dtype = DType::kF32;
  int64_t N = 1, D = 1, l = 2, d = 1;
  std::vector<int64_t> lens;  // the actual_seq_len list as passed (prefix sums; may start with 0)
  std::vector<double> input, weight, grad;
  Layout3 input_layout, grad_layout;
  Layout2 weight_layout;

  // Batches of the given lengths S_b (not prefix sums).
  static Case make(DType dt, const std::vector<int64_t>& batch_lengths, int64_t N, int64_t D, int64_t l, int64_t d) {
    Case cs;
    cs.dtype = dt;
    cs.N = N;
    cs.D = D;
    cs.l = l;
    cs.d = d;
    int64_t acc = 0;
    for (int64_t s : batch_lengths) cs.lens.push_back(acc += s);
    cs.resize();
    return cs;
  }
  void resize() {
    input.assign(static_cast<size_t>(T() * N * D), 0.0);
    weight.assign(static_cast<size_t>(l * N), 0.0);
    grad.assign(static_cast<size_t>(R() * N * D), 0.0);
  }

  int64_t B() const { return static_cast<int64_t>(lens.size()); }
  int64_t T() const { return lens.empty() ? 0 : lens.back(); }
  int64_t start(int64_t b) const { return b == 0 ? 0 : lens[static_cast<size_t>(b - 1)]; }
  int64_t S(int64_t b) const { return lens[static_cast<size_t>(b)] - start(b); }
  // C_b by enumeration: windows c with c*d + l <= S_b (§3), independent of the library's formula.
  int64_t C(int64_t b) const {
    int64_t c = 0;
    while (c * d + l <= S(b)) ++c;
    return c;
  }
  int64_t row_begin(int64_t b) const {
    int64_t r = 0;
    for (int64_t i = 0; i < b; ++i) r += C(i);
    return r;
  }
  int64_t R() const { return row_begin(B()); }

  size_t ii(int64_t t, int64_t n, int64_t j) const { return static_cast<size_t>((t * N + n) * D + j); }
  size_t wi(int64_t w, int64_t n) const { return static_cast<size_t>(w * N + n); }
  size_t gi(int64_t r, int64_t n, int64_t j) const { return static_cast<size_t>((r * N + n) * D + j); }

  template <typename F>
  void fill_all(F&& gen) {
    for (double& x : input) x = representable(dtype, gen());
    for (double& x : weight) x = representable(dtype, gen());
    for (double& x : grad) x = representable(dtype, gen());
  }
  void fill_uniform(std::mt19937_64& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    fill_all([&] { return u(rng); });
  }
  void fill_ints(std::mt19937_64& rng, int lo, int hi) {
    std::uniform_int_distribution<int> u(lo, hi);
    fill_all([&] { return static_cast<double>(u(rng)); });
  }
  // Values constant along dim `dim` of input (for a stride-0 layout there).
  void make_input_constant_along(int dim) {
    for (int64_t t = 0; t < T(); ++t)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < D; ++j) {
          const int64_t t0 = dim == 0 ? 0 : t, n0 = dim == 1 ? 0 : n, j0 = dim == 2 ? 0 : j;
          input[ii(t, n, j)] = input[ii(t0, n0, j0)];
        }
  }

  std::string describe() const {
    std::ostringstream os;
    os << nsa::dtype_name(dtype) << " N=" << N << " D=" << D << " l=" << l << " d=" << d << " actual_seq_len=[";
    for (size_t i = 0; i < lens.size(); ++i) os << (i ? "," : "") << lens[i];
    os << "] R=" << R();
    return os.str();
  }
};

// ------------------------------------------------------------------------------------ independent fp64 model
// Scatter form of §4 / §6: per input row, the windows covering it found by enumeration over c < C_b.
struct Model {
  std::vector<double> out, out_abs;          // [R][N][D]
  std::vector<double> in_grad, in_grad_abs;  // [T][N][D]
  std::vector<int64_t> in_grad_terms;        // [T][N][D]
  std::vector<double> w_grad, w_grad_abs;    // [l][N]
};

inline Model make_model(const Case& cs) {
  Model m;
  const int64_t T = cs.T(), R = cs.R(), N = cs.N, D = cs.D;
  m.out.assign(static_cast<size_t>(R * N * D), 0.0);
  m.out_abs = m.out;
  m.in_grad.assign(static_cast<size_t>(T * N * D), 0.0);
  m.in_grad_abs = m.in_grad;
  m.in_grad_terms.assign(m.in_grad.size(), 0);
  m.w_grad.assign(static_cast<size_t>(cs.l * N), 0.0);
  m.w_grad_abs = m.w_grad;
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t C = cs.C(b), r0 = cs.row_begin(b), s0 = cs.start(b);
    for (int64_t pos = 0; pos < cs.S(b); ++pos)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t w = pos - c * cs.d;
        if (w < 0 || w >= cs.l) continue;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = 0; j < D; ++j) {
            const double x = cs.input[cs.ii(s0 + pos, n, j)], wt = cs.weight[cs.wi(w, n)], g = cs.grad[cs.gi(r0 + c, n, j)];
            m.out[cs.gi(r0 + c, n, j)] += wt * x;
            m.out_abs[cs.gi(r0 + c, n, j)] += std::fabs(wt * x);
            m.in_grad[cs.ii(s0 + pos, n, j)] += wt * g;
            m.in_grad_abs[cs.ii(s0 + pos, n, j)] += std::fabs(wt * g);
            m.in_grad_terms[cs.ii(s0 + pos, n, j)] += 1;
            m.w_grad[cs.wi(w, n)] += g * x;
            m.w_grad_abs[cs.wi(w, n)] += std::fabs(g * x);
          }
      }
  }
  return m;
}

// ------------------------------------------------------------------------------------ running the backends
enum class Backend { kReference, kCpu };

struct Bound {  // a Case materialized, with the params pointing at its storage and sentinel-filled outputs
  Storage3 input, grad;
  Storage2 weight;
  std::vector<int64_t> lens;
  std::vector<unsigned char> out, w_grad;
  nsa::detail::LineVector<unsigned char> in_grad;  // 64-byte aligned: the backward may stream its rows (cpu_tuning.h)
  nsa::CompressParams p;
  nsa::CompressGradParams g;
  explicit Bound(const Case& cs) {
    const int64_t isz[3] = {cs.T(), cs.N, cs.D}, gsz[3] = {cs.R(), cs.N, cs.D};
    materialize3(cs.input, isz, cs.input_layout, cs.dtype, &input);
    materialize3(cs.grad, gsz, cs.grad_layout, cs.dtype, &grad);
    materialize2(cs.weight, cs.l, cs.N, cs.weight_layout, cs.dtype, &weight);
    lens = cs.lens;
    const size_t es = nsa::dtype_size(cs.dtype);
    // 0xFF: NaN in every dtype, so an element the backend did not write is caught
    out.assign(static_cast<size_t>(std::max<int64_t>(cs.R() * cs.N * cs.D, 1)) * es, 0xFF);
    in_grad.assign(static_cast<size_t>(std::max<int64_t>(cs.T() * cs.N * cs.D, 1)) * es, 0xFF);
    w_grad.assign(static_cast<size_t>(cs.l * cs.N) * es, 0xFF);
    p.dtype = cs.dtype;
    p.input = input.view;
    p.weight = weight.view;
    p.compress_block_size = cs.l;
    p.compress_stride = cs.d;
    p.actual_seq_len.data = lens.data();
    p.actual_seq_len.size = static_cast<int64_t>(lens.size());
    p.output = out.data();
    g.fwd = p;
    g.grad = grad.view;
    g.input_grad = in_grad.data();
    g.weight_grad = w_grad.data();
  }
  bool untouched() const {
    auto all_ff = [](const auto& v) {
      return std::all_of(v.begin(), v.end(), [](unsigned char c) { return c == 0xFF; });
    };
    return all_ff(out) && all_ff(in_grad) && all_ff(w_grad);
  }
};

struct FwdResult {
  Status status;
  std::vector<unsigned char> bytes;  // the output's bytes as written
  std::vector<double> out;           // as doubles
};
struct BwdResult {
  Status status;
  std::vector<unsigned char> in_bytes, w_bytes;
  std::vector<double> in_grad, w_grad;
};

inline std::vector<double> to_doubles(const std::vector<unsigned char>& bytes, int64_t n, DType dt) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = as_double(bytes.data(), i, dt);
  return v;
}

inline FwdResult run_forward(const Case& cs, Backend be, int isa = -1, int threads = 0) {
  Bound bd(cs);
  FwdResult r;
  r.status = be == Backend::kReference ? nsa::compress_reference(bd.p) : nsa::compress_cpu(bd.p, nsa::CpuOptions{isa, threads});
  const int64_t n = cs.R() * cs.N * cs.D;
  r.bytes.assign(bd.out.begin(), bd.out.begin() + n * static_cast<int64_t>(nsa::dtype_size(cs.dtype)));
  r.out = to_doubles(bd.out, n, cs.dtype);
  return r;
}

inline BwdResult run_backward(const Case& cs, Backend be, int isa = -1, int threads = 0) {
  Bound bd(cs);
  BwdResult r;
  r.status = be == Backend::kReference ? nsa::compress_backward_reference(bd.g)
                                       : nsa::compress_backward_cpu(bd.g, nsa::CpuOptions{isa, threads});
  const int64_t ni = cs.T() * cs.N * cs.D, nw = cs.l * cs.N;
  const int64_t es = static_cast<int64_t>(nsa::dtype_size(cs.dtype));
  r.in_bytes.assign(bd.in_grad.begin(), bd.in_grad.begin() + ni * es);
  r.w_bytes.assign(bd.w_grad.begin(), bd.w_grad.begin() + nw * es);
  r.in_grad = to_doubles(r.in_bytes, ni, cs.dtype);
  r.w_grad = to_doubles(bd.w_grad, nw, cs.dtype);
  return r;
}

// ------------------------------------------------------------------------------------ comparison rules
// §9: `got` must equal the fp64 value rounded to the dtype, except within the fp32 summation error of a rounding
// boundary, where the neighbouring value is accepted too. With u = 2^-24 (2^-53 for fp64 inputs), `terms` summed
// products and A their absolute sum, any order of fp32 additions (plus, for fp32 inputs, the rounding of each
// product) is within (terms + 1) u A of the exact sum (plus the underflow of the products: terms x the smallest
// subnormal spacing). So: got in [round(v - tol), round(v + tol)] with the contract's rounding rule (monotone).
inline AssertionResult within_rule(double got, double value, double abs_sum, int64_t terms, DType dt, bool away,
                                   const std::string& what) {
  const bool f64 = dt == DType::kF64;
  const double u = f64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  const double tiny = f64 ? std::ldexp(1.0, -1074) : std::ldexp(1.0, -149);
  const double tol = (static_cast<double>(terms) + 1) * u * abs_sum * 1.0000001 + static_cast<double>(terms + 1) * tiny;
  if (std::isnan(value)) {
    if (std::isnan(got)) return AssertionSuccess();
    return AssertionFailure() << what << ": got " << got << ", the model is NaN";
  }
  double lo, hi;
  if (f64) {
    lo = value - tol;
    hi = value + tol;
  } else {
    // fp32 has no final rounding, but its sums are fp32 values: rounding the bounds to fp32 admits the same
    // results (monotone) and the overflow of a sum beyond FLT_MAX to inf
    lo = round_model(value - tol, dt, away);
    hi = round_model(value + tol, dt, away);
  }
  if (got >= lo && got <= hi) return AssertionSuccess();
  return AssertionFailure() << what << ": got " << got << ", fp64 model " << value << " (rounded "
                            << (f64 ? value : round_model(value, dt, away)) << "), accepted ["
                            << lo << ", " << hi << "], tolerance " << tol;
}

inline AssertionResult check_forward(const Case& cs, const FwdResult& r, const Model& m) {
  if (!r.status.ok()) return AssertionFailure() << "call failed: " << r.status.message();
  for (size_t i = 0; i < m.out.size(); ++i) {
    std::ostringstream what;
    what << "output flat " << i << " (row " << i / static_cast<size_t>(cs.N * cs.D) << ")";
    AssertionResult a = within_rule(r.out[i], m.out[i], m.out_abs[i], cs.l, cs.dtype, true, what.str());
    if (!a) return a;
  }
  return AssertionSuccess();
}

inline AssertionResult check_backward(const Case& cs, const BwdResult& r, const Model& m) {
  if (!r.status.ok()) return AssertionFailure() << "call failed: " << r.status.message();
  for (size_t i = 0; i < m.in_grad.size(); ++i) {
    if (m.in_grad_terms[i] == 0 && !(r.in_grad[i] == 0.0 && !std::signbit(r.in_grad[i])))
      return AssertionFailure() << "input_grad flat " << i << " is covered by no window and must be +0, got " << r.in_grad[i];
    std::ostringstream what;
    what << "input_grad flat " << i << " (row " << i / static_cast<size_t>(cs.N * cs.D) << ")";
    AssertionResult a = within_rule(r.in_grad[i], m.in_grad[i], m.in_grad_abs[i], m.in_grad_terms[i], cs.dtype, false, what.str());
    if (!a) return a;
  }
  for (size_t i = 0; i < m.w_grad.size(); ++i) {
    std::ostringstream what;
    what << "weight_grad[" << i / static_cast<size_t>(cs.N) << ", " << i % static_cast<size_t>(cs.N) << "]";
    AssertionResult a = within_rule(r.w_grad[i], m.w_grad[i], m.w_grad_abs[i], cs.R() * cs.D, cs.dtype, false, what.str());
    if (!a) return a;
  }
  return AssertionSuccess();
}

// Bytes identical, except that any NaN equals any NaN (payloads of NaN results are not part of the contract).
inline AssertionResult same_values(const std::vector<unsigned char>& a, const std::vector<unsigned char>& b, DType dt,
                                   const char* what) {
  if (a.size() != b.size()) return AssertionFailure() << what << ": sizes differ";
  const int64_t es = static_cast<int64_t>(nsa::dtype_size(dt)), n = static_cast<int64_t>(a.size()) / es;
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(a.data() + i * es, b.data() + i * es, static_cast<size_t>(es)) == 0) continue;
    const double x = as_double(a.data(), i, dt), y = as_double(b.data(), i, dt);
    if (std::isnan(x) && std::isnan(y)) continue;
    return AssertionFailure() << what << " differs at flat element " << i << ": " << x << " vs " << y;
  }
  return AssertionSuccess();
}

}  // namespace nsa_compress_test
