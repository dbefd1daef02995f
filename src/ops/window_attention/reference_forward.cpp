// Reference forward: docs/spec/window_attention.md §5 and §6 line by line, plain loops over every (query, key)
// pair, one thread. The tests' oracle.
// Acc is the arithmetic type of every float32 quantity of §5 (float: the contract literally; double: the fp64
// model used to measure the error of other backends, and the path of fp64 inputs).
#include <cfloat>
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

// rha_T of §5 step 4 applied to a probability (identity for fp32 and fp64 inputs).
template <typename Acc>
Acc round_p(Acc x, DType dt) {
  if (dt == DType::kF32 || dt == DType::kF64) return x;
  return static_cast<Acc>(window_detail::round_rha(static_cast<float>(x), dt));
}

// Element i of an output in the dtype, rounded with rha_T (fp64: the double itself).
void store_rha(void* base, int64_t i, double x, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = window_detail::f32_to_bf16_rha(static_cast<float>(x)); break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = window_detail::f32_to_f16_rha(static_cast<float>(x)); break;
    case DType::kF32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kF64: static_cast<double*>(base)[i] = x; break;
  }
}

template <typename Acc>
Status forward(const WindowAttentionParams& p) {
  WindowAttentionShape sh;
  Status st = validate_window_attention(p, &sh);
  if (!st.ok()) return st;
  const DType dt = p.dtype;
  const std::vector<WBatch> batches = window_detail::make_batches(p);
  const window_detail::Visibility vis(p, sh);
  const Acc scale = static_cast<Acc>(static_cast<float>(p.scale));  // §5 step 1: f32(scale)
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, N1 = sh.N1;

  std::vector<int64_t> keys;  // the visible keys of the current row
  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  for (const WBatch& bi : batches) {
    for (int64_t i = 0; i < bi.sq; ++i) {
      const int64_t t = bi.q0 + i;
      keys.clear();
      for (int64_t j = 0; j < bi.skv; ++j)
        if (vis.visible(bi, i, j)) keys.push_back(j);
      for (int64_t h = 0; h < N1; ++h) {
        const int64_t n2 = h / G;  // §3: query head h reads key/value head h // G
        float m_out, l_out;
        std::fill(acc.begin(), acc.end(), Acc(0));
        if (keys.empty()) {
          // §6: a row without a visible key.
          m_out = -FLT_MAX;
          if (p.inner_precise == 2) {
            l_out = FLT_MAX;  // attention_out = 0
          } else {
            l_out = static_cast<float>(bi.skv);
            const Acc pu = round_p(Acc(1) / static_cast<Acc>(bi.skv), dt);  // P = 1/Skv_b on every key
            for (int64_t j = 0; j < bi.skv; ++j)
              for (int64_t e = 0; e < Dv; ++e) acc[e] += pu * load<Acc>(p.value, bi.k0 + j, n2, e, dt);
          }
        } else {
          // §5 step 1: scores, fp32 dot product then the fp32 scale; step 2: only visible keys take part.
          S.assign(keys.size(), Acc(0));
          for (size_t x = 0; x < keys.size(); ++x) {
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += load<Acc>(p.query, t, h, d, dt) * load<Acc>(p.key, bi.k0 + keys[x], n2, d, dt);
            S[x] = dot * scale;
          }
          // step 3: softmax over the visible keys.
          Acc m = S[0];
          for (size_t x = 1; x < keys.size(); ++x) m = S[x] > m ? S[x] : m;
          Acc l = 0;
          for (size_t x = 0; x < keys.size(); ++x) l += std::exp(S[x] - m);
          // step 4: rha(P) . v, accumulated in Acc.
          for (size_t x = 0; x < keys.size(); ++x) {
            const Acc pj = round_p(std::exp(S[x] - m) / l, dt);
            for (int64_t e = 0; e < Dv; ++e) acc[e] += pj * load<Acc>(p.value, bi.k0 + keys[x], n2, e, dt);
          }
          m_out = static_cast<float>(m);
          l_out = static_cast<float>(l);
        }
        for (int64_t e = 0; e < Dv; ++e) store_rha(p.attention_out, (t * N1 + h) * Dv + e, static_cast<double>(acc[e]), dt);
        // step 5: statistics, 8 copies each, in the layout of softmax_layout.
        const int64_t so = window_detail::stat_offset(p.softmax_layout, N1, bi, h, i);
        for (int c = 0; c < 8; ++c) {
          p.softmax_max[so + c] = m_out;
          p.softmax_sum[so + c] = l_out;
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status forward_fp32(const WindowAttentionParams& p) { return forward<float>(p); }
Status forward_fp64(const WindowAttentionParams& p) { return forward<double>(p); }

}  // namespace nsa::window_reference

namespace nsa {
Status window_attention_reference(const WindowAttentionParams& p) {
  if (p.dtype == DType::kF64) return window_reference::forward_fp64(p);
  return window_reference::forward_fp32(p);
}
}  // namespace nsa
