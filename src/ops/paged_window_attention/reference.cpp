// Reference of paged_window_attention: docs/spec/decode.md §9 line by line, plain loops, single thread, with the
// softmax and roundings of docs/spec/window_attention.md §5 steps 1-4. Acc is the arithmetic type of every float32
// quantity (float: the contract literally; double: the fp64 model).
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "ops/paged_window_attention/batches.h"
#include "ops/paged_window_attention/reference.h"
#include "ops/select_attention_infer/reference.h"

namespace nsa {

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_paged_window_attention>::run(const Params& p, const Shape& sh, DType dt) {
  const Acc scale = ref::float32_scale<Acc>(p.scale);  // used as a float32
  const int64_t G = sh.G, Dv = sh.Dv;
  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  paged::EntryRows rows;  // the entries' key / value rows
  const std::vector<paged_window::Batch> batches = paged_window::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const paged_window::Batch& bt = batches[static_cast<size_t>(b)];
    for (int64_t i = 0; i < bt.q; ++i) {
      const int64_t t = bt.row0 + i;
      // §9: token i (L_i = S_b - (q_b - 1 - i)) sees [max(0, L_i - window), L_i), read through the block table
      const paged::Run r = paged_window::token_window(bt, i, p.window);
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        rows.clear();
        rows.append(p.block_table, b, r, sh.page, p.key_cache, p.value_cache, n2);
        const int64_t n = static_cast<int64_t>(rows.key.size());
        const auto key_row = [&](int64_t e) { return rows.key[e]; };
        const auto value_row = [&](int64_t e) { return rows.value[e]; };
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          const ref::ElemRow q{p.query.data, t * p.query.stride[0] + h * p.query.stride[1], p.query.stride[2]};
          // window_attention.md §5 step 1: S_j = Acc(q . k_j) * scale
          S.resize(rows.key.size());
          ref::score_row(q, key_row, n, sh.D, scale, dt, S.data());
          // step 3: m, l, P = exp(S - m) / l; step 4: out = rha_T( sum_j rha_T(P_j) v_j ), Acc accumulation
          const auto round_p = [dt](Acc x) { return ref::round_p_rha(x, dt); };
          ref::softmax_weighted_sum(S.data(), n, round_p, value_row, Dv, dt, static_cast<Acc*>(nullptr), acc.data());
          const int64_t o = (t * sh.N1 + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d) detail::store_rha(p.attention_out, o + d, static_cast<double>(acc[d]), dt);
        }
      }
    }
  }
}

template struct detail::ReferenceEntry<validate_paged_window_attention>;

Status paged_window_attention_reference(const PagedWindowAttentionParams& p) {
  return detail::ReferenceEntry<validate_paged_window_attention>::for_dtype(p);
}

}  // namespace nsa
