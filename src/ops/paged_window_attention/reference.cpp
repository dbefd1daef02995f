// Reference of paged_window_attention: docs/spec/decode.md §9 line by line, plain loops, single thread, with the
// softmax and roundings of docs/spec/window_attention.md §5 steps 1-4. Acc is the arithmetic type of every float32
// quantity (float: the contract literally; double: the fp64 model).
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "ops/paged_window_attention/batches.h"
#include "ops/paged_window_attention/reference.h"
#include "ops/select_attention/rounding.h"

namespace nsa::paged_window_reference {
namespace {

template <typename Acc>
Acc load(const void* data, int64_t off, DType dt) {
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(data, off, dt);
  else return detail::load_f32(data, off, dt);
}

template <typename Acc>
Status forward(const PagedWindowAttentionParams& p) {
  PagedWindowAttentionShape sh;
  Status st = validate_paged_window_attention(p, &sh);
  if (!st.ok()) return st;
  const DType dt = p.dtype;
  const bool low = dt == DType::kBF16 || dt == DType::kF16;
  const Acc scale = static_cast<Acc>(static_cast<float>(p.scale));  // used as a float32
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, P = sh.page;
  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  std::vector<int64_t> koff, voff;
  const std::vector<paged_window::Batch> batches = paged_window::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const paged_window::Batch& bt = batches[static_cast<size_t>(b)];
    for (int64_t i = 0; i < bt.q; ++i) {
      const int64_t t = bt.row0 + i;
      // §9: token i (L_i = S_b - (q_b - 1 - i)) sees [max(0, L_i - window), L_i), read through the block table
      const paged::Run r = paged_window::token_window(bt, i, p.window);
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        koff.clear();
        voff.clear();
        for (int64_t pos = r.start; pos < r.end; ++pos) {
          const int64_t page = paged::table_at(p.block_table, b, pos / P);
          koff.push_back(paged::cache_offset(p.key_cache, page, pos % P, n2));
          voff.push_back(paged::cache_offset(p.value_cache, page, pos % P, n2));
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          const int64_t qo = t * p.query.stride[0] + h * p.query.stride[1];
          // window_attention.md §5 step 1: S_j = Acc(q . k_j) * scale
          S.resize(koff.size());
          for (size_t e = 0; e < koff.size(); ++e) {
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += load<Acc>(p.query.data, qo + d * p.query.stride[2], dt) *
                     load<Acc>(p.key_cache.data, koff[e] + d * p.key_cache.stride[3], dt);
            S[e] = dot * scale;
          }
          // step 3: m, l, P = exp(S - m) / l
          Acc m = S[0];
          for (size_t e = 1; e < S.size(); ++e) m = S[e] > m ? S[e] : m;
          Acc l = 0;
          for (size_t e = 0; e < S.size(); ++e) l += std::exp(S[e] - m);
          // step 4: out = rha_T( sum_j rha_T(P_j) v_j ), Acc accumulation
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (size_t e = 0; e < S.size(); ++e) {
            const Acc pe = std::exp(S[e] - m) / l;
            const Acc pr = low ? static_cast<Acc>(select_detail::round_rha(static_cast<float>(pe), dt)) : pe;
            for (int64_t d = 0; d < Dv; ++d)
              acc[d] += pr * load<Acc>(p.value_cache.data, voff[e] + d * p.value_cache.stride[3], dt);
          }
          const int64_t o = (t * sh.N1 + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d)
            select_detail::store_rha(p.attention_out, o + d, static_cast<double>(acc[d]), dt);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status forward_fp32(const PagedWindowAttentionParams& p) { return forward<float>(p); }
Status forward_fp64(const PagedWindowAttentionParams& p) { return forward<double>(p); }

}  // namespace nsa::paged_window_reference

namespace nsa {
Status paged_window_attention_reference(const PagedWindowAttentionParams& p) {
  if (p.dtype == DType::kF64) return paged_window_reference::forward_fp64(p);
  return paged_window_reference::forward_fp32(p);
}
}  // namespace nsa
