// Test support for the C++ suite: a Case builder owning every input buffer, runners for the
// backends, an independent fp64 model of the selection scores (docs/spec/compress_attention.md §3.5-3.8), and the comparison
// rules of docs/CONTRIBUTING.md's test table.
//
//   Case cs = Case::make(DType::kBF16, /*sq=*/{5, 0, 9}, /*c=*/{7, 4, 12}, N1, N2, D, D2, l, d, lp, K);
//   cs.fill_uniform(rng, -1, 1);
//   Oracle o = make_oracle(cs);                  // forward_fp64 (model), forward_fp32 (plain), scores
//   Result r = run(cs, Backend::kCpu, isa);      // outputs converted for comparison
//   EXPECT_TRUE(check_all(cs, o, r));
//
// Values are stored logically as double (already rounded to the case dtype) in row-major
// [T][N1][D] / [T2][N2][D] / [T2][N2][D2]; a Bound materializes them in the dtype with the
// requested memory layout (common/test_tensors.h, shared with the other operators' tests: permuted dims,
// padding, inner step, zero strides). Padding is filled with NaN (inputs) or 0xFF (masks: "masked"/"forced")
// so that a backend reading it is caught.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/numeric.h"
#include "common/test_tensors.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/reference.h"

namespace nsa_test {

using nsa::CompressAttentionParams;
using nsa::CpuIsa;
using nsa::DType;
using nsa::Status;

// ------------------------------------------------------------------------------------ Case

struct Case {
  DType dtype = DType::kF32;
  int64_t N1 = 1, N2 = 1, D = 16, D2 = 16;
  int64_t l = 32, d = 16, lp = 64, K = 1;
  double scale = 1.0;
  std::vector<int64_t> sq, c;  // per-batch Sq_b and C_b (the prefix sums are derived)
  int64_t extra_kv_rows = 0;   // key/value rows past the last prefix sum; filled with NaN (ignored, §2)
  bool pass_sel = false;       // give actual_sel_seq_kvlen (the correct prefix sums)

  std::vector<double> q, k, v;  // logical row-major values, representable in dtype
  bool has_atten = false, has_topk = false;
  std::vector<uint8_t> atten, topk;  // [maxSq][maxC], [maxSq][maxSel]

  Layout3 q_layout, k_layout, v_layout;
  Layout2 atten_layout, topk_layout;

  static Case make(DType dt, std::vector<int64_t> sq, std::vector<int64_t> c, int64_t N1, int64_t N2, int64_t D,
                   int64_t D2, int64_t l = 32, int64_t d = 16, int64_t lp = 64, int64_t K = 1) {
    Case cs;
    cs.dtype = dt;
    cs.sq = std::move(sq);
    cs.c = std::move(c);
    cs.N1 = N1;
    cs.N2 = N2;
    cs.D = D;
    cs.D2 = D2;
    cs.l = l;
    cs.d = d;
    cs.lp = lp;
    cs.K = K;
    cs.scale = 1.0 / std::sqrt(static_cast<double>(D));
    cs.resize();
    return cs;
  }

  // (Re)allocates q/k/v with zeros (extra key/value rows NaN) after a change of sizes.
  void resize() {
    q.assign(static_cast<size_t>(T() * N1 * D), 0.0);
    k.assign(static_cast<size_t>(T2() * N2 * D), 0.0);
    v.assign(static_cast<size_t>(T2() * N2 * D2), 0.0);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (int64_t r = T2() - extra_kv_rows; r < T2(); ++r) {
      for (int64_t n = 0; n < N2; ++n) {
        for (int64_t j = 0; j < D; ++j) k[static_cast<size_t>((r * N2 + n) * D + j)] = nan;
        for (int64_t j = 0; j < D2; ++j) v[static_cast<size_t>((r * N2 + n) * D2 + j)] = nan;
      }
    }
    if (has_atten) atten.assign(static_cast<size_t>(max_sq() * max_c()), 0);
    if (has_topk) topk.assign(static_cast<size_t>(max_sq() * max_sel()), 0);
  }

  // Derived sizes.
  int64_t B() const { return static_cast<int64_t>(sq.size()); }
  int64_t T() const { return std::accumulate(sq.begin(), sq.end(), int64_t(0)); }
  int64_t T2() const { return std::accumulate(c.begin(), c.end(), int64_t(0)) + extra_kv_rows; }
  int64_t M() const { return lp / d; }
  int64_t N() const { return l / d; }
  int64_t G() const { return N1 / N2; }
  int64_t q_begin(int64_t b) const { return std::accumulate(sq.begin(), sq.begin() + b, int64_t(0)); }
  int64_t c_begin(int64_t b) const { return std::accumulate(c.begin(), c.begin() + b, int64_t(0)); }
  int64_t sel(int64_t b) const { return (c[static_cast<size_t>(b)] + M() - 1) / M(); }
  int64_t max_sq() const { return sq.empty() ? 0 : *std::max_element(sq.begin(), sq.end()); }
  int64_t max_c() const { return c.empty() ? 0 : *std::max_element(c.begin(), c.end()); }
  int64_t max_sel() const { return (max_c() + M() - 1) / M(); }
  int64_t min_sel() const {
    int64_t m = INT64_MAX;
    for (int64_t b = 0; b < B(); ++b) m = std::min(m, sel(b));
    return m;
  }
  // Batch of query row t.
  int64_t batch_of(int64_t t) const {
    int64_t acc = 0;
    for (int64_t b = 0; b < B(); ++b) {
      acc += sq[static_cast<size_t>(b)];
      if (t < acc) return b;
    }
    return -1;
  }

  // Element access (logical values).
  size_t qi(int64_t t, int64_t h, int64_t j) const { return static_cast<size_t>((t * N1 + h) * D + j); }
  size_t ki(int64_t r, int64_t n, int64_t j) const { return static_cast<size_t>((r * N2 + n) * D + j); }
  size_t vi(int64_t r, int64_t n, int64_t j) const { return static_cast<size_t>((r * N2 + n) * D2 + j); }
  void set_q(int64_t t, int64_t h, int64_t j, double x) { q[qi(t, h, j)] = round_to(dtype, x); }
  void set_k(int64_t r, int64_t n, int64_t j, double x) { k[ki(r, n, j)] = round_to(dtype, x); }
  void set_v(int64_t r, int64_t n, int64_t j, double x) { v[vi(r, n, j)] = round_to(dtype, x); }
  uint8_t& atten_at(int64_t s, int64_t cc) { return atten[static_cast<size_t>(s * max_c() + cc)]; }
  uint8_t& topk_at(int64_t s, int64_t kk) { return topk[static_cast<size_t>(s * max_sel() + kk)]; }
  uint8_t atten_at(int64_t s, int64_t cc) const { return atten[static_cast<size_t>(s * max_c() + cc)]; }
  uint8_t topk_at(int64_t s, int64_t kk) const { return topk[static_cast<size_t>(s * max_sel() + kk)]; }

  // Fills: every valid key/value row (not the extra NaN rows) and every query row.
  template <typename F>
  void fill_all(F&& gen) {
    const int64_t valid = T2() - extra_kv_rows;
    for (int64_t t = 0; t < T(); ++t)
      for (int64_t h = 0; h < N1; ++h)
        for (int64_t j = 0; j < D; ++j) set_q(t, h, j, gen());
    for (int64_t r = 0; r < valid; ++r)
      for (int64_t n = 0; n < N2; ++n) {
        for (int64_t j = 0; j < D; ++j) set_k(r, n, j, gen());
        for (int64_t j = 0; j < D2; ++j) set_v(r, n, j, gen());
      }
  }
  void fill_uniform(std::mt19937_64& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    fill_all([&] { return u(rng); });
  }
  void fill_ints(std::mt19937_64& rng, int lo, int hi) {
    std::uniform_int_distribution<int> u(lo, hi);
    fill_all([&] { return static_cast<double>(u(rng)); });
  }

  // Masks.
  void enable_atten_mask() {
    has_atten = true;
    atten.assign(static_cast<size_t>(max_sq() * max_c()), 0);
  }
  void enable_topk_mask() {
    has_topk = true;
    topk.assign(static_cast<size_t>(max_sq() * max_sel()), 0);
  }
  // docs/spec/compress_attention.md §9: atten_mask[t][i] = 1 when i*d + l - 1 > t.
  void set_causal_mask() {
    enable_atten_mask();
    for (int64_t s = 0; s < max_sq(); ++s)
      for (int64_t i = 0; i < max_c(); ++i) atten_at(s, i) = (i * d + l - 1 > s) ? 1 : 0;
  }
  // Each entry masked with probability p; each row fully masked with probability p_full.
  void set_random_mask(std::mt19937_64& rng, double p, double p_full) {
    enable_atten_mask();
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t s = 0; s < max_sq(); ++s) {
      const bool full = u(rng) < p_full;
      for (int64_t i = 0; i < max_c(); ++i) atten_at(s, i) = (full || u(rng) < p) ? 1 : 0;
    }
  }
  // A sliding band: row s sees the compressed tokens c with e - width < c <= e, e = s*C/Sq + shift
  // (C, Sq: the maxima), so consecutive rows see windows that start further right.
  void set_band_mask(int64_t width, int64_t shift = 0) {
    enable_atten_mask();
    for (int64_t s = 0; s < max_sq(); ++s) {
      const int64_t end = s * max_c() / std::max<int64_t>(1, max_sq()) + shift;
      for (int64_t i = 0; i < max_c(); ++i) atten_at(s, i) = (i <= end && i > end - width) ? 0 : 1;
    }
  }
  // docs/spec/compress_attention.md §9 convention: block 0 and the local blocks s/lp, s/lp - 1 forced.
  void set_local_topk_mask() {
    enable_topk_mask();
    for (int64_t s = 0; s < max_sq(); ++s) {
      topk_at(s, 0) = 1;
      for (int64_t kk : {s / lp, s / lp - 1})
        if (kk >= 0 && kk < max_sel()) topk_at(s, kk) = 1;
    }
  }
  void set_random_topk_mask(std::mt19937_64& rng, double p) {
    enable_topk_mask();
    std::uniform_real_distribution<double> u(0, 1);
    for (auto& x : topk) x = u(rng) < p ? 1 : 0;
  }

  std::string describe() const {
    std::ostringstream os;
    os << nsa::dtype_name(dtype) << " N1=" << N1 << " N2=" << N2 << " D=" << D << " D2=" << D2 << " (l,d,l')=(" << l
       << "," << d << "," << lp << ") K=" << K << " scale=" << scale << " Sq=[";
    for (size_t i = 0; i < sq.size(); ++i) os << (i ? "," : "") << sq[i];
    os << "] C=[";
    for (size_t i = 0; i < c.size(); ++i) os << (i ? "," : "") << c[i];
    os << "] extra_kv=" << extra_kv_rows << " atten=" << has_atten << " topk=" << has_topk
       << " sel_list=" << pass_sel;
    return os.str();
  }
};

// ------------------------------------------------------------------------------------ Bound

// Every buffer of one call, materialized from a Case, and the params pointing at them. Outputs are
// filled with 0xFF bytes (NaN / -1), so a missing write and any write at all are both detectable.
struct Bound {
  Storage3 qs, ks, vs;
  Storage2 am, tm;
  std::vector<int64_t> qlen, clen, sellen;
  std::vector<unsigned char> out;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
  CompressAttentionParams p;

  explicit Bound(const Case& cs) {
    const int64_t qsz[3] = {cs.T(), cs.N1, cs.D}, ksz[3] = {cs.T2(), cs.N2, cs.D}, vsz[3] = {cs.T2(), cs.N2, cs.D2};
    materialize3(cs.q, qsz, cs.q_layout, cs.dtype, &qs);
    materialize3(cs.k, ksz, cs.k_layout, cs.dtype, &ks);
    materialize3(cs.v, vsz, cs.v_layout, cs.dtype, &vs);
    p.dtype = cs.dtype;
    p.query = qs.view;
    p.key = ks.view;
    p.value = vs.view;
    p.scale_value = cs.scale;
    p.head_num = cs.N1;
    p.compress_block_size = cs.l;
    p.compress_stride = cs.d;
    p.select_block_size = cs.lp;
    p.select_block_count = cs.K;
    if (cs.has_atten) {
      materialize2(cs.atten, cs.max_sq(), cs.max_c(), cs.atten_layout, &am);
      p.atten_mask = am.view;
    }
    if (cs.has_topk) {
      materialize2(cs.topk, cs.max_sq(), cs.max_sel(), cs.topk_layout, &tm);
      p.topk_mask = tm.view;
    }
    int64_t aq = 0, ac = 0, as = 0;
    for (int64_t b = 0; b < cs.B(); ++b) {
      qlen.push_back(aq += cs.sq[static_cast<size_t>(b)]);
      clen.push_back(ac += cs.c[static_cast<size_t>(b)]);
      sellen.push_back(as += cs.sel(b));
    }
    p.actual_seq_qlen = {qlen.data(), static_cast<int64_t>(qlen.size())};
    p.actual_cmp_seq_kvlen = {clen.data(), static_cast<int64_t>(clen.size())};
    if (cs.pass_sel) p.actual_sel_seq_kvlen = {sellen.data(), static_cast<int64_t>(sellen.size())};
    const size_t T = static_cast<size_t>(cs.T());
    out.assign(std::max<size_t>(1, T * cs.N1 * cs.D2 * nsa::dtype_size(cs.dtype)), 0xFF);
    topk.assign(std::max<size_t>(1, T * cs.N2 * cs.K), -1);
    smax.assign(std::max<size_t>(1, T * cs.N1 * 8), std::numeric_limits<float>::quiet_NaN());
    ssum.assign(smax.size(), std::numeric_limits<float>::quiet_NaN());
    std::memset(smax.data(), 0xFF, smax.size() * 4);
    std::memset(ssum.data(), 0xFF, ssum.size() * 4);
    p.attention_out = out.data();
    p.topk_indices = topk.data();
    p.softmax_max = smax.data();
    p.softmax_sum = ssum.data();
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;

  // True when no output byte differs from the 0xFF fill.
  bool outputs_untouched() const {
    auto all_ff = [](const void* p, size_t n) {
      const unsigned char* c = static_cast<const unsigned char*>(p);
      return std::all_of(c, c + n, [](unsigned char x) { return x == 0xFF; });
    };
    return all_ff(out.data(), out.size()) && all_ff(topk.data(), topk.size() * 4) &&
           all_ff(smax.data(), smax.size() * 4) && all_ff(ssum.data(), ssum.size() * 4);
  }
};

// ------------------------------------------------------------------------------------ running

enum class Backend { kReference, kRefFp32, kRefFp64, kCpu };

inline const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kReference: return "compress_attention_reference";
    case Backend::kRefFp32: return "reference::forward_fp32";
    case Backend::kRefFp64: return "reference::forward_fp64";
    case Backend::kCpu: return "compress_attention_cpu";
  }
  return "?";
}

inline Status call(Backend b, const CompressAttentionParams& p, const nsa::CpuOptions& options = {}) {
  switch (b) {
    case Backend::kReference: return nsa::compress_attention_reference(p);
    case Backend::kRefFp32: return nsa::reference::forward_fp32(p);
    case Backend::kRefFp64: return nsa::reference::forward_fp64(p);
    case Backend::kCpu: return nsa::compress_attention_cpu(p, options);
  }
  return Status::Error("bad backend");
}

// Outputs of one call: attention_out converted to double (plus its raw bytes), topk, statistics.
struct Result {
  Status status;
  std::vector<double> out;
  std::vector<unsigned char> out_bytes;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
};

inline Result collect(const Case& cs, const Bound& bd, Status st) {
  Result r;
  r.status = st;
  const size_t n = static_cast<size_t>(cs.T() * cs.N1 * cs.D2);
  r.out.resize(n);
  for (size_t i = 0; i < n; ++i) r.out[i] = nsa::detail::load_f64(bd.out.data(), static_cast<int64_t>(i), cs.dtype);
  r.out_bytes.assign(bd.out.begin(), bd.out.begin() + static_cast<std::ptrdiff_t>(n * nsa::dtype_size(cs.dtype)));
  r.topk.assign(bd.topk.begin(), bd.topk.begin() + cs.T() * cs.N2 * cs.K);
  r.smax.assign(bd.smax.begin(), bd.smax.begin() + cs.T() * cs.N1 * 8);
  r.ssum.assign(bd.ssum.begin(), bd.ssum.begin() + cs.T() * cs.N1 * 8);
  return r;
}

// isa / num_threads (CpuOptions) apply to the CPU backend (the others ignore them).
inline Result run(const Case& cs, Backend b, int cpu_isa = -1, int num_threads = 0) {
  Bound bd(cs);
  const Status st = call(b, bd.p, nsa::CpuOptions{cpu_isa, num_threads});
  return collect(cs, bd, st);
}
inline Result run_cpu(const Case& cs, CpuIsa isa, int num_threads = 0) {
  return run(cs, Backend::kCpu, static_cast<int>(isa), num_threads);
}

// Offset of the statistic of (query row t, head h) in the §4 per-batch layout (first of 8 copies).
inline int64_t stat_index(const Case& cs, int64_t t, int64_t h) {
  const int64_t b = cs.batch_of(t);
  const int64_t qb = cs.q_begin(b);
  return 8 * cs.N1 * qb + (h * cs.sq[static_cast<size_t>(b)] + (t - qb)) * 8;
}

// ------------------------------------------------------------------------------------ fp64 model

// Written independently of src/ops/compress_attention/reference_*.cpp: the §3 steps in double, keeping what the checks need.
struct Model {
  // Group scores per (t, n2): Sel_b values; forced blocks are +inf (§3.7).
  std::vector<std::vector<double>> scores;
  // Relative tolerance of the scores of (t, n2) (see make_model).
  std::vector<double> score_rtol;
  // Per (t, h): |scale| * max_c sum_j |q_j k_cj| (bound of the dot-product rounding error / D eps).
  std::vector<double> dot_abs;
  // Per (t, h, j): sum_c |cast(P_c)| |v_cj| (the magnitude the P.V sum accumulates).
  std::vector<double> pv_abs;
  // Per (t, h, j), bf16/fp16 only: max_c ulp_dtype(P_c) |v_cj|, what one P_c rounding to the other
  // side of a dtype boundary (§3.4 cast) changes in the output. A P that differs from the model's
  // by an fp32 ulp (another exp, another summation order) flips such a rounding now and then.
  std::vector<double> pv_flip;
  // Per (t, h): whether every atten_mask entry of the row is set (§5).
  std::vector<char> fully_masked;
};

inline Model make_model(const Case& cs) {
  Model md;
  const int64_t T = cs.T(), N1 = cs.N1, N2 = cs.N2, G = cs.G(), D = cs.D, D2 = cs.D2, M = cs.M(), N = cs.N();
  md.scores.assign(static_cast<size_t>(T * N2), {});
  md.score_rtol.assign(static_cast<size_t>(T * N2), 0.0);
  md.dot_abs.assign(static_cast<size_t>(T * N1), 0.0);
  md.pv_abs.assign(static_cast<size_t>(T * N1 * D2), 0.0);
  md.pv_flip.assign(static_cast<size_t>(T * N1 * D2), 0.0);
  const bool low = cs.dtype == DType::kBF16 || cs.dtype == DType::kF16;
  md.fully_masked.assign(static_cast<size_t>(T * N1), 0);
  const double scale = static_cast<float>(cs.scale);
  std::vector<double> w(static_cast<size_t>(M + N - 1));
  for (int64_t i = 0; i < M + N - 1; ++i) w[static_cast<size_t>(i)] = static_cast<double>(std::min({i + 1, N, M + N - 1 - i}));
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t C = cs.c[static_cast<size_t>(b)], Sel = cs.sel(b), c0 = cs.c_begin(b);
    std::vector<double> S(static_cast<size_t>(C)), P(static_cast<size_t>(C));
    for (int64_t s = 0; s < cs.sq[static_cast<size_t>(b)]; ++s) {
      const int64_t t = cs.q_begin(b) + s;
      for (int64_t n2 = 0; n2 < N2; ++n2) {
        std::vector<double> total(static_cast<size_t>(Sel), 0.0);
        double worst_dot = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          double dabs = 0;
          bool all_masked = true;
          for (int64_t cc = 0; cc < C; ++cc) {
            double dot = 0, aa = 0;
            for (int64_t j = 0; j < D; ++j) {
              dot += cs.q[cs.qi(t, h, j)] * cs.k[cs.ki(c0 + cc, n2, j)];
              aa += std::fabs(cs.q[cs.qi(t, h, j)] * cs.k[cs.ki(c0 + cc, n2, j)]);
            }
            dabs = std::max(dabs, aa * std::fabs(scale));
            S[static_cast<size_t>(cc)] = dot * scale;
            if (cs.has_atten && cs.atten_at(s, cc)) S[static_cast<size_t>(cc)] = -static_cast<double>(FLT_MAX);
            else all_masked = false;
          }
          md.dot_abs[static_cast<size_t>(t * N1 + h)] = dabs;
          md.fully_masked[static_cast<size_t>(t * N1 + h)] = all_masked;
          worst_dot = std::max(worst_dot, dabs);
          const double m = *std::max_element(S.begin(), S.end());
          double lsum = 0;
          for (int64_t cc = 0; cc < C; ++cc) lsum += std::exp(S[static_cast<size_t>(cc)] - m);
          for (int64_t cc = 0; cc < C; ++cc) P[static_cast<size_t>(cc)] = std::exp(S[static_cast<size_t>(cc)] - m) / lsum;
          for (int64_t j = 0; j < D2; ++j) {
            double a = 0, f = 0;
            for (int64_t cc = 0; cc < C; ++cc) {
              const double pc = P[static_cast<size_t>(cc)], vc = std::fabs(cs.v[cs.vi(c0 + cc, n2, j)]);
              a += std::fabs(round_to(cs.dtype, pc)) * vc;
              if (low) f = std::max(f, ulp_of(cs.dtype, pc) * vc);
            }
            md.pv_abs[static_cast<size_t>((t * N1 + h) * D2 + j)] = a;
            md.pv_flip[static_cast<size_t>((t * N1 + h) * D2 + j)] = f;
          }
          // §3.5 in the weight form: score_h[k] = sum_i w_i P[M(k+1) - i].
          for (int64_t kk = 0; kk < Sel; ++kk)
            for (int64_t i = 0; i < M + N - 1; ++i) {
              const int64_t x = M * (kk + 1) - i;
              if (x >= 0 && x < C) total[static_cast<size_t>(kk)] += w[static_cast<size_t>(i)] * P[static_cast<size_t>(x)];
            }
        }
        for (int64_t kk = 0; kk < Sel; ++kk)
          if (cs.has_topk && cs.topk_at(s, kk)) total[static_cast<size_t>(kk)] = std::numeric_limits<double>::infinity();
        md.scores[static_cast<size_t>(t * N2 + n2)] = std::move(total);
        // fp32 P carries a relative error of about the absolute error of S - m (dot products: at most
        // D eps |q||k| each) plus a few eps from exp, the sum and the division: 1e-5 covers the
        // latter generously; the dot-product bound is added for rows with large scores.
        md.score_rtol[static_cast<size_t>(t * N2 + n2)] = 1e-5 + 4.0 * static_cast<double>(D) * FLT_EPSILON * worst_dot;
      }
    }
  }
  return md;
}

// ------------------------------------------------------------------------------------ checks

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

// Structural checks of a successful call: status ok, every output written once with sane values
// (topk in [0, Sel_b) without duplicates, the 8 copies of each statistic identical, no NaN out).
inline AssertionResult check_complete(const Case& cs, const Result& r) {
  if (!r.status.ok()) return AssertionFailure() << "call failed: " << r.status.message();
  for (int64_t t = 0; t < cs.T(); ++t) {
    const int64_t Sel = cs.sel(cs.batch_of(t));
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      std::vector<char> seen(static_cast<size_t>(Sel), 0);
      for (int64_t i = 0; i < cs.K; ++i) {
        const int32_t x = r.topk[static_cast<size_t>((t * cs.N2 + n2) * cs.K + i)];
        if (x < 0 || x >= Sel)
          return AssertionFailure() << "topk_indices[" << t << "][" << n2 << "][" << i << "] = " << x
                                    << " outside [0, " << Sel << ")";
        if (seen[static_cast<size_t>(x)]++)
          return AssertionFailure() << "topk_indices[" << t << "][" << n2 << "] repeats block " << x;
      }
    }
    for (int64_t h = 0; h < cs.N1; ++h) {
      const int64_t o = stat_index(cs, t, h);
      for (int i = 1; i < 8; ++i)
        if (std::memcmp(&r.smax[static_cast<size_t>(o)], &r.smax[static_cast<size_t>(o + i)], 4) ||
            std::memcmp(&r.ssum[static_cast<size_t>(o)], &r.ssum[static_cast<size_t>(o + i)], 4))
          return AssertionFailure() << "statistics of (t=" << t << ", h=" << h << ") differ between copies 0 and " << i;
      if (std::isnan(r.smax[static_cast<size_t>(o)]) || std::isnan(r.ssum[static_cast<size_t>(o)]))
        return AssertionFailure() << "statistic of (t=" << t << ", h=" << h << ") is NaN (not written?)";
      for (int64_t j = 0; j < cs.D2; ++j)
        if (std::isnan(r.out[static_cast<size_t>((t * cs.N1 + h) * cs.D2 + j)]))
          return AssertionFailure() << "attention_out[" << t << "][" << h << "][" << j << "] is NaN (not written?)";
    }
  }
  return AssertionSuccess();
}

// attention_out vs the fp64 model (docs/CONTRIBUTING.md): max error <= 2 x the max error of the plain same-dtype
// implementation + a rounding floor per element: one ulp of the dtype at the value's magnitude,
// plus 16 eps of the accumulation (fp32, or fp64 for fp64 inputs) times sum_c |P_c v_c| (the terms'
// magnitude, which bounds a different summation order or exp implementation), plus for bf16/fp16
// two flips of the §3.4 rounding of P (2 max_c ulp(P_c) |v_c|, see Model::pv_flip).
inline AssertionResult check_out(const Case& cs, const Result& got, const Result& model, const Result& plain,
                                 const Model& md) {
  double plain_err = 0;
  for (size_t i = 0; i < model.out.size(); ++i) plain_err = std::max(plain_err, std::fabs(plain.out[i] - model.out[i]));
  const double acc_eps = cs.dtype == DType::kF64 ? DBL_EPSILON * (16 + static_cast<double>(cs.max_c())) : 16 * FLT_EPSILON;
  double worst = -1;
  size_t wi = 0;
  for (size_t i = 0; i < model.out.size(); ++i) {
    const double err = std::fabs(got.out[i] - model.out[i]);
    const double tol = 2 * plain_err + ulp_of(cs.dtype, model.out[i]) + acc_eps * md.pv_abs[i] + 2 * md.pv_flip[i];
    if (!(err <= tol) && (worst < 0 || err - tol > worst)) {
      worst = err - tol;
      wi = i;
    }
  }
  if (worst >= 0) {
    const int64_t j = static_cast<int64_t>(wi) % cs.D2, th = static_cast<int64_t>(wi) / cs.D2;
    return AssertionFailure() << "attention_out[" << th / cs.N1 << "][" << th % cs.N1 << "][" << j
                              << "]: got " << got.out[wi] << ", fp64 model " << model.out[wi]
                              << ", error " << std::fabs(got.out[wi] - model.out[wi]) << " > tolerance (2 x plain error "
                              << plain_err << " + floor)";
  }
  return AssertionSuccess();
}

// softmax_max / softmax_sum vs the fp64 model: rtol 1e-5 (plus, for the max, the dot-product
// rounding bound D eps |scale| sum|q||k|, for maxima near 0); fully masked rows exactly
// (-FLT_MAX and C_b, §5).
inline AssertionResult check_stats(const Case& cs, const Result& got, const Result& model, const Model& md) {
  for (int64_t t = 0; t < cs.T(); ++t) {
    const int64_t C = cs.c[static_cast<size_t>(cs.batch_of(t))];
    for (int64_t h = 0; h < cs.N1; ++h) {
      const size_t o = static_cast<size_t>(stat_index(cs, t, h));
      const double gm = got.smax[o], gs = got.ssum[o], mm = model.smax[o], ms = model.ssum[o];
      if (md.fully_masked[static_cast<size_t>(t * cs.N1 + h)]) {
        if (got.smax[o] != -FLT_MAX || got.ssum[o] != static_cast<float>(C))
          return AssertionFailure() << "fully masked row t=" << t << " h=" << h << ": softmax_max " << got.smax[o]
                                    << " (want -FLT_MAX), softmax_sum " << got.ssum[o] << " (want " << C << ")";
        continue;
      }
      const double dot_tol = static_cast<double>(cs.D) * FLT_EPSILON * md.dot_abs[static_cast<size_t>(t * cs.N1 + h)];
      if (!(std::fabs(gm - mm) <= 1e-5 * std::fabs(mm) + dot_tol))
        return AssertionFailure() << "softmax_max of t=" << t << " h=" << h << ": got " << gm << ", model " << mm;
      if (!(std::fabs(gs - ms) <= (1e-5 + 2 * dot_tol) * std::fabs(ms)))
        return AssertionFailure() << "softmax_sum of t=" << t << " h=" << h << ": got " << gs << ", model " << ms;
    }
  }
  return AssertionSuccess();
}

// topk_indices vs the model's scores (docs/CONTRIBUTING.md): forced blocks first, smallest indices first; then, slot
// by slot, the model score at the returned index equals the model's i-th largest score within the
// tolerance, and the index is identical wherever that score is separated from its neighbours by
// more than the tolerance; blocks whose model score is exactly 0 appear in ascending order (§5).
inline AssertionResult check_topk(const Case& cs, const Result& got, const Model& md) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < cs.T(); ++t) {
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      const std::vector<double>& sc = md.scores[static_cast<size_t>(t * cs.N2 + n2)];
      const double rtol = md.score_rtol[static_cast<size_t>(t * cs.N2 + n2)];
      const int64_t Sel = static_cast<int64_t>(sc.size());
      auto tol = [&](double x) { return rtol * std::fabs(x) + 1e-35; };
      std::vector<int64_t> order(static_cast<size_t>(Sel));
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sc[a] > sc[b]; });
      const int32_t* g = &got.topk[static_cast<size_t>((t * cs.N2 + n2) * cs.K)];
      auto where = [&]() {
        std::ostringstream os;
        os << "topk_indices[" << t << "][" << n2 << "] = [";
        for (int64_t i = 0; i < cs.K; ++i) os << (i ? "," : "") << g[i];
        os << "], model order [";
        for (int64_t i = 0; i < std::min<int64_t>(Sel, cs.K + 2); ++i) os << (i ? "," : "") << order[i] << ":" << sc[order[i]];
        os << "...]";
        return os.str();
      };
      int64_t last_zero = -1;
      for (int64_t i = 0; i < cs.K; ++i) {
        const int64_t gi = g[i];
        if (gi < 0 || gi >= Sel) return AssertionFailure() << "index out of range: " << where();
        const double e = sc[order[i]], gs = sc[gi];
        if (e == inf) {
          if (gi != order[i]) return AssertionFailure() << "slot " << i << ": forced blocks must come first, ascending: " << where();
          continue;
        }
        if (gs == inf) return AssertionFailure() << "slot " << i << ": forced block beyond the forced slots: " << where();
        if (!(std::fabs(gs - e) <= tol(std::max(gs, e))))
          return AssertionFailure() << "slot " << i << ": model score at the returned index " << gs
                                    << " != model's " << i << "-th score " << e << ": " << where();
        const bool sep_before = i == 0 || sc[order[i - 1]] == inf || sc[order[i - 1]] - e > tol(sc[order[i - 1]]);
        const bool sep_after = i + 1 >= Sel || e - sc[order[i + 1]] > tol(e);
        if (sep_before && sep_after && gi != order[i])
          return AssertionFailure() << "slot " << i << ": a well-separated score must give the same index: " << where();
        if (gs == 0) {
          if (gi < last_zero) return AssertionFailure() << "zero-score blocks must be in ascending order: " << where();
          last_zero = gi;
        }
      }
    }
  }
  return AssertionSuccess();
}

// All outputs identical bit for bit.
inline AssertionResult bitwise_equal(const Result& a, const Result& b) {
  if (a.status.ok() != b.status.ok()) return AssertionFailure() << "one call failed: " << a.status.message() << b.status.message();
  if (a.out_bytes != b.out_bytes) {
    for (size_t i = 0; i < a.out.size(); ++i)
      if (std::memcmp(&a.out[i], &b.out[i], sizeof(double)))
        return AssertionFailure() << "attention_out differs at flat element " << i << ": " << a.out[i] << " vs " << b.out[i];
    return AssertionFailure() << "attention_out bytes differ";
  }
  if (a.topk != b.topk) {
    for (size_t i = 0; i < a.topk.size(); ++i)
      if (a.topk[i] != b.topk[i])
        return AssertionFailure() << "topk_indices differ at flat element " << i << ": " << a.topk[i] << " vs " << b.topk[i];
  }
  if (a.smax.size() != b.smax.size() || std::memcmp(a.smax.data(), b.smax.data(), a.smax.size() * 4))
    return AssertionFailure() << "softmax_max differs";
  if (a.ssum.size() != b.ssum.size() || std::memcmp(a.ssum.data(), b.ssum.data(), a.ssum.size() * 4))
    return AssertionFailure() << "softmax_sum differs";
  return AssertionSuccess();
}

// The expensive references of a case, computed once and checked against by every backend run.
struct Oracle {
  Result model;  // reference::forward_fp64: the fp64 model of docs/spec/compress_attention.md
  Result plain;  // the plain same-dtype implementation (forward_fp32; forward_fp64 for fp64 inputs)
  Model md;      // independent fp64 scores and magnitudes
};

inline Oracle make_oracle(const Case& cs) {
  Oracle o;
  o.model = run(cs, Backend::kRefFp64);
  o.plain = cs.dtype == DType::kF64 ? o.model : run(cs, Backend::kRefFp32);
  o.md = make_model(cs);
  return o;
}

inline AssertionResult check_all(const Case& cs, const Oracle& o, const Result& got) {
  AssertionResult r = check_complete(cs, got);
  if (!r) return r;
  if (!(r = check_out(cs, got, o.model, o.plain, o.md))) return r;
  if (!(r = check_stats(cs, got, o.model, o.md))) return r;
  return check_topk(cs, got, o.md);
}

}  // namespace nsa_test
