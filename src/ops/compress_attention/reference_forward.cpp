// Reference backend: §3 line by line, plain loops, single thread. The tests' oracle.
// Acc is the arithmetic type of every float32 quantity of §3 (float: the spec literally;
// double: the fp64 model used to measure the error of other backends).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/group_sum.h"
#include "common/mask_rows.h"
#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "common/topk_order.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/causal.h"
#include "ops/compress_attention/reference.h"

namespace nsa {

using detail::BatchInfo;
using detail::mask_at;

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress_attention>::run(const Params& params, const Shape& sh, DType dt) {
  detail::CausalMask causal_mask;  // §10 causal: atten_mask is the view of causal.h, topk forcing below
  const CompressAttentionParams p = detail::with_causal_view(params, sh, &causal_mask);
  const std::vector<BatchInfo> batches = detail::make_batches(p, sh);
  const Acc scale = ref::float32_scale<Acc>(p.scale_value);  // §1: used as float32
  const Acc neg_max = static_cast<Acc>(-FLT_MAX);
  const Acc pos_max = static_cast<Acc>(FLT_MAX);
  const int64_t G = sh.G, M = sh.M, N = sh.N, K = sh.K, D2 = sh.D2;

  std::vector<Acc> S, P, acc(static_cast<size_t>(D2)), score, score_h, group;
  std::vector<int64_t> order;
  for (const BatchInfo& bi : batches) {
    const int64_t C = bi.c, Sel = bi.sel;
    S.assign(static_cast<size_t>(C), 0);
    P.assign(static_cast<size_t>(C), 0);
    const auto kv_row = [&](const Tensor3& kv, int64_t n2) {
      return [&kv, &bi, n2](int64_t c) { return ref::row3(kv, bi.c_begin + c, n2); };  // compressed token c
    };
    for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
      for (int64_t s = 0; s < bi.sq; ++s) {
        const int64_t t = bi.q_begin + s;  // row of query / outputs
        // score_h[g][k] for the G heads of the group (§3.5), summed in §3.6.
        score_h.assign(static_cast<size_t>(G * Sel), 0);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;  // query head; reads KV head h / G = n2 (§2)
          // §3.1 scores: dot product accumulated in Acc, then times the float32 scale.
          ref::score_row(ref::row3(p.query, t, h), kv_row(p.key, n2), C, sh.D, scale, dt, S.data());
          // §3.2 mask: replacement by -FLT_MAX.
          for (int64_t c = 0; c < C; ++c)
            if (mask_at(p.atten_mask, s, c)) S[c] = neg_max;
          // §3.3 softmax over the whole row; §3.4 output: P rounded to the dtype (rne, "cast(P)"), products summed
          // in Acc, one final rounding.
          const auto round_p = [dt](Acc x) { return ref::round_p_rne(x, dt); };
          const ref::SoftmaxStats<Acc> sm =
              ref::softmax_weighted_sum(S.data(), C, round_p, kv_row(p.value, n2), D2, dt, P.data(), acc.data());
          for (int64_t j = 0; j < D2; ++j)
            detail::store_f64(p.attention_out, (t * sh.N1 + h) * D2 + j, static_cast<double>(acc[j]), dt);
          // §3.9 statistics in the per-batch [N1][Sq_b][8] layout of §4.
          ref::store_stats8(p.softmax_max, p.softmax_sum, detail::stat_offset(bi, h, s), static_cast<float>(sm.m),
                            static_cast<float>(sm.l));
          // §3.5 importance of selection block k: sum over m < M, n < N of P[M(k+1) - m - n]
          // (note k+1), P[x] = 0 outside [0, C).
          for (int64_t k = 0; k < Sel; ++k) {
            Acc sc = 0;
            for (int64_t mm = 0; mm < M; ++mm)
              for (int64_t nn = 0; nn < N; ++nn) {
                const int64_t x = M * (k + 1) - mm - nn;
                if (x >= 0 && x < C) sc += P[x];
              }
            score_h[g * Sel + k] = sc;
          }
        }
        // §3.6 group sum, pairwise tree over g.
        score.assign(static_cast<size_t>(Sel), 0);
        group.resize(static_cast<size_t>(G));
        for (int64_t k = 0; k < Sel; ++k) {
          for (int64_t g = 0; g < G; ++g) group[g] = score_h[g * Sel + k];
          score[k] = detail::pairwise_group_sum(group.data(), G);
        }
        // §3.7 forced blocks (§10 causal: those of §9).
        for (int64_t k = 0; k < Sel; ++k)
          if (p.causal ? detail::causal_forced(s, k, p.select_block_size) : mask_at(p.topk_mask, s, k))
            score[k] = pos_max;
        // §3.8 top-k: stable descending order, first K.
        order.resize(static_cast<size_t>(Sel));
        std::iota(order.begin(), order.end(), int64_t(0));
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return detail::topk_before(score[a], a, score[b], b);
        });
        // §10 short_batches: a batch with Sel_b < K fills slots Sel_b..K-1 with -1.
        for (int64_t i = 0; i < K; ++i)
          p.topk_indices[(t * sh.N2 + n2) * K + i] = i < Sel ? static_cast<int32_t>(order[i]) : -1;
      }
    }
  }
}

template struct detail::ReferenceEntry<validate_compress_attention>;

Status compress_attention_reference(const CompressAttentionParams& p) {
  return detail::ReferenceEntry<validate_compress_attention>::for_dtype(p);
}

}  // namespace nsa
