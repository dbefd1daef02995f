// Reference forward of selected attention: docs/spec/select_attention.md §3-§6 line by line, plain loops, single
// thread. Acc is the arithmetic type of every float32 quantity of §4 (float: the contract literally; double: the
// fp64 model that tolerances are measured against, §10).
#include <cfloat>
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
void detail::ReferenceEntry<validate_select_attention>::run(const Params& p, const Shape& sh, DType dt) {
  const Acc scale = ref::float32_scale<Acc>(p.scale_value);  // §2: used as a float32
  const int64_t G = sh.G, Dv = sh.Dv;
  std::vector<Acc> S, P, acc(static_cast<size_t>(Dv));
  // E: the key rows of the visible multiset E(t, n2) of §3, slot order then r; duplicates count twice
  const auto visit = [&](const select_detail::BatchInfo& bi, int64_t s, int64_t n2, const std::vector<int64_t>& E) {
    const int64_t t = bi.q_begin + s;  // query row; s its local position
    const int64_t n = static_cast<int64_t>(E.size());
    const auto key_row = [&](int64_t e) { return ref::row3(p.key, E[e], n2); };
    const auto value_row = [&](int64_t e) { return ref::row3(p.value, E[e], n2); };
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = n2 * G + g;  // query head h reads KV head h / G = n2 (§2)
      const int64_t so = select_detail::stat_offset(t, h, sh.N1);
      if (E.empty()) {
        // §6: a row without any visible entry gives zeros and the statistics (-FLT_MAX, +FLT_MAX)
        for (int64_t i = 0; i < Dv; ++i) detail::store_f64(p.attention_out, (t * sh.N1 + h) * Dv + i, 0.0, dt);
        ref::store_stats8(p.softmax_max, p.softmax_sum, so, -FLT_MAX, FLT_MAX);
        continue;
      }
      // §4 step 1: S_e = Acc(q . k) * scale, the dot product accumulated in Acc
      S.resize(E.size());
      ref::score_row(ref::row3(p.query, t, h), key_row, n, sh.D, scale, dt, S.data());
      // §4 steps 2-3: exact softmax over the visible entries only; step 4: rha_T(P) times v accumulated in Acc
      // (fp32 / fp64: rha is the identity), the sum rounded once with rne_T
      P.resize(E.size());
      const auto round_p = [dt](Acc x) { return ref::round_p_rha(x, dt); };
      const ref::SoftmaxStats<Acc> sm =
          ref::softmax_weighted_sum(S.data(), n, round_p, value_row, Dv, dt, P.data(), acc.data());
      for (int64_t i = 0; i < Dv; ++i)
        detail::store_f64(p.attention_out, (t * sh.N1 + h) * Dv + i, static_cast<double>(acc[i]), dt);
      // §4 step 5, §5: each statistic stored 8 times at (t N1 + h) 8
      ref::store_stats8(p.softmax_max, p.softmax_sum, so, static_cast<float>(sm.m), static_cast<float>(sm.l));
    }
  };
  select_detail::for_each_visible_set(p, sh, visit);
}

template struct detail::ReferenceEntry<validate_select_attention>;

Status select_attention_reference(const SelectAttentionParams& p) {
  return detail::ReferenceEntry<validate_select_attention>::for_dtype(p);
}

}  // namespace nsa
