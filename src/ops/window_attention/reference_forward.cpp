// Reference forward: docs/spec/window_attention.md §5 and §6 line by line, plain loops over every (query, key)
// pair, one thread. The tests' oracle.
// Acc is the arithmetic type of every float32 quantity of §5 (float: the contract literally; double: the fp64
// model used to measure the error of other backends, and the path of fp64 inputs).
#include <algorithm>
#include <cfloat>
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
void detail::ReferenceEntry<validate_window_attention>::run(const Params& p, const Shape& sh, DType dt) {
  const Acc scale = ref::float32_scale<Acc>(p.scale);  // §5 step 1: f32(scale)
  const int64_t G = sh.G, Dv = sh.Dv, N1 = sh.N1;
  // rha_T of §5 step 4 applied to a probability (identity for fp32 and fp64 inputs).
  const auto round_p = [dt](Acc x) { return ref::round_p_rha(x, dt); };

  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  // keys: the visible keys of row i of batch bi
  const auto visit = [&](const window_detail::WBatch& bi, int64_t i, const std::vector<int64_t>& keys) {
    const int64_t t = bi.q0 + i;
    const int64_t n = static_cast<int64_t>(keys.size());
    for (int64_t h = 0; h < N1; ++h) {
      const int64_t n2 = h / G;  // §3: query head h reads key/value head h // G
      const auto kv_row = [&](const Tensor3& kv) {
        return [&kv, &bi, &keys, n2](int64_t x) { return ref::row3(kv, bi.k0 + keys[x], n2); };  // visible key x
      };
      float m_out, l_out;
      if (keys.empty()) {
        // §6: a row without a visible key.
        std::fill(acc.begin(), acc.end(), Acc(0));
        m_out = -FLT_MAX;
        if (p.inner_precise == 2) {
          l_out = FLT_MAX;  // attention_out = 0
        } else {
          l_out = static_cast<float>(bi.skv);
          const Acc pu = round_p(Acc(1) / static_cast<Acc>(bi.skv));  // P = 1/Skv_b on every key
          const auto batch_value = [&](int64_t j) { return ref::row3(p.value, bi.k0 + j, n2); };
          ref::weighted_sum(bi.skv, [pu](int64_t) { return pu; }, batch_value, Dv, dt, acc.data());
        }
      } else {
        // §5 step 1: scores, fp32 dot product then the fp32 scale; step 2: only visible keys take part.
        S.assign(keys.size(), Acc(0));
        ref::score_row(ref::row3(p.query, t, h), kv_row(p.key), n, sh.D, scale, dt, S.data());
        // step 3: softmax over the visible keys; step 4: rha(P) . v, accumulated in Acc.
        const ref::SoftmaxStats<Acc> sm =
            ref::softmax_weighted_sum(S.data(), n, round_p, kv_row(p.value), Dv, dt, static_cast<Acc*>(nullptr),
                                      acc.data());
        m_out = static_cast<float>(sm.m);
        l_out = static_cast<float>(sm.l);
      }
      for (int64_t e = 0; e < Dv; ++e)
        detail::store_rha(p.attention_out, (t * N1 + h) * Dv + e, static_cast<double>(acc[e]), dt);
      // step 5: statistics, 8 copies each, in the layout of softmax_layout.
      ref::store_stats8(p.softmax_max, p.softmax_sum, window_detail::stat_offset(p.softmax_layout, N1, bi, h, i),
                        m_out, l_out);
    }
  };
  window_detail::for_each_row_keys(p, sh, visit);
}

template struct detail::ReferenceEntry<validate_window_attention>;

Status window_attention_reference(const WindowAttentionParams& p) {
  return detail::ReferenceEntry<validate_window_attention>::for_dtype(p);
}

}  // namespace nsa
