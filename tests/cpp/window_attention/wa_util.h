// Test support for sliding-window attention (docs/spec/window_attention.md): a case builder owning every input
// buffer, runners for the backends (forward and backward), an independent fp64 model written from the contract
// (its own visibility rule of §4, dense softmax, and the magnitudes the tolerances need), and the comparison
// rules of the project: max error <= 2 x the error of the plain same-dtype implementation + a rounding floor per
// element, statistics within rtol 1e-5.
//
// Layouts, numerics and ISA helpers come from the shared test_util.h (Layout3, materialize3, ulp_of, round_to,
// supported_isas).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "nsa/window_attention.h"
#include "ops/window_attention/cpu.h"
#include "ops/window_attention/reference.h"
#include "ops/window_attention/rounding.h"
#include "test_util.h"

namespace wa_test {

using nsa::CpuIsa;
using nsa::DType;
using nsa::Status;
using nsa::StatsLayout;
using nsa::WindowAttentionGradParams;
using nsa::WindowAttentionParams;
using nsa_test::Layout3;
using nsa_test::round_to;
using nsa_test::supported_isas;
using nsa_test::ulp_of;

constexpr int64_t kNoLimit = nsa::kWindowAttentionNoLimit;

enum class MaskKind { kNone, kExplicit, kCompressed, kImplied };

struct WCase {
  DType dtype = DType::kF32;
  int64_t N1 = 1, N2 = 1, D = 16, Dv = 16;
  double scale = 0.25;
  std::vector<int64_t> qlist, kvlist;  // the prefix-sum lists as passed (trailing zeros allowed)
  int64_t extra_kv_rows = 0;           // key/value rows past max(kvlist), NaN (never read, zero gradient)
  int64_t sparse_mode = 0, pre = kNoLimit, next = kNoLimit, inner_precise = 0;
  StatsLayout layout = StatsLayout::kPerBatch;
  MaskKind mask_kind = MaskKind::kNone;
  std::vector<uint8_t> mask;  // [mask_rows][mask_cols]
  int64_t mask_rows = 0, mask_cols = 0;
  bool mask_transposed = false;
  std::vector<double> q, k, v, dy;  // logical row-major values, representable in dtype
  Layout3 q_layout, k_layout, v_layout, dy_layout;

  // ---- derived sizes (trailing-zero convention of §3)
  int64_t B() const { return static_cast<int64_t>(qlist.size()); }
  static int64_t last_nz(const std::vector<int64_t>& l) {
    int64_t x = -1;
    for (size_t i = 0; i < l.size(); ++i)
      if (l[i] != 0) x = static_cast<int64_t>(i);
    return x;
  }
  static void extent(const std::vector<int64_t>& l, int64_t b, int64_t* begin, int64_t* len) {
    const int64_t lz = last_nz(l);
    if (b > lz) {
      *begin = lz >= 0 ? l[static_cast<size_t>(lz)] : 0;
      *len = 0;
      return;
    }
    *begin = b > 0 ? l[static_cast<size_t>(b - 1)] : 0;
    *len = l[static_cast<size_t>(b)] - *begin;
  }
  int64_t q0(int64_t b) const { int64_t a, n; extent(qlist, b, &a, &n); return a; }
  int64_t sq(int64_t b) const { int64_t a, n; extent(qlist, b, &a, &n); return n; }
  int64_t k0(int64_t b) const { int64_t a, n; extent(kvlist, b, &a, &n); return a; }
  int64_t skv(int64_t b) const { int64_t a, n; extent(kvlist, b, &a, &n); return n; }
  int64_t T1() const { const int64_t lz = last_nz(qlist); return lz >= 0 ? qlist[static_cast<size_t>(lz)] : 0; }
  int64_t kv_end() const { const int64_t lz = last_nz(kvlist); return lz >= 0 ? kvlist[static_cast<size_t>(lz)] : 0; }
  int64_t T2() const { return kv_end() + extra_kv_rows; }
  int64_t G() const { return N1 / N2; }
  int64_t max_sq() const { int64_t m = 0; for (int64_t b = 0; b < B(); ++b) m = std::max(m, sq(b)); return m; }
  int64_t max_skv() const { int64_t m = 0; for (int64_t b = 0; b < B(); ++b) m = std::max(m, skv(b)); return m; }
  int64_t batch_of(int64_t t) const {
    for (int64_t b = 0; b < B(); ++b)
      if (t >= q0(b) && t < q0(b) + sq(b)) return b;
    return -1;
  }

  // ---- construction
  static WCase make(DType dt, std::vector<int64_t> sq_lens, std::vector<int64_t> skv_lens, int64_t N1, int64_t N2,
                    int64_t D, int64_t Dv) {
    WCase c;
    c.dtype = dt;
    int64_t a = 0, k = 0;
    for (int64_t x : sq_lens) c.qlist.push_back(a += x);
    for (int64_t x : skv_lens) c.kvlist.push_back(k += x);
    c.N1 = N1;
    c.N2 = N2;
    c.D = D;
    c.Dv = Dv;
    c.scale = 1.0 / std::sqrt(static_cast<double>(D));
    c.resize();
    return c;
  }
  void resize() {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    q.assign(static_cast<size_t>(T1() * N1 * D), 0.0);
    dy.assign(static_cast<size_t>(T1() * N1 * Dv), 0.0);
    k.assign(static_cast<size_t>(T2() * N2 * D), nan);
    v.assign(static_cast<size_t>(T2() * N2 * Dv), nan);
    for (size_t i = 0; i < static_cast<size_t>(kv_end() * N2 * D); ++i) k[i] = 0.0;
    for (size_t i = 0; i < static_cast<size_t>(kv_end() * N2 * Dv); ++i) v[i] = 0.0;
  }
  size_t qi(int64_t t, int64_t h, int64_t d) const { return static_cast<size_t>((t * N1 + h) * D + d); }
  size_t ki(int64_t r, int64_t n, int64_t d) const { return static_cast<size_t>((r * N2 + n) * D + d); }
  size_t vi(int64_t r, int64_t n, int64_t e) const { return static_cast<size_t>((r * N2 + n) * Dv + e); }
  size_t oi(int64_t t, int64_t h, int64_t e) const { return static_cast<size_t>((t * N1 + h) * Dv + e); }

  template <typename F>
  void fill(F&& gen) {
    for (auto& x : q) x = round_to(dtype, gen());
    for (size_t i = 0; i < static_cast<size_t>(kv_end() * N2 * D); ++i) k[i] = round_to(dtype, gen());
    for (size_t i = 0; i < static_cast<size_t>(kv_end() * N2 * Dv); ++i) v[i] = round_to(dtype, gen());
    for (auto& x : dy) x = round_to(dtype, gen());
  }
  void fill_uniform(uint64_t seed, double lo = -1, double hi = 1) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(lo, hi);
    fill([&] { return u(rng); });
  }
  void fill_ints(uint64_t seed, int lo, int hi) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> u(lo, hi);
    fill([&] { return static_cast<double>(u(rng)); });
  }

  // ---- visibility
  void band(int64_t mode, int64_t pre_t = kNoLimit, int64_t next_t = kNoLimit) {
    sparse_mode = mode;
    pre = pre_t;
    next = next_t;
  }
  void compressed_mask() {
    mask_kind = MaskKind::kCompressed;
    mask_rows = mask_cols = 2048;
    mask.assign(static_cast<size_t>(2048 * 2048), 0);
    for (int64_t a = 0; a < 2048; ++a)
      for (int64_t c = a + 1; c < 2048; ++c) mask[static_cast<size_t>(a * 2048 + c)] = 1;
  }
  void explicit_mask() {
    mask_kind = MaskKind::kExplicit;
    mask_rows = max_sq();
    mask_cols = max_skv();
    mask.assign(static_cast<size_t>(mask_rows * mask_cols), 0);
  }
  uint8_t& mask_at(int64_t i, int64_t j) { return mask[static_cast<size_t>(i * mask_cols + j)]; }
  uint8_t mask_at(int64_t i, int64_t j) const { return mask[static_cast<size_t>(i * mask_cols + j)]; }
  void random_mask(uint64_t seed, double p, double p_full) {
    explicit_mask();
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t i = 0; i < mask_rows; ++i) {
      const bool full = u(rng) < p_full;
      for (int64_t j = 0; j < mask_cols; ++j) mask_at(i, j) = (full || u(rng) < p) ? 1 : 0;
    }
  }
  bool has_mask() const { return mask_kind != MaskKind::kNone; }

  // §4 written again, independently of src/ops/window_attention/batches.h.
  bool visible(int64_t b, int64_t i, int64_t j) const {
    if (!has_mask()) return true;
    const long double I = static_cast<long double>(i), J = static_cast<long double>(j);
    const long double o = static_cast<long double>(skv(b) - sq(b));
    const long double P = static_cast<long double>(pre), N = static_cast<long double>(next);
    switch (sparse_mode) {
      case 0: return mask_at(i, j) == 0 && I - P <= J && J <= I + N;
      case 1: return mask_at(i, j) == 0;
      case 2: return j <= i;
      case 3: return J <= I + o;
      case 4: return I + o - P <= J && J <= I + o + N;
    }
    return false;
  }

  std::string describe() const {
    std::ostringstream os;
    os << nsa::dtype_name(dtype) << " N1=" << N1 << " N2=" << N2 << " D=" << D << " Dv=" << Dv << " mode=" << sparse_mode
       << " pre=" << pre << " next=" << next << " ip=" << inner_precise << " mask=" << static_cast<int>(mask_kind)
       << " layout=" << static_cast<int>(layout) << " q=[";
    for (size_t i = 0; i < qlist.size(); ++i) os << (i ? "," : "") << qlist[i];
    os << "] kv=[";
    for (size_t i = 0; i < kvlist.size(); ++i) os << (i ? "," : "") << kvlist[i];
    os << "] extra_kv=" << extra_kv_rows;
    return os.str();
  }
};

// Every buffer of one call, materialized from a case; outputs filled with 0xFF (NaN) so that a missing write and any
// write at all are both detectable.
struct Bound {
  nsa_test::Storage3 qs, ks, vs, dys, os;
  std::vector<uint8_t> mask_bytes;
  std::vector<int64_t> qlist, kvlist;
  std::vector<unsigned char> out, dq, dk, dv;
  std::vector<float> smax, ssum;
  WindowAttentionParams p;
  WindowAttentionGradParams g;

  explicit Bound(const WCase& c) {
    const int64_t qsz[3] = {c.T1(), c.N1, c.D}, ksz[3] = {c.T2(), c.N2, c.D}, vsz[3] = {c.T2(), c.N2, c.Dv},
                  osz[3] = {c.T1(), c.N1, c.Dv};
    nsa_test::materialize3(c.q, qsz, c.q_layout, c.dtype, &qs);
    nsa_test::materialize3(c.k, ksz, c.k_layout, c.dtype, &ks);
    nsa_test::materialize3(c.v, vsz, c.v_layout, c.dtype, &vs);
    nsa_test::materialize3(c.dy, osz, c.dy_layout, c.dtype, &dys);
    p.dtype = c.dtype;
    p.query = qs.view;
    p.key = ks.view;
    p.value = vs.view;
    p.scale = c.scale;
    p.head_num = c.N1;
    p.sparse_mode = c.sparse_mode;
    p.pre_tockens = c.pre;
    p.next_tockens = c.next;
    p.inner_precise = c.inner_precise;
    p.softmax_layout = c.layout;
    if (c.mask_kind == MaskKind::kExplicit || c.mask_kind == MaskKind::kCompressed) {
      mask_bytes = c.mask;
      p.atten_mask.data = mask_bytes.data();
      p.atten_mask.size[0] = c.mask_rows;
      p.atten_mask.size[1] = c.mask_cols;
      if (c.mask_transposed) {  // the same logical mask stored column-major
        for (int64_t i = 0; i < c.mask_rows; ++i)
          for (int64_t j = 0; j < c.mask_cols; ++j)
            mask_bytes[static_cast<size_t>(j * c.mask_rows + i)] = c.mask[static_cast<size_t>(i * c.mask_cols + j)];
        p.atten_mask.stride[0] = 1;
        p.atten_mask.stride[1] = c.mask_rows;
      } else {
        p.atten_mask.stride[0] = c.mask_cols;
        p.atten_mask.stride[1] = 1;
      }
    }
    p.compressed_mask_implied = c.mask_kind == MaskKind::kImplied;
    qlist = c.qlist;
    kvlist = c.kvlist;
    p.actual_seq_qlen = {qlist.data(), static_cast<int64_t>(qlist.size())};
    p.actual_seq_kvlen = {kvlist.data(), static_cast<int64_t>(kvlist.size())};
    const size_t es = nsa::dtype_size(c.dtype);
    out.assign(std::max<size_t>(1, static_cast<size_t>(c.T1() * c.N1 * c.Dv) * es), 0xFF);
    smax.assign(std::max<size_t>(1, static_cast<size_t>(c.T1() * c.N1 * 8)), 0.0f);
    ssum.assign(smax.size(), 0.0f);
    std::memset(smax.data(), 0xFF, smax.size() * 4);
    std::memset(ssum.data(), 0xFF, ssum.size() * 4);
    p.attention_out = out.data();
    p.softmax_max = smax.data();
    p.softmax_sum = ssum.data();
    dq.assign(std::max<size_t>(1, static_cast<size_t>(c.T1() * c.N1 * c.D) * es), 0xFF);
    dk.assign(std::max<size_t>(1, static_cast<size_t>(c.T2() * c.N2 * c.D) * es), 0xFF);
    dv.assign(std::max<size_t>(1, static_cast<size_t>(c.T2() * c.N2 * c.Dv) * es), 0xFF);
    g.fwd = p;
    g.dy = dys.view;
    g.softmax_max = smax.data();
    g.softmax_sum = ssum.data();
    g.grad_query = dq.data();
    g.grad_key = dk.data();
    g.grad_value = dv.data();
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;

  // The forward's outputs as the backward's inputs (attention_in = attention_out, contiguous).
  void use_forward_outputs(DType dt) {
    g.attention_in.data = out.data();
    g.attention_in.size[0] = p.query.size[0];
    g.attention_in.size[1] = p.query.size[1];
    g.attention_in.size[2] = p.value.size[2];
    g.attention_in.stride[2] = 1;
    g.attention_in.stride[1] = p.value.size[2];
    g.attention_in.stride[0] = p.value.size[2] * p.query.size[1];
    (void)dt;
  }
  bool forward_untouched() const {
    auto ff = [](const void* x, size_t n) {
      const unsigned char* c = static_cast<const unsigned char*>(x);
      return std::all_of(c, c + n, [](unsigned char b) { return b == 0xFF; });
    };
    return ff(out.data(), out.size()) && ff(smax.data(), smax.size() * 4) && ff(ssum.data(), ssum.size() * 4);
  }
  bool grads_untouched() const {
    auto ff = [](const std::vector<unsigned char>& x) {
      return std::all_of(x.begin(), x.end(), [](unsigned char b) { return b == 0xFF; });
    };
    return ff(dq) && ff(dk) && ff(dv);
  }
};

// ---------------------------------------------------------------------------------------------- running
enum class Fwd { kReference, kRefFp32, kRefFp64, kCpu };

struct FwdResult {
  Status status;
  std::vector<double> out;
  std::vector<unsigned char> out_bytes;
  std::vector<float> smax, ssum;
};

inline Status call_forward(Fwd b, const WindowAttentionParams& p, const nsa::CpuOptions& o = {},
                           const nsa::window_cpu::Tuning* tu = nullptr) {
  switch (b) {
    case Fwd::kReference: return nsa::window_attention_reference(p);
    case Fwd::kRefFp32: return nsa::window_reference::forward_fp32(p);
    case Fwd::kRefFp64: return nsa::window_reference::forward_fp64(p);
    case Fwd::kCpu: return tu ? nsa::window_cpu::forward(p, o, *tu) : nsa::window_attention_cpu(p, o);
  }
  return Status::Error("bad backend");
}

inline FwdResult collect_forward(const WCase& c, const Bound& bd, Status st) {
  FwdResult r;
  r.status = st;
  const size_t n = static_cast<size_t>(c.T1() * c.N1 * c.Dv);
  r.out.resize(n);
  for (size_t i = 0; i < n; ++i) r.out[i] = nsa::detail::load_f64(bd.out.data(), static_cast<int64_t>(i), c.dtype);
  r.out_bytes.assign(bd.out.begin(), bd.out.begin() + static_cast<std::ptrdiff_t>(n * nsa::dtype_size(c.dtype)));
  r.smax.assign(bd.smax.begin(), bd.smax.begin() + c.T1() * c.N1 * 8);
  r.ssum.assign(bd.ssum.begin(), bd.ssum.begin() + c.T1() * c.N1 * 8);
  return r;
}

inline FwdResult run_forward(const WCase& c, Fwd b, int isa = -1, int threads = 0,
                             const nsa::window_cpu::Tuning* tu = nullptr) {
  Bound bd(c);
  const Status st = call_forward(b, bd.p, nsa::CpuOptions{isa, threads}, tu);
  return collect_forward(c, bd, st);
}

enum class Bwd { kReference, kRefFp32, kRefFp64, kCpu };

struct BwdResult {
  Status status;
  std::vector<double> dq, dk, dv;
  std::vector<unsigned char> bytes;  // dq | dk | dv as stored
};

inline Status call_backward(Bwd b, const WindowAttentionGradParams& g, const nsa::CpuOptions& o = {},
                            const nsa::window_cpu::Tuning* tu = nullptr) {
  switch (b) {
    case Bwd::kReference: return nsa::window_attention_backward_reference(g);
    case Bwd::kRefFp32: return nsa::window_reference::backward_fp32(g);
    case Bwd::kRefFp64: return nsa::window_reference::backward_fp64(g);
    case Bwd::kCpu: return tu ? nsa::window_cpu::backward(g, o, *tu) : nsa::window_attention_backward_cpu(g, o);
  }
  return Status::Error("bad backend");
}

// The backward of a case: the forward of the fp64 reference provides attention_in and the statistics (the same for
// every backend compared), then backend b.
inline BwdResult run_backward(const WCase& c, Bwd b, int isa = -1, int threads = 0,
                              const nsa::window_cpu::Tuning* tu = nullptr) {
  Bound bd(c);
  BwdResult r;
  r.status = nsa::window_reference::forward_fp64(bd.p);
  if (!r.status.ok()) return r;
  bd.use_forward_outputs(c.dtype);
  r.status = call_backward(b, bd.g, nsa::CpuOptions{isa, threads}, tu);
  auto conv = [&](const std::vector<unsigned char>& raw, size_t n, std::vector<double>& dst) {
    dst.resize(n);
    for (size_t i = 0; i < n; ++i) dst[i] = nsa::detail::load_f64(raw.data(), static_cast<int64_t>(i), c.dtype);
  };
  conv(bd.dq, static_cast<size_t>(c.T1() * c.N1 * c.D), r.dq);
  conv(bd.dk, static_cast<size_t>(c.T2() * c.N2 * c.D), r.dk);
  conv(bd.dv, static_cast<size_t>(c.T2() * c.N2 * c.Dv), r.dv);
  r.bytes = bd.dq;
  r.bytes.insert(r.bytes.end(), bd.dk.begin(), bd.dk.end());
  r.bytes.insert(r.bytes.end(), bd.dv.begin(), bd.dv.end());
  return r;
}

// ---------------------------------------------------------------------------------------------- fp64 model
// Independent of src/: per row the visible keys (WCase::visible), a dense softmax in double, attention_out with P
// rounded (rha) as §5 step 4, and the magnitudes of every sum for the tolerance floors.
struct Model {
  std::vector<double> out;      // attention_out (rounded to the dtype, rha)
  std::vector<double> m, l;     // per (t, h): statistics (§6 values for rows without a visible key)
  std::vector<double> pv_abs;   // per output element: sum_j |rha(P_j)| |v_j| (or the uniform form's)
  std::vector<double> pv_flip;  // per output element (bf16/fp16): max_j ulp(P_j) |v_j|
  std::vector<double> dot_abs;  // per (t, h): |scale| max_j sum_d |q_d k_jd|
  std::vector<char> none;       // per (t, h): no visible key
  // gradients (P unrounded, exact derivative of §5 with exact arithmetic) and their magnitudes
  std::vector<double> dq, dk, dv, dq_abs, dk_abs, dv_abs;
};

// rha_T of a probability (§5 step 4): identity for fp32 and fp64 inputs.
inline double rha_p(DType dt, double x) {
  if (dt == DType::kF32 || dt == DType::kF64) return x;
  return static_cast<double>(nsa::window_detail::round_rha(static_cast<float>(x), dt));
}
// An output stored in the dtype with rha_T (fp32: to float; fp64: unchanged).
inline double rha_out(DType dt, double x) {
  return dt == DType::kF64 ? x : static_cast<double>(nsa::window_detail::round_rha(static_cast<float>(x), dt));
}

inline Model make_model(const WCase& c, bool grads = false) {
  Model md;
  const int64_t T1 = c.T1(), N1 = c.N1, G = c.G(), D = c.D, Dv = c.Dv;
  const bool low = c.dtype == DType::kBF16 || c.dtype == DType::kF16;
  md.out.assign(static_cast<size_t>(T1 * N1 * Dv), 0.0);
  md.pv_abs.assign(md.out.size(), 0.0);
  md.pv_flip.assign(md.out.size(), 0.0);
  md.m.assign(static_cast<size_t>(T1 * N1), 0.0);
  md.l.assign(md.m.size(), 0.0);
  md.dot_abs.assign(md.m.size(), 0.0);
  md.none.assign(md.m.size(), 0);
  if (grads) {
    md.dq.assign(static_cast<size_t>(T1 * N1 * D), 0.0);
    md.dq_abs.assign(md.dq.size(), 0.0);
    md.dk.assign(static_cast<size_t>(c.T2() * c.N2 * D), 0.0);
    md.dk_abs.assign(md.dk.size(), 0.0);
    md.dv.assign(static_cast<size_t>(c.T2() * c.N2 * Dv), 0.0);
    md.dv_abs.assign(md.dv.size(), 0.0);
  }
  const double scale = static_cast<float>(c.scale);
  for (int64_t b = 0; b < c.B(); ++b) {
    const int64_t Skv = c.skv(b), kb = c.k0(b);
    for (int64_t i = 0; i < c.sq(b); ++i) {
      const int64_t t = c.q0(b) + i;
      std::vector<int64_t> keys;
      for (int64_t j = 0; j < Skv; ++j)
        if (c.visible(b, i, j)) keys.push_back(kb + j);
      for (int64_t h = 0; h < N1; ++h) {
        const int64_t n2 = h / G, th = t * N1 + h;
        if (keys.empty()) {
          md.none[static_cast<size_t>(th)] = 1;
          md.m[static_cast<size_t>(th)] = -FLT_MAX;
          if (c.inner_precise == 2) {
            md.l[static_cast<size_t>(th)] = FLT_MAX;
          } else {
            md.l[static_cast<size_t>(th)] = static_cast<double>(Skv);
            const double pu = rha_p(c.dtype, 1.0 / static_cast<double>(Skv));
            for (int64_t e = 0; e < Dv; ++e) {
              double a = 0, aa = 0;
              for (int64_t j = 0; j < Skv; ++j) {
                a += pu * c.v[c.vi(kb + j, n2, e)];
                aa += std::fabs(pu * c.v[c.vi(kb + j, n2, e)]);
              }
              md.out[c.oi(t, h, e)] = rha_out(c.dtype, a);
              md.pv_abs[c.oi(t, h, e)] = aa;
            }
            if (grads)
              for (int64_t j = 0; j < Skv; ++j)
                for (int64_t e = 0; e < Dv; ++e) {
                  md.dv[c.vi(kb + j, n2, e)] += c.dy[c.oi(t, h, e)] / static_cast<double>(Skv);
                  md.dv_abs[c.vi(kb + j, n2, e)] += std::fabs(c.dy[c.oi(t, h, e)]) / static_cast<double>(Skv);
                }
          }
          continue;
        }
        std::vector<double> S(keys.size()), P(keys.size());
        double dabs = 0;
        for (size_t x = 0; x < keys.size(); ++x) {
          double dot = 0, aa = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += c.q[c.qi(t, h, d)] * c.k[c.ki(keys[x], n2, d)];
            aa += std::fabs(c.q[c.qi(t, h, d)] * c.k[c.ki(keys[x], n2, d)]);
          }
          S[x] = dot * scale;
          dabs = std::max(dabs, aa * std::fabs(scale));
        }
        md.dot_abs[static_cast<size_t>(th)] = dabs;
        const double m = *std::max_element(S.begin(), S.end());
        double l = 0;
        for (double s : S) l += std::exp(s - m);
        for (size_t x = 0; x < keys.size(); ++x) P[x] = std::exp(S[x] - m) / l;
        md.m[static_cast<size_t>(th)] = m;
        md.l[static_cast<size_t>(th)] = l;
        for (int64_t e = 0; e < Dv; ++e) {
          double a = 0, aa = 0, f = 0;
          for (size_t x = 0; x < keys.size(); ++x) {
            const double pr = rha_p(c.dtype, P[x]), vv = c.v[c.vi(keys[x], n2, e)];
            a += pr * vv;
            aa += std::fabs(pr * vv);
            if (low) f = std::max(f, ulp_of(c.dtype, P[x]) * std::fabs(vv));
          }
          md.out[c.oi(t, h, e)] = rha_out(c.dtype, a);
          md.pv_abs[c.oi(t, h, e)] = aa;
          md.pv_flip[c.oi(t, h, e)] = f;
        }
        if (!grads) continue;
        // exact derivative of o = sum_j P_j v_j (unrounded P) for the loss sum dy . o
        double dlt = 0;
        for (int64_t e = 0; e < Dv; ++e) {
          double o = 0;
          for (size_t x = 0; x < keys.size(); ++x) o += P[x] * c.v[c.vi(keys[x], n2, e)];
          dlt += c.dy[c.oi(t, h, e)] * o;
        }
        for (size_t x = 0; x < keys.size(); ++x) {
          double dp = 0;
          for (int64_t e = 0; e < Dv; ++e) dp += c.dy[c.oi(t, h, e)] * c.v[c.vi(keys[x], n2, e)];
          const double ds = P[x] * (dp - dlt);
          const double ds_abs = P[x] * (std::fabs(dp) + std::fabs(dlt));
          for (int64_t d = 0; d < D; ++d) {
            md.dq[c.qi(t, h, d)] += scale * ds * c.k[c.ki(keys[x], n2, d)];
            md.dq_abs[c.qi(t, h, d)] += std::fabs(scale) * ds_abs * std::fabs(c.k[c.ki(keys[x], n2, d)]);
            md.dk[c.ki(keys[x], n2, d)] += scale * ds * c.q[c.qi(t, h, d)];
            md.dk_abs[c.ki(keys[x], n2, d)] += std::fabs(scale) * ds_abs * std::fabs(c.q[c.qi(t, h, d)]);
          }
          for (int64_t e = 0; e < Dv; ++e) {
            md.dv[c.vi(keys[x], n2, e)] += P[x] * c.dy[c.oi(t, h, e)];
            md.dv_abs[c.vi(keys[x], n2, e)] += P[x] * std::fabs(c.dy[c.oi(t, h, e)]);
          }
        }
      }
    }
  }
  return md;
}

// Offset of the statistic of (t, h) in the case's layout (§5).
inline int64_t stat_index(const WCase& c, int64_t t, int64_t h) {
  if (c.layout == StatsLayout::kTnd) return (t * c.N1 + h) * 8;
  const int64_t b = c.batch_of(t);
  return 8 * c.N1 * c.q0(b) + (h * c.sq(b) + (t - c.q0(b))) * 8;
}

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

// Every output written once: statistics' 8 copies equal and not NaN, attention_out not NaN.
inline AssertionResult check_complete(const WCase& c, const FwdResult& r) {
  if (!r.status.ok()) return AssertionFailure() << "call failed: " << r.status.message();
  for (int64_t t = 0; t < c.T1(); ++t)
    for (int64_t h = 0; h < c.N1; ++h) {
      const size_t o = static_cast<size_t>(stat_index(c, t, h));
      for (int x = 1; x < 8; ++x)
        if (std::memcmp(&r.smax[o], &r.smax[o + x], 4) || std::memcmp(&r.ssum[o], &r.ssum[o + x], 4))
          return AssertionFailure() << "statistics of (t=" << t << ", h=" << h << ") differ between copies";
      if (std::isnan(r.smax[o]) || std::isnan(r.ssum[o]))
        return AssertionFailure() << "statistic of (t=" << t << ", h=" << h << ") is NaN (not written?)";
      for (int64_t e = 0; e < c.Dv; ++e)
        if (std::isnan(r.out[c.oi(t, h, e)]))
          return AssertionFailure() << "attention_out[" << t << "][" << h << "][" << e << "] is NaN (not written?)";
    }
  return AssertionSuccess();
}

// attention_out vs the model: err <= 2 x (plain's max error) + ulp(model) + acc_eps * pv_abs + 2 * pv_flip.
inline AssertionResult check_out(const WCase& c, const FwdResult& got, const FwdResult& plain, const Model& md) {
  double plain_err = 0;
  for (size_t i = 0; i < md.out.size(); ++i) plain_err = std::max(plain_err, std::fabs(plain.out[i] - md.out[i]));
  const double acc_eps = c.dtype == DType::kF64 ? DBL_EPSILON * (16 + static_cast<double>(c.max_skv())) : 16 * FLT_EPSILON;
  for (size_t i = 0; i < md.out.size(); ++i) {
    const double err = std::fabs(got.out[i] - md.out[i]);
    const double tol = 2 * plain_err + ulp_of(c.dtype, md.out[i]) + acc_eps * md.pv_abs[i] + 2 * md.pv_flip[i];
    if (!(err <= tol)) {
      const int64_t e = static_cast<int64_t>(i) % c.Dv, th = static_cast<int64_t>(i) / c.Dv;
      return AssertionFailure() << "attention_out[" << th / c.N1 << "][" << th % c.N1 << "][" << e << "]: got "
                                << got.out[i] << ", model " << md.out[i] << ", error " << err << " > tolerance " << tol
                                << " (plain error " << plain_err << ")";
    }
  }
  return AssertionSuccess();
}

// Statistics vs the model: rtol 1e-5 (plus the dot-product rounding bound for maxima near 0); rows without a
// visible key exactly (§6).
inline AssertionResult check_stats(const WCase& c, const FwdResult& got, const Model& md) {
  for (int64_t t = 0; t < c.T1(); ++t)
    for (int64_t h = 0; h < c.N1; ++h) {
      const size_t o = static_cast<size_t>(stat_index(c, t, h)), th = static_cast<size_t>(t * c.N1 + h);
      const double gm = got.smax[o], gs = got.ssum[o];
      if (md.none[th]) {
        if (got.smax[o] != -FLT_MAX || got.ssum[o] != static_cast<float>(md.l[th]))
          return AssertionFailure() << "row without visible key t=" << t << " h=" << h << ": softmax_max " << gm
                                    << ", softmax_sum " << gs << " (want -FLT_MAX, " << md.l[th] << ")";
        continue;
      }
      const double dot_tol = static_cast<double>(c.D) * FLT_EPSILON * md.dot_abs[th];
      if (!(std::fabs(gm - md.m[th]) <= 1e-5 * std::fabs(md.m[th]) + dot_tol))
        return AssertionFailure() << "softmax_max of t=" << t << " h=" << h << ": got " << gm << ", model " << md.m[th];
      if (!(std::fabs(gs - md.l[th]) <= (1e-5 + 2 * dot_tol) * std::fabs(md.l[th])))
        return AssertionFailure() << "softmax_sum of t=" << t << " h=" << h << ": got " << gs << ", model " << md.l[th];
    }
  return AssertionSuccess();
}

inline AssertionResult bitwise_equal(const FwdResult& a, const FwdResult& b) {
  if (!a.status.ok() || !b.status.ok()) return AssertionFailure() << "a call failed: " << a.status.message() << b.status.message();
  if (a.out_bytes != b.out_bytes) {
    for (size_t i = 0; i < a.out.size(); ++i)
      if (std::memcmp(&a.out[i], &b.out[i], sizeof(double)))
        return AssertionFailure() << "attention_out differs at flat element " << i << ": " << a.out[i] << " vs " << b.out[i];
    return AssertionFailure() << "attention_out bytes differ";
  }
  if (std::memcmp(a.smax.data(), b.smax.data(), a.smax.size() * 4)) return AssertionFailure() << "softmax_max differs";
  if (std::memcmp(a.ssum.data(), b.ssum.data(), a.ssum.size() * 4)) return AssertionFailure() << "softmax_sum differs";
  return AssertionSuccess();
}

// The oracle of a forward case.
struct Oracle {
  FwdResult model;  // window_reference::forward_fp64
  FwdResult plain;  // forward_fp32 (forward_fp64 for fp64 inputs)
  Model md;         // independent fp64 model
};

inline Oracle make_oracle(const WCase& c) {
  Oracle o;
  o.model = run_forward(c, Fwd::kRefFp64);
  o.plain = c.dtype == DType::kF64 ? o.model : run_forward(c, Fwd::kRefFp32);
  o.md = make_model(c);
  return o;
}

// The reference's fp64 model against the independent one (same arithmetic up to summation order: a few ulps of
// the output dtype at most, where a P sits on a rounding boundary), then `got` against both rules.
inline AssertionResult check_forward(const WCase& c, const Oracle& o, const FwdResult& got) {
  AssertionResult r = check_complete(c, got);
  if (!r) return r;
  if (!(r = check_out(c, got, o.plain, o.md))) return r;
  return check_stats(c, got, o.md);
}

}  // namespace wa_test
