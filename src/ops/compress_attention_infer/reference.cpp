// Reference of npu_nsa_compress_attention_infer: docs/spec/decode.md §3 in plain loops (single-threaded), every
// quantity in float32 (float64 for fp64 inputs, with no rounding to the dtype). The tests' oracle.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "common/topk_order.h"
#include "nsa/compress_attention_infer.h"
#include "ops/compress_attention_infer/rows.h"

namespace nsa {

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress_attention_infer>::run(const Params& p, const Shape& sh, DType dt) {
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, P = sh.P, l = sh.l, d = sh.d, M = sh.M, N = sh.N, K = sh.K;
  const Acc scale = static_cast<Acc>(sizeof(Acc) == 8 ? p.scale_value : static_cast<float>(p.scale_value));
  const DecodeRows rows = decode_rows(p, sh);
  std::vector<Acc> S, Pr, acc(static_cast<size_t>(Dv)), score, score_h;
  std::vector<int64_t> order;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t C = p.actual_cmp_seq_kvlen.data[b];
    const int64_t q_b = rows.q[static_cast<size_t>(b)];
    const int64_t S_b = sh.mtp ? p.actual_sel_seq_kvlen.data[b] : 0;
    const int32_t* table = p.block_table + b * p.block_table_row_stride;
    // Compressed token c of a paged cache [blocks, P, N2 * width] is row (block_table[b, c / P], c % P); its head
    // n2 starts at column col = n2 * width.
    const auto cache_row = [&](const Tensor3& cache, int64_t col) {
      return [&cache, table, col, P](int64_t c) {
        const int64_t off = table[c / P] * cache.stride[0] + (c % P) * cache.stride[1] + col * cache.stride[2];
        return ref::ElemRow{cache.data, off, cache.stride[2]};
      };
    };
    const int64_t sel = decode_selection_blocks(C, l, d, sh.lp);  // §3 step 6: Sel'_b
    S.assign(static_cast<size_t>(C), 0);
    Pr.assign(static_cast<size_t>(C), 0);
    score.assign(static_cast<size_t>(sel), 0);
    score_h.assign(static_cast<size_t>(sel), 0);
    for (int64_t i = 0; i < q_b; ++i) {
      const int64_t qrow = rows.query_offset(p, b, i), orow = rows.out_row(b, i);
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        std::fill(score.begin(), score.end(), Acc(0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          // step 1: compressed token c is key[block_table[b, c / P], c % P, n2*D : (n2+1)*D]; step 2: S_c = q.k_c scale
          const ref::ElemRow q{p.query, qrow + h * p.query_stride[2], p.query_stride[3]};
          ref::score_row(q, cache_row(p.key, n2 * D), C, D, scale, dt, S.data());
          // step 3: MTP causality, the window of c ends after the query token's position S_b - q_b + i
          for (int64_t c = 0; c < C; ++c)
            if (sh.mtp && c * d + l - 1 > S_b - q_b + i) S[c] = -FLT_MAX;
          // step 4: exact softmax in fp32 (a fully masked row gives the uniform 1/C_b); step 5: attention_out =
          // rne_T( sum_c rne_T(P_c) * v_c ), fp32 accumulation in c order
          const auto round_p = [dt](Acc x) { return ref::round_p_rne(x, dt); };
          const auto value_row = cache_row(p.value, n2 * Dv);
          ref::softmax_weighted_sum(S.data(), C, round_p, value_row, Dv, dt, Pr.data(), acc.data());
          for (int64_t j = 0; j < Dv; ++j)
            detail::store_f64(p.attention_out, (orow * sh.N1 + h) * Dv + j, static_cast<double>(acc[j]), dt);
          // step 6: score_h[k] = sum_i w_i P[M(k+1) - i], w_i = min(i+1, N, M+N-1-i); then added over g in sequence
          for (int64_t k = 0; k < sel; ++k) {
            Acc s = 0;
            for (int64_t t = 0; t < M + N - 1; ++t) {
              const int64_t x = M * (k + 1) - t;
              if (x < 0 || x >= C) continue;
              s += static_cast<Acc>(std::min({t + 1, N, M + N - 1 - t})) * Pr[x];
            }
            score[k] += s;
          }
        }
        // step 7: forced blocks 0, Sel'-2, Sel'-1 (those that exist) get +inf
        score[0] = INFINITY;
        if (sel >= 2) score[sel - 2] = INFINITY;
        score[sel - 1] = INFINITY;
        // step 8: K best, descending, ties to the smaller index; -1 past Sel'_b
        order.resize(static_cast<size_t>(sel));
        std::iota(order.begin(), order.end(), int64_t(0));
        std::sort(order.begin(), order.end(),
                  [&](int64_t a, int64_t c) { return detail::topk_before(score[a], a, score[c], c); });
        int32_t* idx = p.topk_indices + (orow * sh.N2 + n2) * K;
        for (int64_t k = 0; k < K; ++k) idx[k] = k < sel ? static_cast<int32_t>(order[k]) : -1;
      }
    }
  }
  rows.clear_padding(p, sh);  // BSND rows past q_b
}

template struct detail::ReferenceEntry<validate_compress_attention_infer>;

Status compress_attention_infer_reference(const CompressAttentionInferParams& p) {
  return detail::ReferenceEntry<validate_compress_attention_infer>::for_dtype(p);
}

}  // namespace nsa
