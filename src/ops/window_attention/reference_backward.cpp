// Reference backward: docs/spec/window_attention.md §7 line by line, plain loops over every (query, key) pair, one
// thread. The tests' oracle for the gradients.
// Acc is the arithmetic type of every float32 quantity of §7 (float: the contract literally; double: the fp64
// model, and the path of fp64 inputs).
//
// Choices that §7 leaves open, made here:
// - P and dS stay in Acc (not rounded to the input dtype before the products that use them).
// - P uses the saved statistics as given (element 0 of each float32 row): P = exp(S - m) / l.
// - Rows without a visible key (§6) are found from the mask and band, not from the statistics.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "ops/window_attention/batches.h"
#include "ops/window_attention/reference.h"

namespace nsa {

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_window_attention_backward>::run(const Params& g, const Shape& sh, DType dt) {
  const WindowAttentionParams& p = g.fwd;
  const Acc scale = ref::float32_scale<Acc>(p.scale);
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, N1 = sh.N1, N2 = sh.N2;

  ref::KvGradients<Acc> kv(sh.T2, N2, D, Dv);
  std::vector<Acc> dq(static_cast<size_t>(D)), dyr(static_cast<size_t>(Dv)), qr(static_cast<size_t>(D));
  // keys: the visible keys of row i of batch bi
  const auto visit = [&](const window_detail::WBatch& bi, int64_t i, const std::vector<int64_t>& keys) {
    const int64_t t = bi.q0 + i;
    for (int64_t h = 0; h < N1; ++h) {
      const int64_t n2 = h / G;
      std::fill(dq.begin(), dq.end(), Acc(0));
      ref::load_row(ref::row3(g.dy, t, h), Dv, dt, dyr.data());
      if (keys.empty()) {
        // §7: the uniform average of §6 (inner_precise 0/1) gives dv_j += dy / Skv_b to every key of the
        // batch, dq = 0, nothing to dk; inner_precise 2 (zeros) gives nothing at all.
        if (p.inner_precise != 2) {
          const Acc skv = static_cast<Acc>(bi.skv);
          for (int64_t j = 0; j < bi.skv; ++j)
            for (int64_t e = 0; e < Dv; ++e) kv.dv_row(bi.k0 + j, n2)[e] += dyr[e] / skv;
        }
      } else {
        const int64_t so = window_detail::stat_offset(p.softmax_layout, N1, bi, h, i);
        const ref::SoftmaxStats<Acc> sm{static_cast<Acc>(g.softmax_max[so]), static_cast<Acc>(g.softmax_sum[so])};
        const Acc dlt = ref::dot(dyr.data(), ref::row3(g.attention_in, t, h), Dv, dt);  // Dlt = sum dy . O
        ref::load_row(ref::row3(p.query, t, h), D, dt, qr.data());
        for (int64_t j : keys) {
          const int64_t kr = bi.k0 + j;
          const ref::ElemRow k = ref::row3(p.key, kr, n2);
          const Acc s = ref::dot(qr.data(), k, D, dt) * scale;
          // P_j = exp(s - m) / l, dP_j = dy . v_j, dS_j = P_j (dP_j - Dlt)
          const ref::ElemRow v = ref::row3(p.value, kr, n2);
          const ref::EntryGrad<Acc> eg = ref::entry_grad(s, sm, dyr.data(), v, Dv, dlt, dt);
          ref::add_scaled(eg.ds, k, D, dt, dq.data());
          ref::add_scaled(scale * eg.ds, qr.data(), D, kv.dk_row(kr, n2));
          ref::add_scaled(eg.p, dyr.data(), Dv, kv.dv_row(kr, n2));
        }
      }
      for (int64_t d = 0; d < D; ++d)
        detail::store_rha(g.grad_query, (t * N1 + h) * D + d, static_cast<double>(scale * dq[d]), dt);
    }
  };
  window_detail::for_each_row_keys(p, sh, visit);
  // §7: the gradients rounded once with rha_T
  ref::store_gradients_rha<Acc>(dt, {{g.grad_key, &kv.dk}, {g.grad_value, &kv.dv}});
}

template struct detail::ReferenceEntry<validate_window_attention_backward>;

Status window_attention_backward_reference(const WindowAttentionGradParams& p) {
  return detail::ReferenceEntry<validate_window_attention_backward>::for_dtype(p);
}

}  // namespace nsa
