// Reference forward of selected attention: docs/spec/select_attention.md §3-§6 line by line, plain loops, single
// thread. Acc is the arithmetic type of every float32 quantity of §4 (float: the contract literally; double: the
// fp64 model that tolerances are measured against, §10).
#include <cfloat>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "ops/select_attention/batches.h"
#include "ops/select_attention/reference.h"
#include "ops/select_attention/rounding.h"

namespace nsa::select_reference {
namespace {

using select_detail::BatchInfo;

template <typename Acc>
Acc load(const Tensor3& t, int64_t i, int64_t j, int64_t k, DType dt) {
  const int64_t off = i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(t.data, off, dt);
  else return detail::load_f32(t.data, off, dt);
}

// One visible entry (§3): its key row k0_b + p.
struct Entry {
  int64_t key_row;
};

template <typename Acc>
Status forward(const SelectAttentionParams& p) {
  SelectAttentionShape sh;
  Status st = validate_select_attention(p, &sh);
  if (!st.ok()) return st;
  const DType dt = p.dtype;
  const Acc scale = static_cast<Acc>(static_cast<float>(p.scale_value));  // §2: used as a float32
  const int64_t G = sh.G, K = sh.K, D = sh.D, Dv = sh.Dv, lp = sh.block;
  std::vector<Entry> E;
  std::vector<Acc> S, P, acc(static_cast<size_t>(Dv));
  for (const BatchInfo& bi : select_detail::make_batches(p)) {
    for (int64_t s = 0; s < bi.sq; ++s) {
      const int64_t t = bi.q_begin + s;  // query row; s its local position
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        // §3: the visible multiset E(t, n2), slot order then r; duplicates count twice; -1 slots are empty
        E.clear();
        for (int64_t j = 0; j < K; ++j) {
          const int64_t x = select_detail::index_at(p, t, n2, j);
          if (x == -1) continue;
          for (int64_t r = 0; r < lp; ++r) {
            const int64_t pos = x * lp + r;
            const bool visible = pos < bi.skv && (!p.causal || pos <= s);
            if (visible) E.push_back({bi.k_begin + pos});
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;  // query head h reads KV head h / G = n2 (§2)
          const int64_t so = select_detail::stat_offset(t, h, sh.N1);
          if (E.empty()) {
            // §6: a row without any visible entry gives zeros and the statistics (-FLT_MAX, +FLT_MAX)
            for (int64_t i = 0; i < Dv; ++i) detail::store_f64(p.attention_out, (t * sh.N1 + h) * Dv + i, 0.0, dt);
            for (int i = 0; i < 8; ++i) {
              p.softmax_max[so + i] = -FLT_MAX;
              p.softmax_sum[so + i] = FLT_MAX;
            }
            continue;
          }
          // §4 step 1: S_e = Acc(q . k) * scale, the dot product accumulated in Acc
          S.resize(E.size());
          for (size_t e = 0; e < E.size(); ++e) {
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += load<Acc>(p.query, t, h, d, dt) * load<Acc>(p.key, E[e].key_row, n2, d, dt);
            S[e] = dot * scale;
          }
          // §4 steps 2-3: exact softmax over the visible entries only
          Acc m = S[0];
          for (size_t e = 1; e < E.size(); ++e) m = S[e] > m ? S[e] : m;
          Acc l_sum = 0;
          for (size_t e = 0; e < E.size(); ++e) l_sum += std::exp(S[e] - m);
          P.resize(E.size());
          for (size_t e = 0; e < E.size(); ++e) P[e] = std::exp(S[e] - m) / l_sum;
          // §4 step 4: rha_T(P) times v accumulated in Acc, the sum rounded once with rne_T
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (size_t e = 0; e < E.size(); ++e) {
            const bool low = dt == DType::kBF16 || dt == DType::kF16;  // fp32 / fp64: rha is the identity
            const Acc pe = low ? static_cast<Acc>(select_detail::round_rha(static_cast<float>(P[e]), dt)) : P[e];
            for (int64_t i = 0; i < Dv; ++i) acc[i] += pe * load<Acc>(p.value, E[e].key_row, n2, i, dt);
          }
          for (int64_t i = 0; i < Dv; ++i)
            detail::store_f64(p.attention_out, (t * sh.N1 + h) * Dv + i, static_cast<double>(acc[i]), dt);
          // §4 step 5, §5: each statistic stored 8 times at (t N1 + h) 8
          for (int i = 0; i < 8; ++i) {
            p.softmax_max[so + i] = static_cast<float>(m);
            p.softmax_sum[so + i] = static_cast<float>(l_sum);
          }
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status forward_fp32(const SelectAttentionParams& p) { return forward<float>(p); }
Status forward_fp64(const SelectAttentionParams& p) { return forward<double>(p); }

}  // namespace nsa::select_reference

namespace nsa {
Status select_attention_reference(const SelectAttentionParams& p) {
  if (p.dtype == DType::kF64) return select_reference::forward_fp64(p);
  return select_reference::forward_fp32(p);
}
}  // namespace nsa
