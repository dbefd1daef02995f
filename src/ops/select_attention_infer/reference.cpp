// Reference of select_attention_infer: docs/spec/decode.md §4 line by line, plain loops, single thread. Acc is the
// arithmetic type of every float32 quantity of §4 (float: the contract literally; double: the fp64 model of §6).
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "ops/select_attention/rounding.h"
#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention_infer/reference.h"

namespace nsa::select_infer_reference {
namespace {

template <typename Acc>
Acc load(const void* data, int64_t off, DType dt) {
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(data, off, dt);
  else return detail::load_f32(data, off, dt);
}

// §4 step 4: round_out is rne_T for bf16 and rha_T for fp16 (identity for fp32 / fp64).
void store_out(void* out, int64_t i, double x, DType dt) {
  if (dt == DType::kF16) select_detail::store_rha(out, i, x, dt);
  else detail::store_f64(out, i, x, dt);
}

template <typename Acc>
Status forward(const SelectAttentionInferParams& p) {
  SelectAttentionInferShape sh;
  Status st = validate_select_attention_infer(p, &sh);
  if (!st.ok()) return st;
  const DType dt = p.dtype;
  const bool low = dt == DType::kBF16 || dt == DType::kF16;
  const Acc scale = static_cast<Acc>(static_cast<float>(p.scale_value));  // used as a float32 (§4 step 3)
  const int64_t G = sh.G, D = sh.D, Dv = sh.Dv, P = sh.page;
  std::vector<paged::Run> runs;
  std::vector<int64_t> koff, voff;  // element offsets of the entries' key / value rows
  std::vector<Acc> S, acc(static_cast<size_t>(Dv));
  const std::vector<select_infer::Batch> batches = select_infer::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const select_infer::Batch& bt = batches[static_cast<size_t>(b)];
    for (int64_t i = 0; i < bt.rows; ++i) {
      const int64_t t = bt.row0 + i;
      for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
        koff.clear();
        voff.clear();
        if (i < bt.q) {  // §7 item 7: batch-major rows i >= q_b get zeros
          // §4 step 1: the slots' positions, clipped at L_i; -1 slots empty
          select_infer::token_runs(p, bt, i, n2, runs);
          for (const paged::Run& r : runs)
            for (int64_t pos = r.start; pos < r.end; ++pos) {
              // §4 step 2: position pos through the block table; duplicated indices count twice
              const int64_t page = paged::table_at(p.block_table, b, pos / P);
              koff.push_back(paged::cache_offset(p.key, page, pos % P, n2));
              voff.push_back(paged::cache_offset(p.value, page, pos % P, n2));
            }
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = n2 * G + g;
          const int64_t o = (t * sh.N1 + h) * Dv;
          if (koff.empty()) {  // §4 step 5: no entry gives a zero row
            for (int64_t e = 0; e < Dv; ++e) detail::store_f64(p.attention_out, o + e, 0.0, dt);
            continue;
          }
          // §4 step 3: S_e = Acc(q . k_e) * scale, m, unnormalised exp, l_sum of the unrounded values
          const int64_t qo = t * p.query.stride[0] + h * p.query.stride[1];
          S.resize(koff.size());
          for (size_t e = 0; e < koff.size(); ++e) {
            Acc dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += load<Acc>(p.query.data, qo + d * p.query.stride[2], dt) *
                     load<Acc>(p.key.data, koff[e] + d * p.key.stride[3], dt);
            S[e] = dot * scale;
          }
          Acc m = S[0];
          for (size_t e = 1; e < S.size(); ++e) m = S[e] > m ? S[e] : m;
          Acc l_sum = 0;
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (size_t e = 0; e < S.size(); ++e) {
            const Acc pe = std::exp(S[e] - m);
            l_sum += pe;
            // §4 step 4: the unnormalised P rounded half away from zero to the input dtype, times v, Acc sums
            const Acc pr = low ? static_cast<Acc>(select_detail::round_rha(static_cast<float>(pe), dt)) : pe;
            for (int64_t d = 0; d < Dv; ++d) acc[d] += pr * load<Acc>(p.value.data, voff[e] + d * p.value.stride[3], dt);
          }
          // §4 step 4: the division last, one rounding (rne_T for bf16, rha_T for fp16)
          for (int64_t d = 0; d < Dv; ++d) {
            const Acc r = acc[d] / l_sum;
            store_out(p.attention_out, o + d, static_cast<double>(r), dt);
          }
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status forward_fp32(const SelectAttentionInferParams& p) { return forward<float>(p); }
Status forward_fp64(const SelectAttentionInferParams& p) { return forward<double>(p); }

}  // namespace nsa::select_infer_reference

namespace nsa {
Status select_attention_infer_reference(const SelectAttentionInferParams& p) {
  if (p.dtype == DType::kF64) return select_infer_reference::forward_fp64(p);
  return select_infer_reference::forward_fp32(p);
}
}  // namespace nsa
