// Test support for npu_nsa_compress_attention_infer (docs/spec/decode.md §3): a case owning logical fp64 values (already
// representable in the case's dtype) of the query rows [rows][N1][D], the paged compressed keys
// [num_pages][P][N2 * D] and values [num_pages][P][N2 * Dv], the block table and the per-batch lengths; a runner
// for the reference and the CPU backend (outputs pre-filled with NaN / sentinel indices, so that an unwritten
// element is caught); and an independent fp64 model of §3 read token by token through the block table, with the
// comparison rules of §6.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/test_tensors.h"
#include "nsa/compress_attention_infer.h"

namespace nsa_cai_test {

using nsa::CpuIsa;
using nsa::DecodeLayout;
using nsa::DType;
using nsa::Status;
using nsa_test::round_to;
using nsa_test::ulp_of;

enum class Backend { kReference, kCpu };

struct CACase {
  DType dtype = DType::kF32;
  DecodeLayout layout = DecodeLayout::kTND;
  int64_t N1 = 1, N2 = 1, D = 16, Dv = 16, P = 4, num_pages = 1;
  int64_t l = 32, d = 16, lp = 64, K = 1, Sq = 1;
  double scale = 0.25;
  bool atten = false, pass_q = true, pass_s = true;
  int64_t kv_step = 1;  // element step of the last dim of key and value (2: gaps filled with NaN)
  std::vector<int64_t> q, C, S;  // per batch q_b, C_b, S_b
  std::vector<std::vector<int32_t>> table;
  std::vector<double> query, key, value;

  int64_t B() const { return static_cast<int64_t>(C.size()); }
  int64_t G() const { return N1 / N2; }
  int64_t rows() const {
    return layout == DecodeLayout::kBSND ? B() * Sq : std::accumulate(q.begin(), q.end(), int64_t(0));
  }
  int64_t max_pages() const { return table.empty() ? 0 : static_cast<int64_t>(table[0].size()); }
  int64_t row_of(int64_t b, int64_t i) const {
    if (layout == DecodeLayout::kBSND) return b * Sq + i;
    return std::accumulate(q.begin(), q.begin() + b, int64_t(0)) + i;
  }
  void resize() {
    query.assign(static_cast<size_t>(rows() * N1 * D), 0.0);
    key.assign(static_cast<size_t>(num_pages * P * N2 * D), 0.0);
    value.assign(static_cast<size_t>(num_pages * P * N2 * Dv), 0.0);
  }
  double& qv(int64_t r, int64_t h, int64_t j) { return query[static_cast<size_t>((r * N1 + h) * D + j)]; }
  double kv(int64_t b, int64_t c, int64_t n2, int64_t j) const {  // compressed token c of batch b, through the table
    const int64_t page = table[static_cast<size_t>(b)][static_cast<size_t>(c / P)];
    return key[static_cast<size_t>(((page * P + c % P) * N2 + n2) * D + j)];
  }
  double vv(int64_t b, int64_t c, int64_t n2, int64_t j) const {
    const int64_t page = table[static_cast<size_t>(b)][static_cast<size_t>(c / P)];
    return value[static_cast<size_t>(((page * P + c % P) * N2 + n2) * Dv + j)];
  }
  void fill_uniform(std::mt19937& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (double& x : query) x = round_to(dtype, u(rng));
    for (double& x : key) x = round_to(dtype, u(rng));
    for (double& x : value) x = round_to(dtype, u(rng));
  }
  // shuffled pages for every batch (enough for C_b), -1 padding in two extra columns, a few spare pages
  void random_pages(std::mt19937& rng) {
    std::vector<int64_t> need;
    int64_t total = 0;
    for (int64_t c : C) {
      need.push_back((c + P - 1) / P);
      total += need.back();
    }
    num_pages = total + 3;
    std::vector<int32_t> perm(static_cast<size_t>(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    const int64_t maxp = *std::max_element(need.begin(), need.end()) + 2;
    table.clear();
    size_t next = 0;
    for (int64_t b = 0; b < B(); ++b) {
      std::vector<int32_t> row(static_cast<size_t>(maxp), -1);
      for (int64_t i = 0; i < need[static_cast<size_t>(b)]; ++i) row[static_cast<size_t>(i)] = perm[next++];
      table.push_back(row);
    }
  }
};

struct Bound {
  std::vector<unsigned char> query, key, value;
  std::vector<int32_t> table;
  std::vector<unsigned char> out;
  std::vector<int32_t> topk;
  nsa::CompressAttentionInferParams p;
};

// vals in the dtype, element i at i * step (the gaps NaN)
inline void fill_values(std::vector<unsigned char>& buf, const std::vector<double>& vals, DType dt, int64_t step = 1) {
  const size_t n = vals.size() * static_cast<size_t>(step);
  buf.assign(n * nsa::dtype_size(dt) + 8, 0);
  for (size_t i = 0; i < n; ++i)
    nsa::detail::store_f64(buf.data(), static_cast<int64_t>(i),
                           i % static_cast<size_t>(step) ? std::numeric_limits<double>::quiet_NaN()
                                                         : vals[i / static_cast<size_t>(step)], dt);
}

inline void bind(const CACase& cs, Bound& bd) {
  fill_values(bd.query, cs.query, cs.dtype);
  fill_values(bd.key, cs.key, cs.dtype, cs.kv_step);
  fill_values(bd.value, cs.value, cs.dtype, cs.kv_step);
  bd.table.clear();
  for (const auto& r : cs.table) bd.table.insert(bd.table.end(), r.begin(), r.end());
  const int64_t rows = cs.rows();
  const std::vector<double> nan(static_cast<size_t>(rows * cs.N1 * cs.Dv), std::numeric_limits<double>::quiet_NaN());
  fill_values(bd.out, nan, cs.dtype);
  bd.topk.assign(static_cast<size_t>(rows * cs.N2 * cs.K), -77);
  nsa::CompressAttentionInferParams& p = bd.p;
  p = nsa::CompressAttentionInferParams();
  p.dtype = cs.dtype;
  p.layout = cs.layout;
  p.query = bd.query.data();
  const bool bsnd = cs.layout == DecodeLayout::kBSND;
  const int64_t qs[4] = {bsnd ? cs.B() : 1, bsnd ? cs.Sq : rows, cs.N1, cs.D};
  for (int i = 0; i < 4; ++i) p.query_size[i] = qs[i];
  p.query_stride[3] = 1;
  p.query_stride[2] = cs.D;
  p.query_stride[1] = cs.N1 * cs.D;
  p.query_stride[0] = qs[1] * cs.N1 * cs.D;
  p.key.data = bd.key.data();
  p.key.size[0] = p.value.size[0] = cs.num_pages;
  p.key.size[1] = p.value.size[1] = cs.P;
  p.key.size[2] = cs.N2 * cs.D;
  p.value.size[2] = cs.N2 * cs.Dv;
  const int64_t st = cs.kv_step;
  p.key.stride[0] = cs.P * cs.N2 * cs.D * st;
  p.key.stride[1] = cs.N2 * cs.D * st;
  p.key.stride[2] = st;
  p.value.data = bd.value.data();
  p.value.stride[0] = cs.P * cs.N2 * cs.Dv * st;
  p.value.stride[1] = cs.N2 * cs.Dv * st;
  p.value.stride[2] = st;
  p.scale_value = cs.scale;
  p.head_num = cs.N1;
  p.key_value_head_num = cs.N2;
  p.select_block_size = cs.lp;
  p.select_block_count = cs.K;
  p.page_block_size = cs.P;
  p.compress_block_size = cs.l;
  p.compress_stride = cs.d;
  p.has_atten_mask = cs.atten;
  p.block_table = bd.table.data();
  p.block_table_rows = cs.B();
  p.block_table_cols = cs.max_pages();
  p.block_table_row_stride = cs.max_pages();
  if (cs.pass_q) p.actual_seq_qlen = nsa::IntList{cs.q.data(), cs.B()};
  p.actual_cmp_seq_kvlen = nsa::IntList{cs.C.data(), cs.B()};
  if (cs.pass_s && !cs.S.empty()) p.actual_sel_seq_kvlen = nsa::IntList{cs.S.data(), cs.B()};
  p.attention_out = bd.out.data();
  p.topk_indices = bd.topk.data();
}

inline Status run_backend(const nsa::CompressAttentionInferParams& p, Backend be, CpuIsa isa, int threads) {
  if (be == Backend::kReference) return nsa::compress_attention_infer_reference(p);
  return nsa::compress_attention_infer_cpu(p, nsa::CpuOptions{static_cast<int>(isa), threads});
}

struct CARun {
  Status status;
  std::vector<unsigned char> out_bytes;
  std::vector<double> out;
  std::vector<int32_t> topk;
};

inline CARun run(const CACase& cs, Backend be, CpuIsa isa = CpuIsa::kScalar, int threads = 1) {
  Bound bd;
  bind(cs, bd);
  CARun r;
  r.status = run_backend(bd.p, be, isa, threads);
  r.out_bytes = bd.out;
  r.topk = bd.topk;
  const int64_t n = cs.rows() * cs.N1 * cs.Dv;
  for (int64_t i = 0; i < n; ++i) r.out.push_back(nsa::detail::load_f64(bd.out.data(), i, cs.dtype));
  return r;
}

// ------------------------------------------------------------------ the fp64 model of §3
struct Model {
  std::vector<double> out, tol;                 // [rows][N1][Dv]
  std::vector<std::vector<double>> scores;      // per (row, n2): Sel'_b scores (+inf forced)
  std::vector<double> score_rtol;               // per (row, n2)
  std::vector<int64_t> sel;                     // per (row, n2); 0 for BSND padding rows
};

inline Model model(const CACase& cs) {
  Model md;
  const int64_t rows = cs.rows(), G = cs.G(), M = cs.lp / cs.d, N = cs.l / cs.d;
  const bool low = cs.dtype == DType::kBF16 || cs.dtype == DType::kF16;
  const double eps = cs.dtype == DType::kF64 ? DBL_EPSILON : FLT_EPSILON;
  const double scale = cs.dtype == DType::kF64 ? cs.scale : static_cast<double>(static_cast<float>(cs.scale));
  md.out.assign(static_cast<size_t>(rows * cs.N1 * cs.Dv), 0.0);  // BSND padding rows: 0
  md.tol.assign(md.out.size(), 0.0);
  md.scores.assign(static_cast<size_t>(rows * cs.N2), {});
  md.score_rtol.assign(static_cast<size_t>(rows * cs.N2), 0.0);
  md.sel.assign(static_cast<size_t>(rows * cs.N2), 0);
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t C = cs.C[static_cast<size_t>(b)], q_b = cs.q[static_cast<size_t>(b)];
    const int64_t sel = ((C - 1) * cs.d + cs.l + cs.lp - 1) / cs.lp;
    const bool mtp = cs.atten && *std::max_element(cs.q.begin(), cs.q.end()) > 1;
    for (int64_t i = 0; i < q_b; ++i) {
      const int64_t r = cs.row_of(b, i);
      for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
        std::vector<double> total(static_cast<size_t>(sel), 0.0);
        double worst = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          std::vector<double> S(static_cast<size_t>(C)), P(static_cast<size_t>(C));
          for (int64_t c = 0; c < C; ++c) {
            double dot = 0, a = 0;
            for (int64_t j = 0; j < cs.D; ++j) {
              const double t = cs.query[static_cast<size_t>((r * cs.N1 + h) * cs.D + j)] * cs.kv(b, c, n2, j);
              dot += t;
              a += std::fabs(t);
            }
            worst = std::max(worst, a * std::fabs(scale));
            S[c] = dot * scale;
            if (mtp && c * cs.d + cs.l - 1 > cs.S[static_cast<size_t>(b)] - q_b + i) S[c] = -static_cast<double>(FLT_MAX);
          }
          const double m = *std::max_element(S.begin(), S.end());
          double lsum = 0;
          for (int64_t c = 0; c < C; ++c) lsum += std::exp(S[c] - m);
          for (int64_t c = 0; c < C; ++c) P[c] = std::exp(S[c] - m) / lsum;
          // P's relative error in the backends: the fp32 dot products (D eps |q||k| absolute in S), exp, sum, division
          const double rel = 16 * eps + 4.0 * static_cast<double>(cs.D) * eps * worst;
          for (int64_t j = 0; j < cs.Dv; ++j) {
            double o = 0, a = 0, flip = 0;
            for (int64_t c = 0; c < C; ++c) {
              const double pc = round_to(cs.dtype, P[c]), vc = cs.vv(b, c, n2, j);
              o += pc * vc;
              a += std::fabs(P[c] * vc);
              if (low) flip = std::max(flip, ulp_of(cs.dtype, P[c]) * std::fabs(vc));
            }
            const size_t oi = static_cast<size_t>((r * cs.N1 + h) * cs.Dv + j);
            md.out[oi] = o;
            // one ulp (the final rounding), the fp32 accumulation and P's relative error over the terms, two flips of
            // the rounding of P (bf16 / fp16)
            md.tol[oi] = ulp_of(cs.dtype, o) + (16 * eps + rel) * a + 2 * flip;
          }
          for (int64_t k = 0; k < sel; ++k)
            for (int64_t t = 0; t < M + N - 1; ++t) {
              const int64_t x = M * (k + 1) - t;
              if (x >= 0 && x < C) total[k] += static_cast<double>(std::min({t + 1, N, M + N - 1 - t})) * P[x];
            }
        }
        total[0] = INFINITY;
        if (sel >= 2) total[sel - 2] = INFINITY;
        total[sel - 1] = INFINITY;
        const size_t u = static_cast<size_t>(r * cs.N2 + n2);
        md.scores[u] = total;
        md.score_rtol[u] = 64 * eps + 8.0 * static_cast<double>(cs.D) * eps * worst;
        md.sel[u] = sel;
      }
    }
  }
  return md;
}

// attention_out within the model's per-element tolerance; topk_indices: slot j holds a distinct index whose model
// score is within the score tolerance of the model's j-th best score (identical where scores are separated,
// forced blocks always identical), -1 past Sel'_b; BSND padding rows zero / -1.
inline ::testing::AssertionResult check_model(const CACase& cs, const CARun& r) {
  const Model md = model(cs);
  for (size_t i = 0; i < md.out.size(); ++i)
    if (!(std::fabs(r.out[i] - md.out[i]) <= md.tol[i]))
      return ::testing::AssertionFailure() << "attention_out element " << i << " = " << r.out[i] << ", model "
                                           << md.out[i] << ", tolerance " << md.tol[i];
  for (int64_t row = 0; row < cs.rows(); ++row)
    for (int64_t n2 = 0; n2 < cs.N2; ++n2) {
      const size_t u = static_cast<size_t>(row * cs.N2 + n2);
      const int32_t* idx = r.topk.data() + u * static_cast<size_t>(cs.K);
      const int64_t sel = md.sel[u];
      const std::vector<double>& sc = md.scores[u];
      std::vector<int64_t> order(static_cast<size_t>(sel));
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sc[a] > sc[b]; });
      std::vector<char> seen(static_cast<size_t>(sel), 0);
      for (int64_t j = 0; j < cs.K; ++j) {
        if (j >= sel) {
          if (idx[j] != -1)
            return ::testing::AssertionFailure() << "topk (row " << row << ", n2 " << n2 << ") slot " << j
                                                 << " must be -1 past Sel' = " << sel << ", got " << idx[j];
          continue;
        }
        const int64_t gi = idx[j];
        if (gi < 0 || gi >= sel || seen[gi])
          return ::testing::AssertionFailure() << "topk (row " << row << ", n2 " << n2 << ") slot " << j
                                               << " holds an invalid or repeated index " << gi;
        seen[gi] = 1;
        const double e = sc[order[j]], s = sc[gi];
        const bool same = std::isinf(e) ? gi == order[j] : std::fabs(s - e) <= md.score_rtol[u] * std::fabs(e) + 1e-30;
        if (!same)
          return ::testing::AssertionFailure() << "topk (row " << row << ", n2 " << n2 << ") slot " << j << " = " << gi
                                               << " (model score " << s << "), the model's is " << order[j]
                                               << " (score " << e << ")";
      }
    }
  return ::testing::AssertionSuccess();
}

}  // namespace nsa_cai_test
