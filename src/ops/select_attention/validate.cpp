// Argument rules of docs/spec/select_attention.md §7, forward and backward. Every failure names the argument and
// what was expected; no entry point writes anything when this fails (each calls it before its first write).
#include <sstream>
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/batches.h"
#include "ops/select_attention/validate.h"

namespace nsa {

namespace {

using detail::shape_str;
using detail::arg_error;

using select_detail::ceil_div;

// The prefix-sum lists of §7.
constexpr detail::PrefixSumRules kListRules{
    false, " must be given (a list of prefix sums, one per batch)", " must have at least one element (B >= 1)",
    " must hold non-negative prefix sums, but element 0 is ", " must be non-decreasing prefix sums, but element "};

}  // namespace

Status validate_select_attention(const SelectAttentionParams& p, SelectAttentionShape* out_shape) {
  // §7: 3-D with sizes >= 0; dim 0 may be 0 (an empty packed dimension), the others must be >= 1; data may be null
  // only when the view holds no element
  SelectAttentionShape sh;
  Status s = detail::check_qkv(p, {.dv = "Dv", .layout_named = true, .empty_rows = true}, &sh);
  if (!s.ok()) return s;

  if (!(s = select_detail::check_selection(p.select_block_size, p.select_block_count)).ok()) return s;
  sh.block = p.select_block_size;
  sh.K = p.select_block_count;
  if (static_cast<int>(p.index_dtype) != 0 && static_cast<int>(p.index_dtype) != 1)
    return arg_error("topk_indices must be int32 or int64 (index_dtype)");
  const Tensor3& ti = p.topk_indices;
  for (int i = 0; i < 3; ++i)
    if (ti.size[i] < 0) return arg_error("topk_indices must have non-negative sizes, got ", shape_str(ti.size, 3));
  if (!(s = select_detail::check_topk_indices(ti, "[T1, N2, K]", sh.T1, sh.N2, sh.K)).ok()) return s;
  if (!(s = detail::check_finite_scale(p.scale_value, "scale_value")).ok()) return s;

  constexpr detail::SeqListWords kWords{"actual_seq_kvlen", "T1 = query.size(0)", "T2 = key.size(0)"};
  if (!(s = detail::check_seq_lists(p.actual_seq_qlen, p.actual_seq_kvlen, sh.T1, sh.T2, kWords, kListRules, &sh.B))
           .ok())
    return s;
  sh.kv_end = p.actual_seq_kvlen.data[sh.B - 1];
  int64_t q_prev = 0, k_prev = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t sq = p.actual_seq_qlen.data[b] - q_prev, skv = p.actual_seq_kvlen.data[b] - k_prev;
    const int64_t blocks = ceil_div(skv, sh.block);
    sh.max_sq = sq > sh.max_sq ? sq : sh.max_sq;
    sh.max_skv = skv > sh.max_skv ? skv : sh.max_skv;
    sh.max_blocks = blocks > sh.max_blocks ? blocks : sh.max_blocks;
    // §7: every index of the batch's rows is -1 or in [0, ceil(Skv_b / l'))
    for (int64_t t = q_prev; t < p.actual_seq_qlen.data[b]; ++t)
      for (int64_t n2 = 0; n2 < sh.N2; ++n2)
        for (int64_t j = 0; j < sh.K; ++j) {
          const int64_t x = select_detail::index_at(p, t, n2, j);
          if (x < -1 || x >= blocks)
            return select_detail::index_range_error(t, n2, j, x, b, skv, "keys", sh.block, blocks);
        }
    q_prev = p.actual_seq_qlen.data[b];
    k_prev = p.actual_seq_kvlen.data[b];
  }

  if (sh.T1 > 0 && !(s = detail::check_not_null({{p.attention_out, "attention_out"}, {p.softmax_max, "softmax_max"},
                                                   {p.softmax_sum, "softmax_sum"}})).ok())
    return s;
  return detail::publish_shape(Status::Ok(), sh, out_shape);
}

namespace {

// A backward argument of the sizes `what` = [s0, s1, s2] (s0 = T1), given unless it holds no row.
Status check_grad_arg(const Tensor3& t, const char* name, const char* what, int64_t s0, int64_t s1, int64_t s2) {
  Status s = detail::check_sizes3(t, name, what, s0, s1, s2);
  if (s.ok() && t.data == nullptr && s0 > 0) return arg_error(name, " must not be null");
  return s;
}

Status check_like_out(const Tensor3& t, const char* name, const SelectAttentionShape& sh) {
  return check_grad_arg(t, name, "have the shape of attention_out [T1, N1, Dv]", sh.T1, sh.N1, sh.Dv);
}

// softmax_max / softmax_sum: fp32 [T1, N1, 8] (the row statistic repeated 8 times).
Status check_stat(const Tensor3& t, const char* name, const SelectAttentionShape& sh) {
  return check_grad_arg(t, name, "be float32 of shape [T1, N1, 8]", sh.T1, sh.N1, 8);
}

}  // namespace

Status validate_select_attention_backward(const SelectAttentionGradParams& p, SelectAttentionShape* out_shape) {
  // The forward's output pointers play no part in the backward (the header says they are ignored).
  const auto own_rules = [&](const SelectAttentionShape& sh) -> Status {
    Status s;
    if (!(s = check_like_out(p.grad, "grad", sh)).ok()) return s;
    if (!(s = check_like_out(p.attention_out, "attention_out", sh)).ok()) return s;
    if (!(s = check_stat(p.softmax_max, "softmax_max", sh)).ok()) return s;
    if (!(s = check_stat(p.softmax_sum, "softmax_sum", sh)).ok()) return s;
    if (p.grad_query == nullptr && sh.T1 > 0) return arg_error("grad_query must not be null");
    if (p.grad_key == nullptr && sh.T2 > 0) return arg_error("grad_key must not be null");
    if (p.grad_value == nullptr && sh.T2 > 0) return arg_error("grad_value must not be null");
    return Status::Ok();
  };
  using F = SelectAttentionParams;
  return detail::validate_backward(p.fwd, validate_select_attention, out_shape, own_rules,
                                   &F::attention_out, &F::softmax_max, &F::softmax_sum);
}

}  // namespace nsa
