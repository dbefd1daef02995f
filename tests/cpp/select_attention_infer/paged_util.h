// Test support of the paged decode attention operators (docs/spec/decode.md §4 select_attention_infer, §9
// paged_window_attention): a case builder owning a paged cache, its block table and the queries; the params of
// both operators; an fp64 model written from the contract independently of src/ops (the positions each query
// token sees, the softmax in double, the roundings of P of §4 step 4 / window_attention.md §5 step 4); and the
// comparison rule.
//
// Cache contents: every element starts as NaN; the positions < S_b of each batch are then filled with values
// representable in the dtype, so that a read of any other row (a page not in the table, rows past S_b in a
// batch's last page, -1 table padding) shows as NaN. Pages are assigned to batches in a shuffled order; the table
// entries past a batch's last page hold -1. Outputs are pre-filled with 0xFF bytes so that a missing write and any
// write of a rejected call show.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/numeric.h"
#include "common/test_tensors.h"
#include "nsa/paged_window_attention.h"
#include "nsa/select_attention_infer.h"
#include "ops/select_attention/rounding.h"

namespace paged_test {

using nsa::CpuIsa;
using nsa::DType;
using nsa::Status;

using nsa_test::kAllDtypes;
using nsa_test::supported_isas;
using nsa_test::ulp_of;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// x rounded to the dtype to nearest even, as a double.
inline double rne(DType dt, double x) { return nsa_test::round_to(dt, x); }

// rha_T of the float value of x for bf16 / fp16 (how the contracts round P); x otherwise.
inline double rha(DType dt, double x) {
  if (dt == DType::kBF16 || dt == DType::kF16) return nsa::select_detail::round_rha(static_cast<float>(x), dt);
  return x;
}

// A dtype buffer of n elements holding the doubles `v` (rounded to nearest even).
struct Buf {
  DType dt = DType::kF32;
  std::vector<unsigned char> bytes;
  void assign(DType d, const std::vector<double>& v) {
    dt = d;
    bytes.assign(v.size() * nsa::dtype_size(d), 0);
    for (size_t i = 0; i < v.size(); ++i) nsa::detail::store_f64(bytes.data(), static_cast<int64_t>(i), v[i], d);
  }
  double at(int64_t i) const { return nsa::detail::load_f64(bytes.data(), i, dt); }
  const void* data() const { return bytes.data(); }
};

struct PCase {
  DType dt = DType::kF32;
  int64_t B = 0, N1 = 0, N2 = 0, D = 0, Dv = 0, P = 0, num_pages = 0, max_pages = 0;
  std::vector<int64_t> q, s;  // per batch q_b, S_b
  int64_t batch_rows = 0;     // select_attention_infer: 0 packed (TND), else Sq (BSND / BSH)
  std::vector<int32_t> table;  // [B][max_pages]
  std::vector<double> qv, kv, vv;  // logical values: query [T][N1][D], caches [num_pages][P][N2][D | Dv]
  // select_attention_infer
  int64_t lp = 1, K = 1;
  std::vector<int64_t> topk;  // [T][N2][K]
  bool topk64 = false;
  // paged_window_attention
  int64_t window = 1;
  bool pass_query_lens = true;  // false: query_lens absent (1 each)
  double scale = 1.0;

  Buf qb, kb, vb;
  std::vector<int32_t> topk32;
  std::vector<int64_t> topk64v;

  int64_t rows_of(int64_t b) const { return batch_rows > 0 ? batch_rows : q[static_cast<size_t>(b)]; }
  int64_t T() const {
    int64_t t = 0;
    for (int64_t b = 0; b < B; ++b) t += rows_of(b);
    return t;
  }
  int64_t row0(int64_t b) const {
    int64_t t = 0;
    for (int64_t c = 0; c < b; ++c) t += rows_of(c);
    return t;
  }
  int64_t qi(int64_t t, int64_t h, int64_t d) const { return (t * N1 + h) * D + d; }
  int64_t ki(int64_t page, int64_t r, int64_t n2, int64_t d) const { return ((page * P + r) * N2 + n2) * D + d; }
  int64_t vi(int64_t page, int64_t r, int64_t n2, int64_t d) const { return ((page * P + r) * N2 + n2) * Dv + d; }
  int64_t& index(int64_t t, int64_t n2, int64_t j) { return topk[static_cast<size_t>((t * N2 + n2) * K + j)]; }
  int64_t index_at(int64_t t, int64_t n2, int64_t j) const { return topk[static_cast<size_t>((t * N2 + n2) * K + j)]; }
  // The page and row of position p of batch b.
  int64_t page_of(int64_t b, int64_t p) const { return table[static_cast<size_t>(b * max_pages + p / P)]; }

  // Sizes, a shuffled block table with `spare` unused pages and one -1 column, NaN caches; no values yet.
  static PCase make(DType dt, std::vector<int64_t> q, std::vector<int64_t> s, int64_t N1, int64_t N2, int64_t D,
                    int64_t Dv, int64_t P, std::mt19937& rng, int64_t spare = 2) {
    PCase c;
    c.dt = dt;
    c.B = static_cast<int64_t>(s.size());
    c.q = std::move(q);
    c.s = std::move(s);
    c.N1 = N1;
    c.N2 = N2;
    c.D = D;
    c.Dv = Dv;
    c.P = P;
    int64_t used = 0;
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t pages = (c.s[static_cast<size_t>(b)] + P - 1) / P;
      used += pages;
      c.max_pages = std::max(c.max_pages, pages + 1);
    }
    c.num_pages = used + spare;
    std::vector<int32_t> perm(static_cast<size_t>(c.num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    c.table.assign(static_cast<size_t>(c.B * c.max_pages), -1);
    size_t next = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t k = 0; k < (c.s[static_cast<size_t>(b)] + P - 1) / P; ++k)
        c.table[static_cast<size_t>(b * c.max_pages + k)] = perm[next++];
    c.qv.assign(static_cast<size_t>(c.T() * N1 * D), 0.0);
    c.kv.assign(static_cast<size_t>(c.num_pages * P * N2 * D), kNaN);
    c.vv.assign(static_cast<size_t>(c.num_pages * P * N2 * Dv), kNaN);
    return c;
  }

  // Uniform values in [lo, hi) (rounded to the dtype) for the queries and the positions < S_b of the caches.
  void fill_uniform(std::mt19937& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (double& x : qv) x = rne(dt, u(rng));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < s[static_cast<size_t>(b)]; ++p)
        for (int64_t n2 = 0; n2 < N2; ++n2) {
          for (int64_t d = 0; d < D; ++d) kv[static_cast<size_t>(ki(page_of(b, p), p % P, n2, d))] = rne(dt, u(rng));
          for (int64_t d = 0; d < Dv; ++d) vv[static_cast<size_t>(vi(page_of(b, p), p % P, n2, d))] = rne(dt, u(rng));
        }
  }

  // select_attention_infer: K random slots per (row, KV head): -1 with probability p_empty, else a valid block
  // (duplicates allowed); rows past q_b of a batch-major case hold garbage indices (never read).
  void random_indices(std::mt19937& rng, int64_t block, int64_t k, double p_empty = 0.2) {
    lp = block;
    K = k;
    topk.assign(static_cast<size_t>(T() * N2 * K), 0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t blocks = (s[static_cast<size_t>(b)] + lp - 1) / lp;
      for (int64_t i = 0; i < rows_of(b); ++i)
        for (int64_t n2 = 0; n2 < N2; ++n2)
          for (int64_t j = 0; j < K; ++j) {
            int64_t x = u(rng) < p_empty ? -1 : static_cast<int64_t>(u(rng) * static_cast<double>(blocks));
            if (i >= q[static_cast<size_t>(b)]) x = 1000000 + j;  // never read
            index(row0(b) + i, n2, j) = x;
          }
    }
  }

  // Writes the dtype buffers from the logical values (call after every change of the values).
  void pack() {
    qb.assign(dt, qv);
    kb.assign(dt, kv);
    vb.assign(dt, vv);
    topk32.assign(topk.begin(), topk.end());
    topk64v = topk;
  }

  nsa::PagedCacheView cache(const Buf& b, int64_t d) const {
    nsa::PagedCacheView v;
    v.data = b.data();
    const int64_t sz[4] = {num_pages, P, N2, d};
    const int64_t st[4] = {P * N2 * d, N2 * d, d, 1};
    for (int i = 0; i < 4; ++i) {
      v.size[i] = sz[i];
      v.stride[i] = st[i];
    }
    return v;
  }
  // The same cache with every element followed by a gap element (element stride 2, row strides doubled): rows that
  // are not contiguous, which the CPU backend packs instead of reading in place. spread: the buffer it reads.
  nsa::PagedCacheView spread_cache(const Buf& b, int64_t d, std::vector<unsigned char>& spread) const {
    const size_t esz = nsa::dtype_size(b.dt), n = b.bytes.size() / esz;
    spread.assign(2 * b.bytes.size(), 0xff);  // gaps hold NaN / -1 bit patterns, never read
    for (size_t i = 0; i < n; ++i) std::memcpy(spread.data() + 2 * i * esz, b.bytes.data() + i * esz, esz);
    nsa::PagedCacheView v = cache(b, d);
    v.data = spread.data();
    for (int i = 0; i < 4; ++i) v.stride[i] *= 2;
    return v;
  }
  nsa::Tensor2 table_view() const {
    nsa::Tensor2 t;
    t.data = table.data();
    t.size[0] = B;
    t.size[1] = max_pages;
    t.stride[0] = max_pages;
    t.stride[1] = 1;
    return t;
  }
  nsa::Tensor3 query_view() const {
    nsa::Tensor3 t;
    t.data = qb.data();
    t.size[0] = T();
    t.size[1] = N1;
    t.size[2] = D;
    t.stride[0] = N1 * D;
    t.stride[1] = D;
    t.stride[2] = 1;
    return t;
  }

  // The params of each operator over this case's buffers (the vectors below must outlive them).
  nsa::SelectAttentionInferParams select_params(void* out) const {
    nsa::SelectAttentionInferParams p;
    p.dtype = dt;
    p.query = query_view();
    p.batch_rows = batch_rows;
    p.key = cache(kb, D);
    p.value = cache(vb, Dv);
    p.topk_indices.data = topk64 ? static_cast<const void*>(topk64v.data()) : static_cast<const void*>(topk32.data());
    p.topk_indices.size[0] = T();
    p.topk_indices.size[1] = N2;
    p.topk_indices.size[2] = K;
    p.topk_indices.stride[0] = N2 * K;
    p.topk_indices.stride[1] = K;
    p.topk_indices.stride[2] = 1;
    p.index_int64 = topk64;
    p.block_table = table_view();
    p.scale_value = scale;
    p.head_num = N1;
    p.key_value_head_num = N2;
    p.select_block_size = lp;
    p.select_block_count = K;
    p.page_block_size = P;
    p.actual_seq_qlen = {q.data(), B};
    p.actual_seq_kvlen = {s.data(), B};
    p.attention_out = out;
    return p;
  }
  nsa::PagedWindowAttentionParams window_params(void* out) const {
    nsa::PagedWindowAttentionParams p;
    p.dtype = dt;
    p.query = query_view();
    p.key_cache = cache(kb, D);
    p.value_cache = cache(vb, Dv);
    p.block_table = table_view();
    p.window = window;
    p.scale = scale;
    p.seq_lens = {s.data(), B};
    if (pass_query_lens) p.query_lens = {q.data(), B};
    p.attention_out = out;
    return p;
  }
  size_t out_bytes() const { return static_cast<size_t>(T() * N1 * Dv) * nsa::dtype_size(dt); }
};

// ------------------------------------------------------------------------------------ fp64 model

// Per output element: the model value (unrounded) and the tolerance of the comparison rule below.
struct Model {
  std::vector<double> out, tol;
  std::vector<char> zero;  // a row the contract makes exactly zero
};

// The positions query token i of batch b sees: §4 step 1 (select) or §9 (window), from the contract's words.
inline std::vector<int64_t> select_positions(const PCase& c, int64_t b, int64_t i, int64_t n2) {
  std::vector<int64_t> pos;
  const int64_t qb = c.q[static_cast<size_t>(b)], L = c.s[static_cast<size_t>(b)] - (qb - 1 - i);
  for (int64_t j = 0; j < c.K; ++j) {
    const int64_t x = c.index_at(c.row0(b) + i, n2, j);
    if (x == -1) continue;
    for (int64_t p = x * c.lp; p < (x + 1) * c.lp && p < L; ++p) pos.push_back(p);
  }
  return pos;
}
inline std::vector<int64_t> window_positions(const PCase& c, int64_t b, int64_t i) {
  std::vector<int64_t> pos;
  const int64_t qb = c.q[static_cast<size_t>(b)], L = c.s[static_cast<size_t>(b)] - (qb - 1 - i);
  for (int64_t p = std::max<int64_t>(0, L - c.window); p < L; ++p) pos.push_back(p);
  return pos;
}

// fp64 model; `select` picks §4 (unnormalised P rounded, divided last) or §9 (normalised P rounded). Tolerance per
// element: one ulp of the dtype at the value (the final rounding), twice the largest effect of one P rounding
// flipping (ulp_T(P_e) |v_e|, after the division for §4), and the fp32 accumulation and score errors (64 eps32 plus
// twice the relative error bound of the fp32 dot products) times the sum of |P_e v_e|.
inline Model model(const PCase& c, bool select) {
  Model m;
  const int64_t T = c.T();
  m.out.assign(static_cast<size_t>(T * c.N1 * c.Dv), 0.0);
  m.tol.assign(m.out.size(), 0.0);
  m.zero.assign(m.out.size(), 0);
  const DType dt = c.dt;
  const bool low = dt == DType::kBF16 || dt == DType::kF16;
  const double eps = dt == DType::kF64 ? DBL_EPSILON : FLT_EPSILON;
  const double scale = static_cast<float>(c.scale);
  const int64_t G = c.N1 / c.N2;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.rows_of(b); ++i) {
      const int64_t t = c.row0(b) + i;
      for (int64_t h = 0; h < c.N1; ++h) {
        const int64_t n2 = h / G;
        const size_t o = static_cast<size_t>((t * c.N1 + h) * c.Dv);
        std::vector<int64_t> pos;
        if (i < c.q[static_cast<size_t>(b)]) pos = select ? select_positions(c, b, i, n2) : window_positions(c, b, i);
        if (pos.empty()) {
          for (int64_t d = 0; d < c.Dv; ++d) m.zero[o + static_cast<size_t>(d)] = 1;
          continue;
        }
        std::vector<double> S(pos.size());
        double dot_rel = 0;
        for (size_t e = 0; e < pos.size(); ++e) {
          double dot = 0, dabs = 0;
          for (int64_t d = 0; d < c.D; ++d) {
            const double a = c.qv[static_cast<size_t>(c.qi(t, h, d))];
            const double k = c.kv[static_cast<size_t>(c.ki(c.page_of(b, pos[e]), pos[e] % c.P, n2, d))];
            dot += a * k;
            dabs += std::fabs(a * k);
          }
          S[e] = dot * scale;
          dot_rel = std::max(dot_rel, static_cast<double>(c.D) * eps * dabs * std::fabs(scale));
        }
        const double mx = *std::max_element(S.begin(), S.end());
        double l = 0;
        for (double x : S) l += std::exp(x - mx);
        for (int64_t d = 0; d < c.Dv; ++d) {
          double acc = 0, pv_abs = 0, flip = 0;
          for (size_t e = 0; e < pos.size(); ++e) {
            const double v = c.vv[static_cast<size_t>(c.vi(c.page_of(b, pos[e]), pos[e] % c.P, n2, d))];
            const double pe = select ? std::exp(S[e] - mx) : std::exp(S[e] - mx) / l;
            const double pr = low ? rha(dt, pe) : pe;
            acc += pr * v;
            pv_abs += std::fabs(pr * v);
            if (low) flip = std::max(flip, ulp_of(dt, pe) * std::fabs(v));
          }
          if (select) {
            acc /= l;
            pv_abs /= l;
            flip /= l;
          }
          m.out[o + static_cast<size_t>(d)] = acc;
          m.tol[o + static_cast<size_t>(d)] = ulp_of(dt, acc) + 2 * flip + (64 * eps + 2 * dot_rel) * pv_abs;
        }
      }
    }
  return m;
}

// Every element within its tolerance of the model (rows the contract makes zero: exactly +0 bits).
inline ::testing::AssertionResult check(const PCase& c, const Model& m, const std::vector<unsigned char>& out) {
  for (size_t i = 0; i < m.out.size(); ++i) {
    const double got = nsa::detail::load_f64(out.data(), static_cast<int64_t>(i), c.dt);
    if (m.zero[i]) {
      if (!(got == 0.0 && !std::signbit(got)))
        return ::testing::AssertionFailure() << "element " << i << " must be zero (a row without entry), got " << got;
      continue;
    }
    const double err = std::fabs(got - m.out[i]);
    if (!(err <= m.tol[i]))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got << ", fp64 model " << m.out[i]
                                           << ", error " << err << " > tolerance " << m.tol[i];
  }
  return ::testing::AssertionSuccess();
}

// Output buffer pre-filled with 0xFF bytes.
inline std::vector<unsigned char> out_buffer(const PCase& c) { return std::vector<unsigned char>(c.out_bytes(), 0xFF); }

}  // namespace paged_test
