// Reference backward: docs/spec/window_attention.md §7 line by line, plain loops over every (query, key) pair, one
// thread. The tests' oracle for the gradients.
// Acc is the arithmetic type of every float32 quantity of §7 (float: the contract literally; double: the fp64
// model, and the path of fp64 inputs).
//
// Choices that §7 leaves open, made here:
// - P and dS stay in Acc (not rounded to the input dtype before the products that use them).
// - P uses the saved statistics as given (element 0 of each float32 row): P = exp(S - m) / l.
// - Rows without a visible key (§6) are found from the mask and band, not from the statistics.
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "ops/window_attention/batches.h"
#include "ops/window_attention/reference.h"
#include "ops/window_attention/rounding.h"

namespace nsa::window_reference {
namespace {

using window_detail::WBatch;

template <typename Acc>
Acc load(const Tensor3& t, int64_t i, int64_t j, int64_t k, DType dt) {
  const int64_t off = i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(t.data, off, dt);
  else return detail::load_f32(t.data, off, dt);
}

void store_rha(void* base, int64_t i, double x, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = window_detail::f32_to_bf16_rha(static_cast<float>(x)); break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = window_detail::f32_to_f16_rha(static_cast<float>(x)); break;
    case DType::kF32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kF64: static_cast<double*>(base)[i] = x; break;
  }
}

template <typename Acc>
Status backward(const WindowAttentionGradParams& g) {
  WindowAttentionShape sh;
  Status st = validate_window_attention_backward(g, &sh);
  if (!st.ok()) return st;
  const WindowAttentionParams& p = g.fwd;
  const DType dt = p.dtype;
  const std::vector<WBatch> batches = window_detail::make_batches(p);
  const window_detail::Visibility vis(p, sh);
  const Acc scale = static_cast<Acc>(static_cast<float>(p.scale));
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, N1 = sh.N1, N2 = sh.N2;

  std::vector<Acc> dk(static_cast<size_t>(sh.T2 * N2 * D), Acc(0)), dv(static_cast<size_t>(sh.T2 * N2 * Dv), Acc(0));
  std::vector<Acc> dq(static_cast<size_t>(D)), dyr(static_cast<size_t>(Dv)), qr(static_cast<size_t>(D));
  std::vector<int64_t> keys;
  for (const WBatch& bi : batches) {
    for (int64_t i = 0; i < bi.sq; ++i) {
      const int64_t t = bi.q0 + i;
      keys.clear();
      for (int64_t j = 0; j < bi.skv; ++j)
        if (vis.visible(bi, i, j)) keys.push_back(j);
      for (int64_t h = 0; h < N1; ++h) {
        const int64_t n2 = h / G;
        std::fill(dq.begin(), dq.end(), Acc(0));
        for (int64_t e = 0; e < Dv; ++e) dyr[e] = load<Acc>(g.dy, t, h, e, dt);
        if (keys.empty()) {
          // §7: the uniform average of §6 (inner_precise 0/1) gives dv_j += dy / Skv_b to every key of the
          // batch, dq = 0, nothing to dk; inner_precise 2 (zeros) gives nothing at all.
          if (p.inner_precise != 2) {
            const Acc skv = static_cast<Acc>(bi.skv);
            for (int64_t j = 0; j < bi.skv; ++j)
              for (int64_t e = 0; e < Dv; ++e) dv[((bi.k0 + j) * N2 + n2) * Dv + e] += dyr[e] / skv;
          }
        } else {
          const int64_t so = window_detail::stat_offset(p.softmax_layout, N1, bi, h, i);
          const Acc m = static_cast<Acc>(g.softmax_max[so]), l = static_cast<Acc>(g.softmax_sum[so]);
          Acc dlt = 0;  // Dlt = sum dy . O
          for (int64_t e = 0; e < Dv; ++e) dlt += dyr[e] * load<Acc>(g.attention_in, t, h, e, dt);
          for (int64_t d = 0; d < D; ++d) qr[d] = load<Acc>(p.query, t, h, d, dt);
          for (int64_t j : keys) {
            const int64_t kr = bi.k0 + j;
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * load<Acc>(p.key, kr, n2, d, dt);
            const Acc s = dot * scale;
            const Acc pj = std::exp(s - m) / l;  // P_j
            Acc dp = 0;                          // dP_j = dy . v_j
            for (int64_t e = 0; e < Dv; ++e) dp += dyr[e] * load<Acc>(p.value, kr, n2, e, dt);
            const Acc ds = pj * (dp - dlt);  // dS_j
            for (int64_t d = 0; d < D; ++d) {
              dq[d] += ds * load<Acc>(p.key, kr, n2, d, dt);
              dk[(kr * N2 + n2) * D + d] += scale * ds * qr[d];
            }
            for (int64_t e = 0; e < Dv; ++e) dv[(kr * N2 + n2) * Dv + e] += pj * dyr[e];
          }
        }
        for (int64_t d = 0; d < D; ++d) store_rha(g.grad_query, (t * N1 + h) * D + d, static_cast<double>(scale * dq[d]), dt);
      }
    }
  }
  for (size_t x = 0; x < dk.size(); ++x) store_rha(g.grad_key, static_cast<int64_t>(x), static_cast<double>(dk[x]), dt);
  for (size_t x = 0; x < dv.size(); ++x) store_rha(g.grad_value, static_cast<int64_t>(x), static_cast<double>(dv[x]), dt);
  return Status::Ok();
}

}  // namespace

Status backward_fp32(const WindowAttentionGradParams& p) { return backward<float>(p); }
Status backward_fp64(const WindowAttentionGradParams& p) { return backward<double>(p); }

}  // namespace nsa::window_reference

namespace nsa {
Status window_attention_backward_reference(const WindowAttentionGradParams& p) {
  if (p.fwd.dtype == DType::kF64) return window_reference::backward_fp64(p);
  return window_reference::backward_fp32(p);
}
}  // namespace nsa
