// Reference backward of selected attention: docs/spec/select_attention.md §8 line by line, plain loops, single
// thread. Acc is the arithmetic type of every float32 quantity of §8 (float: the contract literally; double: the
// fp64 model of the gradients, and the gradcheck path for fp64 inputs).
//
// Choices that §8 leaves open, made here:
// - P and dS stay in Acc: they are not rounded to the input dtype before the products that use them (the exact
//   derivative of §4, treating the rounding of P as the identity).
// - The statistics are used as given (float32 m = softmax_max[t][h][0], l_sum = softmax_sum[t][h][0], converted
//   to Acc): P = exp(S - m) / l_sum. For fp64 inputs the gradient is therefore exact up to their float32
//   rounding (relative ~1e-7), far below what gradcheck resolves.
// - Every gradient accumulates over query rows ascending, KV heads, heads of the group, then the entries of the
//   row in slot order (then r); all three are rounded once at the end with rha_T.
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "ops/select_attention/batches.h"
#include "ops/select_attention/reference.h"

namespace nsa {

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_select_attention_backward>::run(const Params& p, const Shape& sh, DType dt) {
  const Acc scale = ref::float32_scale<Acc>(p.fwd.scale_value);
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, N1 = sh.N1, N2 = sh.N2;
  std::vector<Acc> dq(static_cast<size_t>(sh.T1 * N1 * D), Acc(0));
  ref::KvGradients<Acc> kv(sh.T2, N2, D, Dv);
  std::vector<Acc> q(static_cast<size_t>(D)), go(static_cast<size_t>(Dv));
  // E: the key rows of the visible entries of query row t, KV head n2 (§3)
  const auto visit = [&](const select_detail::BatchInfo& bi, int64_t s, int64_t n2, const std::vector<int64_t>& E) {
    const int64_t t = bi.q_begin + s;
    if (E.empty()) return;  // §6: a row without visible entries contributes nothing (query_grad stays 0)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = n2 * G + g;
      // the statistics as given: element 0 of the float32 rows softmax_max[t][h], softmax_sum[t][h]
      const auto stat = [&](const Tensor3& v) {
        return static_cast<Acc>(ref::elem<float>(ref::row3(v, t, h), 0, DType::kF32));
      };
      const ref::SoftmaxStats<Acc> sm{stat(p.softmax_max), stat(p.softmax_sum)};
      ref::load_row(ref::row3(p.fwd.query, t, h), D, dt, q.data());
      // Dlt = sum_i dO[t,h,i] O[t,h,i]
      ref::load_row(ref::row3(p.grad, t, h), Dv, dt, go.data());
      const Acc dlt = ref::dot(go.data(), ref::row3(p.attention_out, t, h), Dv, dt);
      Acc* dqr = &dq[static_cast<size_t>((t * N1 + h) * D)];
      for (const int64_t row : E) {
        const ref::ElemRow k = ref::row3(p.fwd.key, row, n2);
        const Acc S = ref::dot(q.data(), k, D, dt) * scale;  // §4 step 1
        // P from the statistics as given, dP = dO . v, dS = P (dP - Dlt)
        const ref::ElemRow v = ref::row3(p.fwd.value, row, n2);
        const ref::EntryGrad<Acc> eg = ref::entry_grad(S, sm, go.data(), v, Dv, dlt, dt);
        ref::add_scaled(scale * eg.ds, k, D, dt, dqr);
        ref::add_scaled(scale * eg.ds, q.data(), D, kv.dk_row(row, n2));
        ref::add_scaled(eg.p, go.data(), Dv, kv.dv_row(row, n2));
      }
    }
  };
  select_detail::for_each_visible_set(p.fwd, sh, visit);
  // §8: outputs rounded once with rha_T, contiguous
  ref::store_gradients_rha<Acc>(dt, {{p.grad_query, &dq}, {p.grad_key, &kv.dk}, {p.grad_value, &kv.dv}});
}

template struct detail::ReferenceEntry<validate_select_attention_backward>;

Status select_attention_backward_reference(const SelectAttentionGradParams& p) {
  return detail::ReferenceEntry<validate_select_attention_backward>::for_dtype(p);
}

}  // namespace nsa
