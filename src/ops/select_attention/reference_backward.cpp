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

float load_stat(const Tensor3& t, int64_t i, int64_t j) {
  return static_cast<const float*>(t.data)[i * t.stride[0] + j * t.stride[1]];
}

template <typename Acc>
Status backward(const SelectAttentionGradParams& p) {
  SelectAttentionShape sh;
  Status st = validate_select_attention_backward(p, &sh);
  if (!st.ok()) return st;
  const SelectAttentionParams& f = p.fwd;
  const DType dt = f.dtype;
  const Acc scale = static_cast<Acc>(static_cast<float>(f.scale_value));
  const int64_t G = sh.G, K = sh.K, D = sh.D, Dv = sh.Dv, lp = sh.block, N1 = sh.N1, N2 = sh.N2;
  std::vector<Acc> dq(static_cast<size_t>(sh.T1 * N1 * D), Acc(0));
  std::vector<Acc> dk(static_cast<size_t>(sh.T2 * N2 * D), Acc(0));
  std::vector<Acc> dv(static_cast<size_t>(sh.T2 * N2 * Dv), Acc(0));
  std::vector<int64_t> E;  // key rows of the visible entries (§3)
  std::vector<Acc> q(static_cast<size_t>(D)), go(static_cast<size_t>(Dv));
  for (const BatchInfo& bi : select_detail::make_batches(f)) {
    for (int64_t s = 0; s < bi.sq; ++s) {
      const int64_t t = bi.q_begin + s;
      for (int64_t n2 = 0; n2 < N2; ++n2) {
        E.clear();
        for (int64_t j = 0; j < K; ++j) {
          const int64_t x = select_detail::index_at(f, t, n2, j);
          if (x == -1) continue;
          for (int64_t r = 0; r < lp; ++r) {
            const int64_t pos = x * lp + r;
            if (pos < bi.skv && (!f.causal || pos <= s)) E.push_back(bi.k_begin + pos);
          }
        }
        // §6: a row without visible entries contributes nothing (query_grad stays 0)
        if (E.empty()) continue;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          const Acc m = static_cast<Acc>(load_stat(p.softmax_max, t, h));
          const Acc l_sum = static_cast<Acc>(load_stat(p.softmax_sum, t, h));
          for (int64_t d = 0; d < D; ++d) q[d] = load<Acc>(f.query, t, h, d, dt);
          // Dlt = sum_i dO[t,h,i] O[t,h,i]
          Acc dlt = 0;
          for (int64_t i = 0; i < Dv; ++i) {
            go[i] = load<Acc>(p.grad, t, h, i, dt);
            dlt += go[i] * load<Acc>(p.attention_out, t, h, i, dt);
          }
          for (const int64_t row : E) {
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += q[d] * load<Acc>(f.key, row, n2, d, dt);
            const Acc S = dot * scale;                     // §4 step 1
            const Acc P = std::exp(S - m) / l_sum;         // from the statistics as given
            Acc dP = 0;
            for (int64_t i = 0; i < Dv; ++i) dP += go[i] * load<Acc>(f.value, row, n2, i, dt);
            const Acc dS = P * (dP - dlt);
            Acc* dqr = &dq[static_cast<size_t>((t * N1 + h) * D)];
            Acc* dkr = &dk[static_cast<size_t>((row * N2 + n2) * D)];
            Acc* dvr = &dv[static_cast<size_t>((row * N2 + n2) * Dv)];
            for (int64_t d = 0; d < D; ++d) {
              dqr[d] += scale * dS * load<Acc>(f.key, row, n2, d, dt);
              dkr[d] += scale * dS * q[d];
            }
            for (int64_t i = 0; i < Dv; ++i) dvr[i] += P * go[i];
          }
        }
      }
    }
  }
  // §8: outputs rounded once with rha_T, contiguous
  for (size_t i = 0; i < dq.size(); ++i) select_detail::store_rha(p.grad_query, static_cast<int64_t>(i), dq[i], dt);
  for (size_t i = 0; i < dk.size(); ++i) select_detail::store_rha(p.grad_key, static_cast<int64_t>(i), dk[i], dt);
  for (size_t i = 0; i < dv.size(); ++i) select_detail::store_rha(p.grad_value, static_cast<int64_t>(i), dv[i], dt);
  return Status::Ok();
}

}  // namespace

Status backward_fp32(const SelectAttentionGradParams& p) { return backward<float>(p); }
Status backward_fp64(const SelectAttentionGradParams& p) { return backward<double>(p); }

}  // namespace nsa::select_reference

namespace nsa {
Status select_attention_backward_reference(const SelectAttentionGradParams& p) {
  if (p.fwd.dtype == DType::kF64) return select_reference::backward_fp64(p);
  return select_reference::backward_fp32(p);
}
}  // namespace nsa
