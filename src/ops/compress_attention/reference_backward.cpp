// Reference backward: §7 line by line, plain loops, single thread. The tests' oracle for the
// gradients (the argument checks, shared by every backend, are validate_compress_attention_backward in
// validate.cpp).
// Acc is the arithmetic type of every float32 quantity of §7 (float: the spec literally; double: the
// fp64 model used to measure the error of other backends, and the gradcheck path for fp64 inputs).
//
// Choices that §7 leaves open, made here:
// - P and dS stay in Acc: they are NOT rounded to the input dtype before the products that use them
//   (§7 allows either; the unrounded form is the exact derivative of §3 up to Acc rounding).
// - P uses the saved statistics as given (float32 m and l_sum), converted to Acc: P = exp(S - m) / l_sum.
//   For fp64 inputs the statistics are therefore still float32 values: the gradient is exact up to their
//   rounding (relative ~1e-7), which is far below what gradcheck resolves.
// Masked entries (§7, the general rule): dV gets the P the forward used, exp(-FLT_MAX - m) / l_sum, and dS is set
// to zero, so a masked entry never reaches dQ or dK. P is 0 there in an ordinary row; it is 1 / C_b in a fully
// masked row (§5: the row gives dV its uniform share, zero dQ, nothing to dK) and 1 / l_sum in a row whose every
// visible score overflowed to -inf (m = -FLT_MAX: its masked columns share dV, P = 0 on the visible ones).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "common/mask_rows.h"
#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/causal.h"
#include "ops/compress_attention/reference.h"

namespace nsa {

using detail::BatchInfo;
using detail::mask_at;

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress_attention_backward>::run(const Params& p, const Shape& sh, DType dt) {
  detail::CausalMask causal_mask;  // §10 causal: atten_mask is the view of causal.h
  const CompressAttentionParams f = detail::with_causal_view(p.fwd, sh, &causal_mask);
  const std::vector<BatchInfo> batches = detail::make_batches(f, sh);
  const Acc scale = ref::float32_scale<Acc>(f.scale_value);  // §1: used as float32
  const Acc neg_max = static_cast<Acc>(-FLT_MAX);
  const int64_t G = sh.G, D = sh.D, D2 = sh.D2, N1 = sh.N1, N2 = sh.N2;

  // dK (unscaled: Σ dS·q) and dV of every key/value row, in Acc; rows past the last prefix sum stay 0.
  ref::KvGradients<Acc> kv(sh.T2, N2, D, D2);
  std::vector<Acc> S, P, dS, dq(static_cast<size_t>(D)), go(static_cast<size_t>(D2));
  for (const BatchInfo& bi : batches) {
    const int64_t C = bi.c;
    S.assign(static_cast<size_t>(C), 0);
    P.assign(static_cast<size_t>(C), 0);
    dS.assign(static_cast<size_t>(C), 0);
    for (int64_t s = 0; s < bi.sq; ++s) {
      const int64_t t = bi.q_begin + s;  // row of query / attention_out / grad_out
      for (int64_t n2 = 0; n2 < N2; ++n2) {
        const auto key_row = [&](int64_t c) { return ref::row3(f.key, bi.c_begin + c, n2); };  // compressed token c
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;  // query head; reads KV head h / G = n2 (§2)
          const ref::ElemRow q = ref::row3(f.query, t, h);
          // §3.1-3.2 scores recomputed: dot product in Acc, times the float32 scale, masked entries replaced.
          ref::score_row(q, key_row, C, D, scale, dt, S.data());
          for (int64_t c = 0; c < C; ++c)
            if (mask_at(f.atten_mask, s, c)) S[c] = neg_max;
          // §7: P from the saved statistics (§4 layout).
          const int64_t so = detail::stat_offset(bi, h, s);
          const ref::SoftmaxStats<Acc> sm{static_cast<Acc>(p.softmax_max[so]), static_cast<Acc>(p.softmax_sum[so])};
          // Dlt = Σ_j dO·O with O the attention_out as returned.
          ref::load_row(ref::row3(p.grad_out, t, h), D2, dt, go.data());
          const Acc dlt = ref::dot(go.data(), ref::row3(p.attention_out, t, h), D2, dt);
          // dP = dO·v; dS = P (dP - Dlt), zero for a masked entry (§7 rule 1); dV += P dO.
          for (int64_t c = 0; c < C; ++c) {
            const ref::ElemRow v = ref::row3(f.value, bi.c_begin + c, n2);
            const ref::EntryGrad<Acc> eg = ref::entry_grad(S[c], sm, go.data(), v, D2, dlt, dt);
            P[c] = eg.p;
            dS[c] = mask_at(f.atten_mask, s, c) ? Acc(0) : eg.ds;  // §7 rule 1
            ref::add_scaled(P[c], go.data(), D2, kv.dv_row(bi.c_begin + c, n2));
          }
          // dQ = scale Σ_c dS k (this row's only writer); dK += dS q (scaled once at the end).
          std::fill(dq.begin(), dq.end(), Acc(0));
          for (int64_t c = 0; c < C; ++c) {
            ref::add_scaled(dS[c], key_row(c), D, dt, dq.data());
            ref::add_scaled(dS[c], q, D, dt, kv.dk_row(bi.c_begin + c, n2));
          }
          for (int64_t j = 0; j < D; ++j)
            detail::store_f64(p.grad_query, (t * N1 + h) * D + j, static_cast<double>(scale * dq[j]), dt);
        }
      }
    }
  }
  // Outputs in the dtype; key/value rows past cmp_seq_kvlen[B-1] get zeros (§7).
  for (int64_t i = 0; i < sh.T2 * N2 * D; ++i)
    detail::store_f64(p.grad_key, i, static_cast<double>(scale * kv.dk[static_cast<size_t>(i)]), dt);
  for (int64_t i = 0; i < sh.T2 * N2 * D2; ++i)
    detail::store_f64(p.grad_value, i, static_cast<double>(kv.dv[static_cast<size_t>(i)]), dt);
}

template struct detail::ReferenceEntry<validate_compress_attention_backward>;

Status compress_attention_backward_reference(const CompressAttentionGradParams& p) {
  return detail::ReferenceEntry<validate_compress_attention_backward>::for_dtype(p);
}

}  // namespace nsa
