// Reference of select_attention_infer: docs/spec/decode.md §4 line by line, plain loops, single thread. Acc is the
// arithmetic type of every float32 quantity of §4 (float: the contract literally; double: the fp64 model of §6).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "ops/select_attention/rounding.h"
#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention_infer/reference.h"

namespace nsa {
namespace {

// §4 step 4: round_out is rne_T for bf16 and rha_T for fp16 (identity for fp32 / fp64).
void store_out(void* out, int64_t i, double x, DType dt) {
  if (dt == DType::kF16) select_detail::store_rha(out, i, x, dt);
  else detail::store_f64(out, i, x, dt);
}

}  // namespace

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_select_attention_infer>::run(const Params& p, const Shape& sh, DType dt) {
  const Acc scale = ref::float32_scale<Acc>(p.scale_value);  // used as a float32 (§4 step 3)
  const int64_t G = sh.G, Dv = sh.Dv;
  std::vector<paged::Run> runs;
  paged::EntryRows rows;  // the entries' key / value rows
  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  const std::vector<select_infer::Batch> batches = select_infer::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const select_infer::Batch& bt = batches[static_cast<size_t>(b)];
    for (int64_t i = 0; i < bt.rows; ++i) {
      const int64_t t = bt.row0 + i;
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        rows.clear();
        if (i < bt.q) {  // §7 item 7: batch-major rows i >= q_b get zeros
          // §4 step 1: the slots' positions, clipped at L_i; -1 slots empty; step 2: each position through the
          // block table; duplicated indices count twice
          select_infer::token_runs(p, bt, i, n2, runs);
          for (const paged::Run& r : runs) rows.append(p.block_table, b, r, sh.page, p.key, p.value, n2);
        }
        const int64_t n = static_cast<int64_t>(rows.key.size());
        const auto key_row = [&](int64_t e) { return rows.key[e]; };
        const auto value_row = [&](int64_t e) { return rows.value[e]; };
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          const int64_t o = (t * sh.N1 + h) * Dv;
          if (n == 0) {  // §4 step 5: no entry gives a zero row
            for (int64_t e = 0; e < Dv; ++e) detail::store_f64(p.attention_out, o + e, 0.0, dt);
            continue;
          }
          // §4 step 3: S_e = Acc(q . k_e) * scale, m, unnormalised exp, l_sum of the unrounded values
          const ref::ElemRow q{p.query.data, t * p.query.stride[0] + h * p.query.stride[1], p.query.stride[2]};
          S.resize(rows.key.size());
          ref::score_row(q, key_row, n, sh.D, scale, dt, S.data());
          const ref::SoftmaxStats<Acc> sm = ref::softmax_stats(S.data(), n);
          // §4 step 4: the unnormalised P rounded half away from zero to the input dtype, times v, Acc sums
          const auto rounded_exp = [&](int64_t e) { return ref::round_p_rha(std::exp(S[e] - sm.m), dt); };
          std::fill(acc.begin(), acc.end(), Acc(0));
          ref::weighted_sum(n, rounded_exp, value_row, Dv, dt, acc.data());
          // §4 step 4: the division last, one rounding (rne_T for bf16, rha_T for fp16)
          for (int64_t d = 0; d < Dv; ++d) {
            const Acc r = acc[d] / sm.l;
            store_out(p.attention_out, o + d, static_cast<double>(r), dt);
          }
        }
      }
    }
  }
}

template struct detail::ReferenceEntry<validate_select_attention_infer>;

Status select_attention_infer_reference(const SelectAttentionInferParams& p) {
  return detail::ReferenceEntry<validate_select_attention_infer>::for_dtype(p);
}

}  // namespace nsa
