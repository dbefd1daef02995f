// The row pieces the scalar references of the attention operators share (internal): strided rows of a dtype buffer
// read exactly into Acc, dot products, the softmax of one query row and its weighted sum of value rows, and the
// gradient terms of one entry. Acc is the arithmetic type of every float32 quantity of a contract (float; double in
// the fp64 model, see common/reference_entry.h). Every sum runs over its index ascending, one Acc rounding per
// product and per addition (never fused: the x86 baseline has no FMA and other targets build with
// -ffp-contract=off), so a reference written with these pieces computes exactly what its contract's text says, term
// by term; the callers cite the sections each piece implements.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "common/rounding.h"
#include "nsa/common.h"

namespace nsa::ref {

// The softmax scale as every contract uses it: the double argument rounded to float32 (round to nearest even),
// then held in Acc (exact).
template <typename Acc>
Acc float32_scale(double scale) {
  return static_cast<Acc>(static_cast<float>(scale));
}

// The query rows of a batched attention operator, one by one: f(bi, i) for every batch bi of `batches` in order and
// every local row i < bi.sq (Sq_b) ascending.
template <typename Batch, typename F>
void for_each_query_row(const std::vector<Batch>& batches, F&& f) {
  for (const Batch& bi : batches)
    for (int64_t i = 0; i < bi.sq; ++i) f(bi, i);
}

// A sum of terms in Acc, added in the order they come, with the sum of their absolute values (the scale of its
// rounding error, for the fp64 models' error bounds).
template <typename Acc>
struct TermSum {
  Acc value = 0, abs = 0;
  void add(Acc term) {
    value += term;
    abs += std::fabs(term);
  }
};

// Element `off` (an element offset) of a dtype buffer, widened exactly to Acc.
template <typename Acc>
Acc load_as(const void* data, int64_t off, DType dt) {
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(data, off, dt);
  else return detail::load_f32(data, off, dt);
}

// Element (i, j) of a strided 2-D view, as Acc.
template <typename Acc>
Acc load2_at(const Tensor2& t, int64_t i, int64_t j, DType dt) {
  return load_as<Acc>(t.data, i * t.stride[0] + j * t.stride[1], dt);
}

// A row of a dtype buffer: element d is data[off + d * stride] (offset and stride in elements).
struct ElemRow {
  const void* data;
  int64_t off;
  int64_t stride;
};

// Row (i, j) of a strided 3-D view: its elements (i, j, 0), (i, j, 1), ...
inline ElemRow row3(const Tensor3& t, int64_t i, int64_t j) {
  return {t.data, i * t.stride[0] + j * t.stride[1], t.stride[2]};
}

template <typename Acc>
Acc elem(const ElemRow& r, int64_t d, DType dt) {
  return load_as<Acc>(r.data, r.off + d * r.stride, dt);
}

// out[d] = element d of r as Acc, d < n.
template <typename Acc>
void load_row(const ElemRow& r, int64_t n, DType dt, Acc* out) {
  for (int64_t d = 0; d < n; ++d) out[d] = elem<Acc>(r, d, dt);
}

// sum_{d < n} a[d] * b[d], accumulated in Acc over d ascending (a: a row already in Acc, or a dtype row).
template <typename Acc>
Acc dot(const Acc* a, const ElemRow& b, int64_t n, DType dt) {
  Acc s = 0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * elem<Acc>(b, d, dt);
  return s;
}
template <typename Acc>
Acc dot(const ElemRow& a, const ElemRow& b, int64_t n, DType dt) {
  Acc s = 0;
  for (int64_t d = 0; d < n; ++d) s += elem<Acc>(a, d, dt) * elem<Acc>(b, d, dt);
  return s;
}

// acc[d] += w * x[d] for d < n (x: a row in Acc, or a dtype row).
template <typename Acc>
void add_scaled(Acc w, const Acc* x, int64_t n, Acc* acc) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * x[d];
}
template <typename Acc>
void add_scaled(Acc w, const ElemRow& x, int64_t n, DType dt, Acc* acc) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * elem<Acc>(x, d, dt);
}

// The scores of one query row against n entries: S[e] = (q . k_e, accumulated in Acc over d < D) * scale, with
// k_e = key_row(e) (an ElemRow) and scale the contract's float32 scale as Acc.
template <typename Acc, typename KeyRow>
void score_row(const ElemRow& q, KeyRow&& key_row, int64_t n, int64_t D, Acc scale, DType dt, Acc* S) {
  for (int64_t e = 0; e < n; ++e) S[e] = dot<Acc>(q, key_row(e), D, dt) * scale;
}

// The statistics of the softmax of a row: m, its maximum, and l = sum_e exp(S[e] - m).
template <typename Acc>
struct SoftmaxStats {
  Acc m, l;
};

// m = max of S[0..n), n >= 1 (from S[0]; a later score replaces m only when it is greater, so a NaN never does),
// l = sum_e exp(S[e] - m) over e ascending.
template <typename Acc>
SoftmaxStats<Acc> softmax_stats(const Acc* S, int64_t n) {
  Acc m = S[0];
  for (int64_t e = 1; e < n; ++e) m = S[e] > m ? S[e] : m;
  Acc l = 0;
  for (int64_t e = 0; e < n; ++e) l += std::exp(S[e] - m);
  return {m, l};
}

// acc[j] += weight(e) * v_e[j] for e < n ascending, j < Dv, with v_e = value_row(e) (an ElemRow).
template <typename Acc, typename Weight, typename ValueRow>
void weighted_sum(int64_t n, Weight&& weight, ValueRow&& value_row, int64_t Dv, DType dt, Acc* acc) {
  for (int64_t e = 0; e < n; ++e) add_scaled<Acc>(weight(e), value_row(e), Dv, dt, acc);
}

// The forward row of the attention contracts, after the scores: the softmax statistics of S[0..n) (n >= 1), the
// probabilities P[e] = exp(S[e] - m) / l (kept in P when P is not null) and acc[j] = sum_e round_p(P[e]) * v_e[j]
// (acc set to zero first; round_p: the contract's rounding of P before P.V). Returns {m, l}.
template <typename Acc, typename RoundP, typename ValueRow>
SoftmaxStats<Acc> softmax_weighted_sum(const Acc* S, int64_t n, RoundP&& round_p, ValueRow&& value_row, int64_t Dv,
                                       DType dt, Acc* P, Acc* acc) {
  const SoftmaxStats<Acc> st = softmax_stats(S, n);
  for (int64_t j = 0; j < Dv; ++j) acc[j] = 0;
  const auto rounded_p = [&](int64_t e) {
    const Acc pe = std::exp(S[e] - st.m) / st.l;
    if (P != nullptr) P[e] = pe;
    return round_p(pe);
  };
  weighted_sum<Acc>(n, rounded_p, value_row, Dv, dt, acc);
  return st;
}

// rha_T(x) as Acc, from the float32 value of x (the contracts' rounding of a probability; identity for fp32 and fp64
// inputs).
template <typename Acc>
Acc round_p_rha(Acc x, DType dt) {
  const bool low = dt == DType::kBF16 || dt == DType::kF16;
  return low ? static_cast<Acc>(detail::round_rha(static_cast<float>(x), dt)) : x;
}
// rne_T(x) as Acc, the same with ties to even.
template <typename Acc>
Acc round_p_rne(Acc x, DType dt) {
  const bool low = dt == DType::kBF16 || dt == DType::kF16;
  return low ? static_cast<Acc>(detail::round_to_dtype(static_cast<float>(x), dt)) : x;
}

// The softmax statistics of a row, stored as the contracts lay them out: each of m and l 8 times from float offset so.
inline void store_stats8(float* softmax_max, float* softmax_sum, int64_t so, float m, float l) {
  for (int i = 0; i < 8; ++i) {
    softmax_max[so + i] = m;
    softmax_sum[so + i] = l;
  }
}

// The key/value gradient accumulators of a backward reference, zero at the start: dK [T2][N2][D] and dV [T2][N2][Dv]
// in Acc, contiguous like grad_key / grad_value; dk_row / dv_row point at key row `row`, KV head n2.
template <typename Acc>
struct KvGradients {
  KvGradients(int64_t T2, int64_t n2, int64_t d, int64_t dv_)
      : N2(n2), D(d), Dv(dv_), dk(static_cast<size_t>(T2 * n2 * d), Acc(0)),
        dv(static_cast<size_t>(T2 * n2 * dv_), Acc(0)) {}
  Acc* dk_row(int64_t row, int64_t n2) { return &dk[static_cast<size_t>((row * N2 + n2) * D)]; }
  Acc* dv_row(int64_t row, int64_t n2) { return &dv[static_cast<size_t>((row * N2 + n2) * Dv)]; }

  int64_t N2, D, Dv;
  std::vector<Acc> dk, dv;
};

// The outputs of a backward: each gradient accumulated in Acc over the whole call (grad, contiguous like its output
// out) rounded once with rha_T into out: out[i] = rha_T(grad[i]) (fp32: float(grad[i]); fp64: grad[i]).
template <typename Acc>
struct GradientOut {
  void* out;
  const std::vector<Acc>* grad;
};
template <typename Acc>
void store_gradients_rha(DType dt, std::initializer_list<GradientOut<Acc>> outputs) {
  for (const GradientOut<Acc>& o : outputs)
    for (size_t i = 0; i < o.grad->size(); ++i)
      detail::store_rha(o.out, static_cast<int64_t>(i), static_cast<double>((*o.grad)[i]), dt);
}

// The gradient terms of one entry of a row, from its score S and the saved statistics (m, l) as given:
// P = exp(S - m) / l, dP = dO . v (dO: the row's output gradient in Acc, v: the entry's value row), dS = P (dP - Dlt)
// with Dlt = dO . O of the row.
template <typename Acc>
struct EntryGrad {
  Acc p, ds;
};
template <typename Acc>
EntryGrad<Acc> entry_grad(Acc S, const SoftmaxStats<Acc>& st, const Acc* dO, const ElemRow& v, int64_t Dv, Acc dlt,
                          DType dt) {
  const Acc p = std::exp(S - st.m) / st.l;
  const Acc dp = dot<Acc>(dO, v, Dv, dt);
  return {p, p * (dp - dlt)};
}

}  // namespace nsa::ref
