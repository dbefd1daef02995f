// Test support of the selected-attention operator (docs/spec/select_attention.md): a case builder owning every
// input buffer, runners for the forward and backward backends, an fp64 model written independently of
// src/ops/select_attention (the §3-§8 formulas in double), and the comparison rules of §10.
//
//   SCase cs = SCase::make(DType::kBF16, /*sq=*/{5, 0, 9}, /*skv=*/{5, 3, 9}, N1, N2, D, Dv, /*lp=*/4, /*K=*/3);
//   cs.fill_uniform(rng, -1, 1);
//   cs.random_indices(rng);
//   SOracle o = make_oracle(cs);                     // fp64 model + plain fp32 reference
//   SResult r = run(cs, SBackend::kCpu, isa);
//   EXPECT_TRUE(check_forward(cs, o, r));
//
// Values are logical row-major doubles already representable in the dtype; a layout (permuted dims, padding,
// inner step, zero strides) decides the memory. Padding is filled with 0xFF bytes (NaN for floats, -1 for
// indices), and outputs are pre-filled with 0xFF so that both a missing write and any write of a rejected call
// show.
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

#include "common/numeric.h"
#include "common/test_tensors.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/batches.h"
#include "ops/select_attention/cpu.h"
#include "ops/select_attention/reference.h"
#include "ops/select_attention/rounding.h"

namespace sel_test {

using nsa::CpuIsa;
using nsa::DType;
using nsa::IndexDType;
using nsa::SelectAttentionGradParams;
using nsa::SelectAttentionParams;
using nsa::Status;
using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

using nsa_test::kAllDtypes;
using nsa_test::supported_isas;
using nsa_test::ulp_of;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------------------------ numerics

// x rounded to the dtype to nearest even (rne_T), as a double.
inline double rne(DType dt, double x) { return nsa_test::round_to(dt, x); }

// rha_T of the float value of x (bf16 / fp16), as the contract rounds P; x otherwise.
inline double rha(DType dt, double x) {
  if (dt == DType::kBF16 || dt == DType::kF16)
    return nsa::select_detail::round_rha(static_cast<float>(x), dt);
  return x;
}

// ------------------------------------------------------------------------------------ layouts

// Memory layout of a 3-D array: order lists the logical dims from outermost to innermost in memory; pad adds
// elements per logical dim; step is the stride of the innermost dim; zero_dim (0..2) gets stride 0 (the data
// must then be constant along it), -1 for none.
struct Layout {
  std::array<int, 3> order{{0, 1, 2}};
  std::array<int64_t, 3> pad{{0, 0, 0}};
  int64_t step = 1;
  int zero_dim = -1;
};

struct Storage {
  std::vector<unsigned char> bytes;
  nsa::Tensor3 view;
};

// store(base, element offset, logical index) writes one element.
template <typename Store>
void materialize(const int64_t size[3], const Layout& lay, size_t esz, Storage* out, Store store) {
  int64_t ext[3], stride[3];
  for (int i = 0; i < 3; ++i) ext[i] = lay.zero_dim == i ? 1 : size[i] + lay.pad[i];
  int64_t s = lay.step;
  for (int idx = 2; idx >= 0; --idx) {
    const int dim = lay.order[idx];
    stride[dim] = lay.zero_dim == dim ? 0 : s;
    s *= ext[dim];
  }
  out->bytes.assign(static_cast<size_t>(std::max<int64_t>(s, 1)) * esz, 0xFF);
  for (int64_t i = 0; i < size[0]; ++i)
    for (int64_t j = 0; j < size[1]; ++j)
      for (int64_t k = 0; k < size[2]; ++k)
        store(out->bytes.data(), i * stride[0] + j * stride[1] + k * stride[2], (i * size[1] + j) * size[2] + k);
  out->view.data = out->bytes.data();
  for (int i = 0; i < 3; ++i) {
    out->view.size[i] = size[i];
    out->view.stride[i] = stride[i];
  }
}

inline void materialize_values(const std::vector<double>& vals, const int64_t size[3], const Layout& lay, DType dt,
                               Storage* out) {
  materialize(size, lay, nsa::dtype_size(dt), out, [&](void* base, int64_t off, int64_t li) {
    nsa::detail::store_f64(base, off, vals[static_cast<size_t>(li)], dt);
  });
}

inline void materialize_indices(const std::vector<int64_t>& vals, const int64_t size[3], const Layout& lay,
                                IndexDType it, Storage* out) {
  materialize(size, lay, it == IndexDType::kInt64 ? 8 : 4, out, [&](void* base, int64_t off, int64_t li) {
    if (it == IndexDType::kInt64) static_cast<int64_t*>(base)[off] = vals[static_cast<size_t>(li)];
    else static_cast<int32_t*>(base)[off] = static_cast<int32_t>(vals[static_cast<size_t>(li)]);
  });
}

inline void materialize_floats(const std::vector<float>& vals, const int64_t size[3], const Layout& lay, Storage* out) {
  materialize(size, lay, 4, out, [&](void* base, int64_t off, int64_t li) {
    static_cast<float*>(base)[off] = vals[static_cast<size_t>(li)];
  });
}

// ------------------------------------------------------------------------------------ case

struct SCase {
  DType dtype = DType::kF32;
  IndexDType index_dtype = IndexDType::kInt32;
  int64_t N1 = 1, N2 = 1, D = 8, Dv = 8, lp = 4, K = 2;
  double scale = 1.0;
  bool causal = true;
  std::vector<int64_t> sq, skv;  // per batch (the prefix sums are derived)
  int64_t extra_kv_rows = 0;     // key/value rows past the last prefix sum, NaN (never read, §6)
  std::vector<double> q, k, v;   // logical [T1][N1][D], [T2][N2][D], [T2][N2][Dv]
  std::vector<int64_t> idx;      // logical [T1][N2][K]
  Layout q_layout, k_layout, v_layout, idx_layout;

  static SCase make(DType dt, std::vector<int64_t> sq, std::vector<int64_t> skv, int64_t N1, int64_t N2, int64_t D,
                    int64_t Dv, int64_t lp, int64_t K) {
    SCase cs;
    cs.dtype = dt;
    cs.sq = std::move(sq);
    cs.skv = std::move(skv);
    cs.N1 = N1;
    cs.N2 = N2;
    cs.D = D;
    cs.Dv = Dv;
    cs.lp = lp;
    cs.K = K;
    cs.scale = 1.0 / std::sqrt(static_cast<double>(D));
    cs.resize();
    return cs;
  }
  // (Re)allocates every array after a change of sizes: zeros, NaN in the extra key/value rows, indices -1.
  void resize() {
    q.assign(static_cast<size_t>(T1() * N1 * D), 0.0);
    k.assign(static_cast<size_t>(T2() * N2 * D), 0.0);
    v.assign(static_cast<size_t>(T2() * N2 * Dv), 0.0);
    for (int64_t r = T2() - extra_kv_rows; r < T2(); ++r)
      for (int64_t n = 0; n < N2; ++n) {
        for (int64_t j = 0; j < D; ++j) k[ki(r, n, j)] = kNaN;
        for (int64_t j = 0; j < Dv; ++j) v[vi(r, n, j)] = kNaN;
      }
    idx.assign(static_cast<size_t>(T1() * N2 * K), -1);
  }

  int64_t B() const { return static_cast<int64_t>(sq.size()); }
  int64_t T1() const { return std::accumulate(sq.begin(), sq.end(), int64_t(0)); }
  int64_t kv_end() const { return std::accumulate(skv.begin(), skv.end(), int64_t(0)); }
  int64_t T2() const { return kv_end() + extra_kv_rows; }
  int64_t G() const { return N1 / N2; }
  int64_t q_begin(int64_t b) const { return std::accumulate(sq.begin(), sq.begin() + b, int64_t(0)); }
  int64_t k_begin(int64_t b) const { return std::accumulate(skv.begin(), skv.begin() + b, int64_t(0)); }
  int64_t blocks(int64_t b) const { return (skv[static_cast<size_t>(b)] + lp - 1) / lp; }
  int64_t batch_of(int64_t t) const {
    int64_t acc = 0;
    for (int64_t b = 0; b < B(); ++b) {
      acc += sq[static_cast<size_t>(b)];
      if (t < acc) return b;
    }
    return -1;
  }
  size_t qi(int64_t t, int64_t h, int64_t j) const { return static_cast<size_t>((t * N1 + h) * D + j); }
  size_t ki(int64_t r, int64_t n, int64_t j) const { return static_cast<size_t>((r * N2 + n) * D + j); }
  size_t vi(int64_t r, int64_t n, int64_t j) const { return static_cast<size_t>((r * N2 + n) * Dv + j); }
  size_t ii(int64_t t, int64_t n, int64_t j) const { return static_cast<size_t>((t * N2 + n) * K + j); }
  int64_t& index(int64_t t, int64_t n2, int64_t j) { return idx[ii(t, n2, j)]; }
  int64_t index(int64_t t, int64_t n2, int64_t j) const { return idx[ii(t, n2, j)]; }

  // Every query row and every valid key/value row (not the extra NaN rows).
  template <typename F>
  void fill_all(F&& gen) {
    for (double& x : q) x = nsa_round(gen());
    for (int64_t r = 0; r < kv_end(); ++r)
      for (int64_t n = 0; n < N2; ++n) {
        for (int64_t j = 0; j < D; ++j) k[ki(r, n, j)] = nsa_round(gen());
        for (int64_t j = 0; j < Dv; ++j) v[vi(r, n, j)] = nsa_round(gen());
      }
  }
  double nsa_round(double x) const { return rne(dtype, x); }
  void fill_uniform(std::mt19937_64& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    fill_all([&] { return u(rng); });
  }
  void fill_ints(std::mt19937_64& rng, int lo, int hi) {
    std::uniform_int_distribution<int> u(lo, hi);
    fill_all([&] { return static_cast<double>(u(rng)); });
  }

  // Random valid indices: each slot -1 with probability p_empty, a copy of an earlier slot of the row with
  // probability p_dup, else a uniform block of the batch (future ones included; -1 when the batch has none).
  void random_indices(std::mt19937_64& rng, double p_empty = 0.1, double p_dup = 0.1) {
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t b = 0; b < B(); ++b)
      for (int64_t s = 0; s < sq[static_cast<size_t>(b)]; ++s)
        for (int64_t n2 = 0; n2 < N2; ++n2)
          for (int64_t j = 0; j < K; ++j) {
            const int64_t t = q_begin(b) + s, nb = blocks(b);
            int64_t x = -1;
            if (nb > 0 && u(rng) >= p_empty) {
              if (j > 0 && u(rng) < p_dup) x = index(t, n2, std::uniform_int_distribution<int64_t>(0, j - 1)(rng));
              else x = std::uniform_int_distribution<int64_t>(0, nb - 1)(rng);
            }
            index(t, n2, j) = x;
          }
  }
  // NSA-like indices: for causal rows, blocks at or before the query's own block, the own block and block 0
  // first, the rest distinct random earlier blocks in random order, -1 when fewer than K exist.
  void causal_indices(std::mt19937_64& rng) {
    for (int64_t b = 0; b < B(); ++b)
      for (int64_t s = 0; s < sq[static_cast<size_t>(b)]; ++s)
        for (int64_t n2 = 0; n2 < N2; ++n2) {
          const int64_t t = q_begin(b) + s;
          const int64_t last = std::min(blocks(b) - 1, s / lp);
          std::vector<int64_t> pool;
          for (int64_t x = 0; x <= last; ++x) pool.push_back(x);
          std::shuffle(pool.begin(), pool.end(), rng);
          auto put_first = [&](int64_t x) {
            auto it = std::find(pool.begin(), pool.end(), x);
            if (it != pool.end()) {
              pool.erase(it);
              pool.insert(pool.begin(), x);
            }
          };
          put_first(0);
          put_first(last);
          for (int64_t j = 0; j < K; ++j) index(t, n2, j) = j < static_cast<int64_t>(pool.size()) ? pool[static_cast<size_t>(j)] : -1;
        }
  }

  std::string describe() const {
    std::ostringstream os;
    os << nsa::dtype_name(dtype) << (index_dtype == IndexDType::kInt64 ? " int64" : " int32") << " N1=" << N1
       << " N2=" << N2 << " D=" << D << " Dv=" << Dv << " l'=" << lp << " K=" << K << " scale=" << scale
       << " causal=" << causal << " Sq=[";
    for (size_t i = 0; i < sq.size(); ++i) os << (i ? "," : "") << sq[i];
    os << "] Skv=[";
    for (size_t i = 0; i < skv.size(); ++i) os << (i ? "," : "") << skv[i];
    os << "] extra_kv=" << extra_kv_rows;
    return os.str();
  }
};

// ------------------------------------------------------------------------------------ bound call

// Every buffer of one forward call, materialized from a case, and the params pointing at them.
struct SBound {
  Storage qs, ks, vs, is;
  std::vector<int64_t> qlen, kvlen;
  std::vector<unsigned char> out;
  std::vector<float> smax, ssum;
  SelectAttentionParams p;

  explicit SBound(const SCase& cs) {
    const int64_t qsz[3] = {cs.T1(), cs.N1, cs.D}, ksz[3] = {cs.T2(), cs.N2, cs.D}, vsz[3] = {cs.T2(), cs.N2, cs.Dv};
    const int64_t isz[3] = {cs.T1(), cs.N2, cs.K};
    materialize_values(cs.q, qsz, cs.q_layout, cs.dtype, &qs);
    materialize_values(cs.k, ksz, cs.k_layout, cs.dtype, &ks);
    materialize_values(cs.v, vsz, cs.v_layout, cs.dtype, &vs);
    materialize_indices(cs.idx, isz, cs.idx_layout, cs.index_dtype, &is);
    p.dtype = cs.dtype;
    p.query = qs.view;
    p.key = ks.view;
    p.value = vs.view;
    p.topk_indices = is.view;
    p.index_dtype = cs.index_dtype;
    p.scale_value = cs.scale;
    p.head_num = cs.N1;
    p.select_block_size = cs.lp;
    p.select_block_count = cs.K;
    p.causal = cs.causal;
    int64_t aq = 0, ak = 0;
    for (int64_t b = 0; b < cs.B(); ++b) {
      qlen.push_back(aq += cs.sq[static_cast<size_t>(b)]);
      kvlen.push_back(ak += cs.skv[static_cast<size_t>(b)]);
    }
    p.actual_seq_qlen = {qlen.data(), static_cast<int64_t>(qlen.size())};
    p.actual_seq_kvlen = {kvlen.data(), static_cast<int64_t>(kvlen.size())};
    const size_t T = static_cast<size_t>(cs.T1());
    out.assign(std::max<size_t>(1, T * cs.N1 * cs.Dv * nsa::dtype_size(cs.dtype)), 0xFF);
    smax.assign(std::max<size_t>(1, T * cs.N1 * 8), 0.0f);
    ssum.assign(smax.size(), 0.0f);
    std::memset(smax.data(), 0xFF, smax.size() * 4);
    std::memset(ssum.data(), 0xFF, ssum.size() * 4);
    p.attention_out = out.data();
    p.softmax_max = smax.data();
    p.softmax_sum = ssum.data();
  }
  SBound(const SBound&) = delete;
  SBound& operator=(const SBound&) = delete;

  bool outputs_untouched() const {
    auto all_ff = [](const void* p, size_t n) {
      const unsigned char* c = static_cast<const unsigned char*>(p);
      return std::all_of(c, c + n, [](unsigned char x) { return x == 0xFF; });
    };
    return all_ff(out.data(), out.size()) && all_ff(smax.data(), smax.size() * 4) && all_ff(ssum.data(), ssum.size() * 4);
  }
};

enum class SBackend { kReference, kRefFp32, kRefFp64, kCpu };

inline const char* backend_name(SBackend b) {
  switch (b) {
    case SBackend::kReference: return "select_attention_reference";
    case SBackend::kRefFp32: return "select_reference::forward_fp32";
    case SBackend::kRefFp64: return "select_reference::forward_fp64";
    case SBackend::kCpu: return "select_attention_cpu";
  }
  return "?";
}

inline Status call(SBackend b, const SelectAttentionParams& p, const nsa::CpuOptions& o = {}) {
  switch (b) {
    case SBackend::kReference: return nsa::select_attention_reference(p);
    case SBackend::kRefFp32: return nsa::select_reference::forward_fp32(p);
    case SBackend::kRefFp64: return nsa::select_reference::forward_fp64(p);
    case SBackend::kCpu: return nsa::select_attention_cpu(p, o);
  }
  return Status::Error("bad backend");
}

// Outputs of one forward call: attention_out as doubles (and its bytes), the statistics (all 8 copies).
struct SResult {
  Status status;
  std::vector<double> out;
  std::vector<unsigned char> out_bytes;
  std::vector<float> smax, ssum;
};

inline SResult run(const SCase& cs, SBackend b, int isa = -1, int threads = 0) {
  SBound bd(cs);
  SResult r;
  r.status = call(b, bd.p, nsa::CpuOptions{isa, threads});
  const size_t n = static_cast<size_t>(cs.T1() * cs.N1 * cs.Dv);
  r.out.resize(n);
  for (size_t i = 0; i < n; ++i) r.out[i] = nsa::detail::load_f64(bd.out.data(), static_cast<int64_t>(i), cs.dtype);
  r.out_bytes.assign(bd.out.begin(), bd.out.begin() + static_cast<std::ptrdiff_t>(n * nsa::dtype_size(cs.dtype)));
  r.smax.assign(bd.smax.begin(), bd.smax.begin() + cs.T1() * cs.N1 * 8);
  r.ssum.assign(bd.ssum.begin(), bd.ssum.begin() + cs.T1() * cs.N1 * 8);
  return r;
}
inline SResult run_cpu(const SCase& cs, CpuIsa isa, int threads = 0) {
  return run(cs, SBackend::kCpu, static_cast<int>(isa), threads);
}
// The CPU forward with its tiling knobs (src/ops/select_attention/cpu.h).
inline SResult run_cpu_tuned(const SCase& cs, CpuIsa isa, int threads, const nsa::select_cpu::Tuning& tuning) {
  SBound bd(cs);
  SResult r;
  r.status = nsa::select_cpu::forward(bd.p, nsa::CpuOptions{static_cast<int>(isa), threads}, tuning);
  const size_t n = static_cast<size_t>(cs.T1() * cs.N1 * cs.Dv);
  r.out.resize(n);
  for (size_t i = 0; i < n; ++i) r.out[i] = nsa::detail::load_f64(bd.out.data(), static_cast<int64_t>(i), cs.dtype);
  r.out_bytes.assign(bd.out.begin(), bd.out.begin() + static_cast<std::ptrdiff_t>(n * nsa::dtype_size(cs.dtype)));
  r.smax.assign(bd.smax.begin(), bd.smax.begin() + cs.T1() * cs.N1 * 8);
  r.ssum.assign(bd.ssum.begin(), bd.ssum.begin() + cs.T1() * cs.N1 * 8);
  return r;
}

// ------------------------------------------------------------------------------------ fp64 model

// Visible entries (§3) of (t, n2): key rows, in slot order then r.
inline std::vector<int64_t> visible_rows(const SCase& cs, int64_t t, int64_t n2) {
  const int64_t b = cs.batch_of(t), s = t - cs.q_begin(b), skv = cs.skv[static_cast<size_t>(b)];
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < cs.K; ++j) {
    const int64_t x = cs.index(t, n2, j);
    if (x == -1) continue;
    for (int64_t r = 0; r < cs.lp; ++r) {
      const int64_t pos = x * cs.lp + r;
      if (pos < skv && (!cs.causal || pos <= s)) rows.push_back(cs.k_begin(b) + pos);
    }
  }
  return rows;
}

// The §4 forward in double, written here from the contract (independent of src/ops/select_attention), plus the
// magnitudes the tolerances need.
struct SModel {
  std::vector<double> out;      // [T1][N1][Dv]: P rounded with rha_T from its float value, sum in double, rne_T
  std::vector<double> m, l;     // [T1][N1]
  std::vector<int64_t> nvis;    // [T1][N1]
  std::vector<double> dot_abs;  // [T1][N1]: |scale| max_e sum_d |q_d k_ed|
  std::vector<double> pv_abs;   // [T1][N1][Dv]: sum_e |rha(P_e)| |v_e|
  std::vector<double> pv_flip;  // [T1][N1][Dv]: bf16 / fp16: max_e ulp(P_e) |v_e| (one rounding of P flipping)
};

inline SModel make_model(const SCase& cs) {
  SModel md;
  const int64_t T1 = cs.T1(), N1 = cs.N1, G = cs.G(), D = cs.D, Dv = cs.Dv;
  md.out.assign(static_cast<size_t>(T1 * N1 * Dv), 0.0);
  md.m.assign(static_cast<size_t>(T1 * N1), 0.0);
  md.l.assign(static_cast<size_t>(T1 * N1), 0.0);
  md.nvis.assign(static_cast<size_t>(T1 * N1), 0);
  md.dot_abs.assign(static_cast<size_t>(T1 * N1), 0.0);
  md.pv_abs.assign(static_cast<size_t>(T1 * N1 * Dv), 0.0);
  md.pv_flip.assign(static_cast<size_t>(T1 * N1 * Dv), 0.0);
  const bool low = cs.dtype == DType::kBF16 || cs.dtype == DType::kF16;
  const double scale = static_cast<float>(cs.scale);
  for (int64_t t = 0; t < T1; ++t)
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      const std::vector<int64_t> E = visible_rows(cs, t, n2);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = n2 * G + g, th = t * N1 + h;
        md.nvis[static_cast<size_t>(th)] = static_cast<int64_t>(E.size());
        if (E.empty()) continue;
        std::vector<double> S(E.size()), P(E.size());
        double dabs = 0;
        for (size_t e = 0; e < E.size(); ++e) {
          double dot = 0, a = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += cs.q[cs.qi(t, h, d)] * cs.k[cs.ki(E[e], n2, d)];
            a += std::fabs(cs.q[cs.qi(t, h, d)] * cs.k[cs.ki(E[e], n2, d)]);
          }
          S[e] = dot * scale;
          dabs = std::max(dabs, a * std::fabs(scale));
        }
        const double m = *std::max_element(S.begin(), S.end());
        double l = 0;
        for (double s : S) l += std::exp(s - m);
        for (size_t e = 0; e < E.size(); ++e) P[e] = std::exp(S[e] - m) / l;
        md.m[static_cast<size_t>(th)] = m;
        md.l[static_cast<size_t>(th)] = l;
        md.dot_abs[static_cast<size_t>(th)] = dabs;
        for (int64_t i = 0; i < Dv; ++i) {
          double acc = 0, a = 0, f = 0;
          for (size_t e = 0; e < E.size(); ++e) {
            const double pe = rha(cs.dtype, P[e]), ve = cs.v[cs.vi(E[e], n2, i)];
            acc += pe * ve;
            a += std::fabs(pe * ve);
            if (low) f = std::max(f, ulp_of(cs.dtype, P[e]) * std::fabs(ve));
          }
          md.out[static_cast<size_t>(th * Dv + i)] = rne(cs.dtype, acc);
          md.pv_abs[static_cast<size_t>(th * Dv + i)] = a;
          md.pv_flip[static_cast<size_t>(th * Dv + i)] = f;
        }
      }
    }
  return md;
}

// ------------------------------------------------------------------------------------ forward checks

// Status ok; every statistic has 8 equal copies; no NaN (a missing write) except where the model says a visible
// input is inf / NaN.
inline AssertionResult check_complete(const SCase& cs, const SResult& r, const SModel* md = nullptr) {
  if (!r.status.ok()) return AssertionFailure() << "call failed: " << r.status.message();
  for (int64_t t = 0; t < cs.T1(); ++t)
    for (int64_t h = 0; h < cs.N1; ++h) {
      const size_t o = static_cast<size_t>((t * cs.N1 + h) * 8);
      for (int i = 1; i < 8; ++i)
        if (std::memcmp(&r.smax[o], &r.smax[o + i], 4) || std::memcmp(&r.ssum[o], &r.ssum[o + i], 4))
          return AssertionFailure() << "statistics of (t=" << t << ", h=" << h << ") differ between copies 0 and " << i;
      const size_t th = static_cast<size_t>(t * cs.N1 + h);
      if (md != nullptr && !(std::isfinite(md->m[th]) && std::isfinite(md->l[th]))) continue;
      if (std::isnan(r.smax[o]) || std::isnan(r.ssum[o]))
        return AssertionFailure() << "statistic of (t=" << t << ", h=" << h << ") is NaN (not written?)";
      for (int64_t j = 0; j < cs.Dv; ++j)
        if (std::isnan(r.out[static_cast<size_t>((t * cs.N1 + h) * cs.Dv + j)]) &&
            (md == nullptr || std::isfinite(md->out[static_cast<size_t>((t * cs.N1 + h) * cs.Dv + j)])))
          return AssertionFailure() << "attention_out[" << t << "][" << h << "][" << j << "] is NaN (not written?)";
    }
  return AssertionSuccess();
}

// attention_out vs the fp64 model (§10): max error <= 2 x the max error of the plain same-dtype implementation
// (the fp32 reference) + a floor per element: one ulp of the dtype at the value, 16 eps of the accumulation
// times sum_e |rha(P_e) v_e| (another summation order or exp), and for bf16 / fp16 two flips of the rounding of P.
inline AssertionResult check_out(const SCase& cs, const SResult& got, const SModel& md, const SResult& plain) {
  double plain_err = 0;
  for (size_t i = 0; i < md.out.size(); ++i)
    if (std::isfinite(md.out[i])) plain_err = std::max(plain_err, std::fabs(plain.out[i] - md.out[i]));
  const double acc_eps = cs.dtype == DType::kF64 ? 64 * DBL_EPSILON : 16 * FLT_EPSILON;
  for (size_t i = 0; i < md.out.size(); ++i) {
    if (!std::isfinite(md.out[i])) {  // a visible inf / NaN input: the backend must not produce a finite value
      if (std::isfinite(got.out[i]))
        return AssertionFailure() << "attention_out[flat " << i << "] = " << got.out[i] << ", the model's is " << md.out[i];
      continue;
    }
    const double err = std::fabs(got.out[i] - md.out[i]);
    const double tol = 2 * plain_err + ulp_of(cs.dtype, md.out[i]) + acc_eps * md.pv_abs[i] + 2 * md.pv_flip[i];
    if (!(err <= tol)) {
      const int64_t j = static_cast<int64_t>(i) % cs.Dv, th = static_cast<int64_t>(i) / cs.Dv;
      return AssertionFailure() << "attention_out[" << th / cs.N1 << "][" << th % cs.N1 << "][" << j << "]: got "
                                << got.out[i] << ", fp64 model " << md.out[i] << ", error " << err << " > tolerance "
                                << tol << " (plain error " << plain_err << ")";
    }
  }
  return AssertionSuccess();
}

// Statistics: rtol 1e-5 (+ the dot-product rounding bound for maxima near 0) against the model; rows without
// visible entries exactly (-FLT_MAX, +FLT_MAX) and their outputs exactly 0 (§6).
inline AssertionResult check_stats(const SCase& cs, const SResult& got, const SModel& md) {
  for (int64_t t = 0; t < cs.T1(); ++t)
    for (int64_t h = 0; h < cs.N1; ++h) {
      const size_t th = static_cast<size_t>(t * cs.N1 + h), o = th * 8;
      if (md.nvis[th] == 0) {
        if (got.smax[o] != -FLT_MAX || got.ssum[o] != FLT_MAX)
          return AssertionFailure() << "row without visible entry t=" << t << " h=" << h << ": softmax_max "
                                    << got.smax[o] << " (want -FLT_MAX), softmax_sum " << got.ssum[o] << " (want FLT_MAX)";
        for (int64_t j = 0; j < cs.Dv; ++j)
          if (got.out[th * static_cast<size_t>(cs.Dv) + static_cast<size_t>(j)] != 0.0 ||
              std::signbit(got.out[th * static_cast<size_t>(cs.Dv) + static_cast<size_t>(j)]))
            return AssertionFailure() << "row without visible entry t=" << t << " h=" << h << ": attention_out must be +0";
        continue;
      }
      if (!std::isfinite(md.l[th]) || !std::isfinite(md.m[th])) continue;  // a visible inf / NaN input
      const double dot_tol = static_cast<double>(cs.D) * (cs.dtype == DType::kF64 ? DBL_EPSILON : FLT_EPSILON) * md.dot_abs[th];
      const double rt = cs.dtype == DType::kF64 ? 1e-7 : 1e-5;  // the statistics are float32 for every dtype
      if (!(std::fabs(got.smax[o] - md.m[th]) <= rt * std::fabs(md.m[th]) + dot_tol + 1e-30))
        return AssertionFailure() << "softmax_max of t=" << t << " h=" << h << ": got " << got.smax[o] << ", model " << md.m[th];
      const double lt = cs.dtype == DType::kF64 ? 1e-6 : 1e-5;  // the statistics are float32 for every dtype
      if (!(std::fabs(got.ssum[o] - md.l[th]) <= (lt + 2 * dot_tol) * std::fabs(md.l[th])))
        return AssertionFailure() << "softmax_sum of t=" << t << " h=" << h << ": got " << got.ssum[o] << ", model " << md.l[th];
    }
  return AssertionSuccess();
}

// The cases of the key/value packing tests (SelectForward / SelectBackward.KeyValueRowsInPlaceOrStagedGiveTheSameBits):
// for bf16, fp16 and fp32 and one or two KV heads, a contiguous case (random values and indices, last blocks of 3
// keys), and fn(cs, st, rng) for each padded layout st of its keys and values: padded heads (every other head's rows
// misaligned: staged), an odd row stride (one KV head: staged), padded rows (read in place with a longer row step).
template <typename Fn>
inline void for_each_padded_key_value_layout(uint64_t seed, Fn&& fn) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (int64_t n2 : {1, 2}) {
      SCase cs = SCase::make(dt, {13, 9}, {15, 7}, 2 * n2, n2, 10, 6, 4, 3);
      std::mt19937_64 rng(seed + static_cast<uint64_t>(n2));
      cs.fill_uniform(rng, -1, 1);
      cs.random_indices(rng);
      for (const std::array<int64_t, 3> pad : {std::array<int64_t, 3>{0, 0, 1}, std::array<int64_t, 3>{0, 0, 2},
                                               std::array<int64_t, 3>{0, 1, 0}}) {
        SCase st = cs;
        st.k_layout.pad = pad;
        st.v_layout.pad = pad;
        SCOPED_TRACE(st.describe());
        fn(cs, st, rng);
      }
    }
}

// All outputs identical bit for bit.
inline AssertionResult bitwise_equal(const SResult& a, const SResult& b) {
  if (!a.status.ok() || !b.status.ok())
    return AssertionFailure() << "a call failed: " << a.status.message() << " / " << b.status.message();
  if (a.out_bytes != b.out_bytes) {
    for (size_t i = 0; i < a.out.size(); ++i)
      if (std::memcmp(&a.out[i], &b.out[i], sizeof(double)))
        return AssertionFailure() << "attention_out differs at flat element " << i << ": " << a.out[i] << " vs " << b.out[i];
    return AssertionFailure() << "attention_out bytes differ";
  }
  if (a.smax.size() != b.smax.size() || std::memcmp(a.smax.data(), b.smax.data(), a.smax.size() * 4))
    return AssertionFailure() << "softmax_max differs";
  if (a.ssum.size() != b.ssum.size() || std::memcmp(a.ssum.data(), b.ssum.data(), a.ssum.size() * 4))
    return AssertionFailure() << "softmax_sum differs";
  return AssertionSuccess();
}

struct SOracle {
  SModel md;       // the fp64 model (this file)
  SResult ref64;   // select_reference::forward_fp64 (must agree with the model)
  SResult plain;   // the plain same-dtype implementation: forward_fp32 (fp64 inputs: forward_fp64)
};

inline SOracle make_oracle(const SCase& cs) {
  SOracle o;
  o.md = make_model(cs);
  o.ref64 = run(cs, SBackend::kRefFp64);
  o.plain = cs.dtype == DType::kF64 ? o.ref64 : run(cs, SBackend::kRefFp32);
  return o;
}

inline AssertionResult check_forward(const SCase& cs, const SOracle& o, const SResult& got) {
  AssertionResult r = check_complete(cs, got, &o.md);
  if (r) r = check_out(cs, got, o.md, o.plain);
  if (r) r = check_stats(cs, got, o.md);
  return r;
}

// ------------------------------------------------------------------------------------ backward

// What a backward call reads besides the forward's inputs: dO and the forward's results, each with its own layout.
struct BwdInputs {
  SResult fwd;             // attention_out and statistics of the forward (the fp32 reference; fp64: fp64)
  std::vector<double> go;  // dO, logical [T1][N1][Dv]
  Layout go_layout, out_layout, stat_layout;
};

inline BwdInputs make_bwd_inputs(const SCase& cs, std::mt19937_64& rng, double go_scale = 1.0) {
  BwdInputs in;
  in.fwd = run(cs, cs.dtype == DType::kF64 ? SBackend::kRefFp64 : SBackend::kRefFp32);
  EXPECT_TRUE(in.fwd.status.ok()) << in.fwd.status.message();
  std::uniform_real_distribution<double> u(-go_scale, go_scale);
  in.go.resize(static_cast<size_t>(cs.T1() * cs.N1 * cs.Dv));
  for (double& x : in.go) x = rne(cs.dtype, u(rng));
  return in;
}

// Every buffer of one backward call; outputs pre-filled with 0xFF (NaN); the forward's output pointers null.
struct SBoundBwd {
  SBound fwd;
  Storage out, go, smax, ssum;
  std::vector<unsigned char> gq, gk, gv;
  SelectAttentionGradParams p;

  SBoundBwd(const SCase& cs, const BwdInputs& in) : fwd(cs) {
    const int64_t osz[3] = {cs.T1(), cs.N1, cs.Dv}, ssz[3] = {cs.T1(), cs.N1, 8};
    materialize_values(in.fwd.out, osz, in.out_layout, cs.dtype, &out);
    materialize_values(in.go, osz, in.go_layout, cs.dtype, &go);
    materialize_floats(in.fwd.smax, ssz, in.stat_layout, &smax);
    materialize_floats(in.fwd.ssum, ssz, in.stat_layout, &ssum);
    const size_t es = nsa::dtype_size(cs.dtype);
    gq.assign(std::max<size_t>(1, static_cast<size_t>(cs.T1() * cs.N1 * cs.D) * es), 0xFF);
    gk.assign(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.D) * es), 0xFF);
    gv.assign(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.Dv) * es), 0xFF);
    p.fwd = fwd.p;
    p.fwd.attention_out = nullptr;
    p.fwd.softmax_max = nullptr;
    p.fwd.softmax_sum = nullptr;
    p.grad = go.view;
    p.attention_out = out.view;
    p.softmax_max = smax.view;
    p.softmax_sum = ssum.view;
    p.grad_query = gq.data();
    p.grad_key = gk.data();
    p.grad_value = gv.data();
  }
  bool outputs_untouched() const {
    auto ff = [](const std::vector<unsigned char>& v) {
      return std::all_of(v.begin(), v.end(), [](unsigned char x) { return x == 0xFF; });
    };
    return ff(gq) && ff(gk) && ff(gv);
  }
};

// A plain float32 implementation of §8 that takes the contract's other allowed choice: P and dS rounded with
// rha_T before the products that use them (the CPU backend's bf16 dot-product path does so). Outputs rha_T.
inline Status plain_rounded_backward(const SelectAttentionGradParams& p) {
  nsa::SelectAttentionShape sh;
  Status st = nsa::validate_select_attention_backward(p, &sh);
  if (!st.ok()) return st;
  const SelectAttentionParams& f = p.fwd;
  const DType dt = f.dtype;
  auto ld = [dt](const nsa::Tensor3& t, int64_t i, int64_t j, int64_t k) {
    return nsa::detail::load_f32(t.data, i * t.stride[0] + j * t.stride[1] + k * t.stride[2], dt);
  };
  auto stat = [](const nsa::Tensor3& t, int64_t i, int64_t j) {
    return static_cast<const float*>(t.data)[i * t.stride[0] + j * t.stride[1]];
  };
  const float scale = static_cast<float>(f.scale_value);
  std::vector<float> dq(static_cast<size_t>(sh.T1 * sh.N1 * sh.D), 0.0f), dk(static_cast<size_t>(sh.T2 * sh.N2 * sh.D), 0.0f),
      dv(static_cast<size_t>(sh.T2 * sh.N2 * sh.Dv), 0.0f);
  int64_t q0 = 0, k0 = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t sqb = f.actual_seq_qlen.data[b] - q0, skv = f.actual_seq_kvlen.data[b] - k0;
    for (int64_t s = 0; s < sqb; ++s) {
      const int64_t t = q0 + s;
      for (int64_t h = 0; h < sh.N1; ++h) {
        const int64_t n2 = h / sh.G;
        const float m = stat(p.softmax_max, t, h), l = stat(p.softmax_sum, t, h);
        float dlt = 0;
        for (int64_t i = 0; i < sh.Dv; ++i) dlt += ld(p.grad, t, h, i) * ld(p.attention_out, t, h, i);
        for (int64_t j = 0; j < sh.K; ++j) {
          const int64_t x = nsa::select_detail::index_at(f, t, n2, j);
          if (x < 0) continue;
          for (int64_t r = 0; r < sh.block; ++r) {
            const int64_t pos = x * sh.block + r, row = k0 + pos;
            if (!(pos < skv && (!f.causal || pos <= s))) continue;
            float dot = 0, dp = 0;
            for (int64_t d = 0; d < sh.D; ++d) dot += ld(f.query, t, h, d) * ld(f.key, row, n2, d);
            for (int64_t i = 0; i < sh.Dv; ++i) dp += ld(p.grad, t, h, i) * ld(f.value, row, n2, i);
            const float P = std::exp(dot * scale - m) / l;
            const float Pr = nsa::select_detail::round_rha(P, dt);
            const float dS = nsa::select_detail::round_rha(P * (dp - dlt), dt);
            for (int64_t d = 0; d < sh.D; ++d) {
              dq[static_cast<size_t>((t * sh.N1 + h) * sh.D + d)] += dS * ld(f.key, row, n2, d);
              dk[static_cast<size_t>((row * sh.N2 + n2) * sh.D + d)] += dS * ld(f.query, t, h, d);
            }
            for (int64_t i = 0; i < sh.Dv; ++i) dv[static_cast<size_t>((row * sh.N2 + n2) * sh.Dv + i)] += Pr * ld(p.grad, t, h, i);
          }
        }
      }
    }
    q0 = f.actual_seq_qlen.data[b];
    k0 = f.actual_seq_kvlen.data[b];
  }
  for (size_t i = 0; i < dq.size(); ++i) nsa::select_detail::store_rha(p.grad_query, static_cast<int64_t>(i), scale * dq[i], dt);
  for (size_t i = 0; i < dk.size(); ++i) nsa::select_detail::store_rha(p.grad_key, static_cast<int64_t>(i), scale * dk[i], dt);
  for (size_t i = 0; i < dv.size(); ++i) nsa::select_detail::store_rha(p.grad_value, static_cast<int64_t>(i), dv[i], dt);
  return Status::Ok();
}

enum class BwdBackend { kRefFp32, kRefFp64, kReference, kCpu, kPlainRounded };

inline Status call_bwd(BwdBackend b, const SelectAttentionGradParams& p, const nsa::CpuOptions& o = {}) {
  switch (b) {
    case BwdBackend::kRefFp32: return nsa::select_reference::backward_fp32(p);
    case BwdBackend::kRefFp64: return nsa::select_reference::backward_fp64(p);
    case BwdBackend::kReference: return nsa::select_attention_backward_reference(p);
    case BwdBackend::kCpu: return nsa::select_attention_backward_cpu(p, o);
    case BwdBackend::kPlainRounded: return plain_rounded_backward(p);
  }
  return Status::Error("bad backend");
}

struct Grads {
  Status status;
  std::vector<double> dq, dk, dv;
  std::vector<unsigned char> raw;
};

// tuning: the CPU backward's tiling knobs (kCpu only; null = the defaults).
inline Grads run_bwd(const SCase& cs, const BwdInputs& in, BwdBackend b, int isa = -1, int threads = 0,
                     const nsa::select_cpu::Tuning* tuning = nullptr) {
  SBoundBwd bd(cs, in);
  Grads g;
  if (tuning != nullptr && b == BwdBackend::kCpu) g.status = nsa::select_cpu::backward(bd.p, nsa::CpuOptions{isa, threads}, *tuning);
  else g.status = call_bwd(b, bd.p, nsa::CpuOptions{isa, threads});
  auto conv = [&](const std::vector<unsigned char>& raw, int64_t n, std::vector<double>* out) {
    out->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) (*out)[static_cast<size_t>(i)] = nsa::detail::load_f64(raw.data(), i, cs.dtype);
  };
  conv(bd.gq, cs.T1() * cs.N1 * cs.D, &g.dq);
  conv(bd.gk, cs.T2() * cs.N2 * cs.D, &g.dk);
  conv(bd.gv, cs.T2() * cs.N2 * cs.Dv, &g.dv);
  g.raw = bd.gq;
  g.raw.insert(g.raw.end(), bd.gk.begin(), bd.gk.end());
  g.raw.insert(g.raw.end(), bd.gv.begin(), bd.gv.end());
  return g;
}

// §8 in double from the same inputs (statistics and O as given), written here independently: the model of the
// gradients (no rounding of P or dS, outputs not rounded), plus each element's magnitude: the sum over its terms of
// what their rounding errors scale with (|terms|, with dS's sum of |products| in place of |dS|, see below).
struct GradModel {
  std::vector<double> dq, dk, dv;
  std::vector<double> aq, ak, av;
};

inline GradModel make_grad_model(const SCase& cs, const BwdInputs& in) {
  GradModel gm;
  const int64_t N1 = cs.N1, N2 = cs.N2, G = cs.G(), D = cs.D, Dv = cs.Dv;
  gm.dq.assign(static_cast<size_t>(cs.T1() * N1 * D), 0.0);
  gm.aq = gm.dq;
  gm.dk.assign(static_cast<size_t>(cs.T2() * N2 * D), 0.0);
  gm.ak = gm.dk;
  gm.dv.assign(static_cast<size_t>(cs.T2() * N2 * Dv), 0.0);
  gm.av = gm.dv;
  const double scale = static_cast<float>(cs.scale);
  for (int64_t t = 0; t < cs.T1(); ++t)
    for (int64_t n2 = 0; n2 < N2; ++n2) {
      const std::vector<int64_t> E = visible_rows(cs, t, n2);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = n2 * G + g, th = t * N1 + h;
        const double m = in.fwd.smax[static_cast<size_t>(th * 8)], l = in.fwd.ssum[static_cast<size_t>(th * 8)];
        double dlt = 0, adlt = 0;
        for (int64_t i = 0; i < Dv; ++i) {
          dlt += in.go[static_cast<size_t>(th * Dv + i)] * in.fwd.out[static_cast<size_t>(th * Dv + i)];
          adlt += std::fabs(in.go[static_cast<size_t>(th * Dv + i)] * in.fwd.out[static_cast<size_t>(th * Dv + i)]);
        }
        for (const int64_t row : E) {
          double dot = 0, adot = 0, dp = 0, adp = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += cs.q[cs.qi(t, h, d)] * cs.k[cs.ki(row, n2, d)];
            adot += std::fabs(cs.q[cs.qi(t, h, d)] * cs.k[cs.ki(row, n2, d)]);
          }
          for (int64_t i = 0; i < Dv; ++i) {
            dp += in.go[static_cast<size_t>(th * Dv + i)] * cs.v[cs.vi(row, n2, i)];
            adp += std::fabs(in.go[static_cast<size_t>(th * Dv + i)] * cs.v[cs.vi(row, n2, i)]);
          }
          const double P = std::exp(dot * scale - m) / l, dS = P * (dp - dlt);
          // what the rounding errors of dS scale with: the dot products dP and Dlt (their sums of |terms|, not their
          // values: dP - Dlt cancels), and P's relative error, which follows the score's absolute error
          // (|scale| sum |q k| eps) and a few eps of exp and the division
          const double prel = 1.0 + std::fabs(scale) * adot;
          const double adS = P * (adp + adlt + std::fabs(dp - dlt) * prel);
          for (int64_t d = 0; d < D; ++d) {
            gm.dq[cs.qi(t, h, d)] += scale * dS * cs.k[cs.ki(row, n2, d)];
            gm.aq[cs.qi(t, h, d)] += std::fabs(scale * adS * cs.k[cs.ki(row, n2, d)]);
            gm.dk[cs.ki(row, n2, d)] += scale * dS * cs.q[cs.qi(t, h, d)];
            gm.ak[cs.ki(row, n2, d)] += std::fabs(scale * adS * cs.q[cs.qi(t, h, d)]);
          }
          for (int64_t i = 0; i < Dv; ++i) {
            gm.dv[cs.vi(row, n2, i)] += P * in.go[static_cast<size_t>(th * Dv + i)];
            gm.av[cs.vi(row, n2, i)] += std::fabs(P * prel * in.go[static_cast<size_t>(th * Dv + i)]);
          }
        }
      }
    }
  return gm;
}

// FlashAttention's rule per gradient tensor (§10): max |got - model| <= 3 x max |plain - model| + a floor per
// element: one ulp of the dtype at the model value, plus 64 eps of the accumulation times the element's sum of
// |terms| (another summation order, another exp, the dS cancellation), plus, where the backend may round P and dS
// to the dtype (`rounded`), 2 ulp of the dtype times that sum.
inline AssertionResult check_grad(const char* name, DType dt, const std::vector<double>& got,
                                  const std::vector<double>& model, const std::vector<double>& mag,
                                  const std::vector<double>& plain, bool rounded) {
  double plain_err = 0;
  for (size_t i = 0; i < model.size(); ++i)
    if (std::isfinite(model[i])) plain_err = std::max(plain_err, std::fabs(plain[i] - model[i]));
  const double eps = dt == DType::kF64 ? DBL_EPSILON : FLT_EPSILON;
  const double round_eps = rounded ? 2 * ulp_of(dt, 1.0) : 0.0;
  for (size_t i = 0; i < model.size(); ++i) {
    if (!std::isfinite(model[i])) {  // a visible inf / NaN input: the backend must not produce a finite value
      if (std::isfinite(got[i])) return AssertionFailure() << name << "[flat " << i << "] = " << got[i] << ", the model's is " << model[i];
      continue;
    }
    const double err = std::fabs(got[i] - model[i]);
    const double tol = 3 * plain_err + ulp_of(dt, model[i]) + (64 * eps + round_eps) * mag[i];
    if (!(err <= tol))
      return AssertionFailure() << name << "[flat " << i << "]: got " << got[i] << ", fp64 model " << model[i]
                                << ", error " << err << " > tolerance " << tol << " (3 x plain error " << plain_err
                                << " + floor)";
  }
  return AssertionSuccess();
}

inline AssertionResult check_grads(const SCase& cs, const Grads& got, const GradModel& gm, const Grads& plain,
                                   bool rounded) {
  if (!got.status.ok()) return AssertionFailure() << "call failed: " << got.status.message();
  AssertionResult r = check_grad("grad_query", cs.dtype, got.dq, gm.dq, gm.aq, plain.dq, rounded);
  if (r) r = check_grad("grad_key", cs.dtype, got.dk, gm.dk, gm.ak, plain.dk, rounded);
  if (r) r = check_grad("grad_value", cs.dtype, got.dv, gm.dv, gm.av, plain.dv, rounded);
  return r;
}

// Exact zeros where nothing can contribute: key/value rows never visible to any query (never selected, beyond a
// batch's Skv_b, beyond the last prefix sum) and query rows without any visible entry (§6).
inline AssertionResult check_structural_zeros(const SCase& cs, const Grads& g) {
  std::vector<char> seen(static_cast<size_t>(cs.T2() * cs.N2), 0);
  for (int64_t t = 0; t < cs.T1(); ++t)
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      const std::vector<int64_t> E = visible_rows(cs, t, n2);
      for (int64_t row : E) seen[static_cast<size_t>(row * cs.N2 + n2)] = 1;
      if (!E.empty()) continue;
      for (int64_t g2 = 0; g2 < cs.G(); ++g2)
        for (int64_t d = 0; d < cs.D; ++d)
          if (g.dq[cs.qi(t, n2 * cs.G() + g2, d)] != 0.0)
            return AssertionFailure() << "grad_query of the row without visible entry t=" << t << " must be zero";
    }
  for (int64_t r = 0; r < cs.T2(); ++r)
    for (int64_t n = 0; n < cs.N2; ++n) {
      if (seen[static_cast<size_t>(r * cs.N2 + n)]) continue;
      for (int64_t d = 0; d < cs.D; ++d)
        if (g.dk[cs.ki(r, n, d)] != 0.0) return AssertionFailure() << "grad_key row " << r << " head " << n << " must be zero";
      for (int64_t d = 0; d < cs.Dv; ++d)
        if (g.dv[cs.vi(r, n, d)] != 0.0) return AssertionFailure() << "grad_value row " << r << " head " << n << " must be zero";
    }
  return AssertionSuccess();
}

}  // namespace sel_test
