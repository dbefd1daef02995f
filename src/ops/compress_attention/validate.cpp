// Argument rules of §6 (forward) and of the backward's extra arguments (§7: the forward's results and dO),
// shared by every backend. Every failure names the argument and what was expected; nothing is written by any
// entry point when this fails.
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/validate.h"

namespace nsa {

namespace {

using detail::arg_error;

using detail::ceil_div;
using detail::shape_str;

// The prefix-sum lists of §6.
constexpr detail::PrefixSumRules kListRules{
    false, " must be given (a list of prefix sums, one per batch)", " must have at least one element",
    " must start at a value >= 0, got ", " must be non-decreasing prefix sums, but element "};

Status check_mask(const Mask2& m, const char* name, int64_t rows, int64_t cols, const char* expect, bool larger) {
  if (m.data == nullptr) return Status::Ok();
  if (larger && (m.size[0] < rows || m.size[1] < cols))
    return arg_error(name, " must have at least [", rows, ", ", cols, "] (", expect, ") rows and columns, got ",
                     shape_str(m.size, 2));
  if (!larger && (m.size[0] != rows || m.size[1] != cols))
    return arg_error(name, " must have shape [", rows, ", ", cols, "] (", expect, "), got ", shape_str(m.size, 2));
  return Status::Ok();
}

// A [T, N1, D2] argument of the backward (attention_out, grad_out).
Status check_dout(const Tensor3& t, const char* name, const CompressAttentionShape& sh) {
  if (t.data == nullptr) return arg_error(name, " must not be null");
  return detail::check_sizes3(t, name, "have the shape of attention_out [T, N1, D2]", sh.T, sh.N1, sh.D2);
}

Status check_block_param(int64_t v, const char* name, int64_t lo, int64_t hi) {
  if (v % 16 != 0 || v < lo || v > hi)
    return arg_error(name, " must be a multiple of 16 in [", lo, ", ", hi, "], got ", v);
  return Status::Ok();
}

}  // namespace

Status validate_compress_attention(const CompressAttentionParams& p, CompressAttentionShape* out_shape) {
  // §6: every view given and non-empty; the messages name the view only
  CompressAttentionShape sh;
  Status s = detail::check_qkv(p, {.dv = "D2", .layout_named = false, .empty_rows = false}, &sh);
  if (!s.ok()) return s;
  if (!(s = detail::check_finite_scale(p.scale_value, "scale_value")).ok()) return s;

  const int64_t l = p.compress_block_size, d = p.compress_stride, lp = p.select_block_size;
  if (!(s = check_block_param(l, "compress_block_size", 16, 128)).ok()) return s;
  if (!(s = check_block_param(d, "compress_stride", 16, 64)).ok()) return s;
  if (!(s = check_block_param(lp, "select_block_size", 16, 128)).ok()) return s;
  if (d > l) return arg_error("compress_stride (", d, ") must be <= compress_block_size (", l, ")");
  if (l > lp) return arg_error("compress_block_size (", l, ") must be <= select_block_size (", lp, ")");
  if (lp % d != 0)
    return arg_error("select_block_size (", lp, ") must be a multiple of compress_stride (", d, ")");
  sh.M = lp / d;
  sh.N = l / d;
  sh.K = p.select_block_count;
  if (sh.K < 1 || sh.K > 32) return arg_error("select_block_count must be in [1, 32], got ", sh.K);

  constexpr detail::SeqListWords kWords{"actual_cmp_seq_kvlen", "T = query.size(0)", "key.size(0)"};
  if (!(s = detail::check_seq_lists(p.actual_seq_qlen, p.actual_cmp_seq_kvlen, sh.T, sh.T2, kWords, kListRules,
                                    &sh.B)).ok())
    return s;
  int64_t min_sel = INT64_MAX, q_prev = 0, c_prev = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t sq = p.actual_seq_qlen.data[b] - q_prev;
    const int64_t c = p.actual_cmp_seq_kvlen.data[b] - c_prev;
    if (c < 1)
      return arg_error("actual_cmp_seq_kvlen must give every batch at least one compressed token, but batch ", b,
                       " has C_b = ", c);
    const int64_t sel = ceil_div(c, sh.M);
    sh.max_sq = sq > sh.max_sq ? sq : sh.max_sq;
    sh.max_c = c > sh.max_c ? c : sh.max_c;
    sh.max_sel = sel > sh.max_sel ? sel : sh.max_sel;
    min_sel = sel < min_sel ? sel : min_sel;
    q_prev = p.actual_seq_qlen.data[b];
    c_prev = p.actual_cmp_seq_kvlen.data[b];
  }
  if (sh.K > min_sel && !p.short_batches)
    return arg_error("select_block_count (", sh.K, ") must be <= the smallest number of selection blocks of a batch, ",
                     "min_b ceil(C_b / ", sh.M, ") = ", min_sel);
  if (p.actual_sel_seq_kvlen.data != nullptr) {
    if (!(s = detail::check_batch_count(p.actual_sel_seq_kvlen, "actual_sel_seq_kvlen", sh.B)).ok()) return s;
    int64_t acc = 0;
    c_prev = 0;
    for (int64_t b = 0; b < sh.B; ++b) {
      const int64_t c = p.actual_cmp_seq_kvlen.data[b] - c_prev;
      c_prev = p.actual_cmp_seq_kvlen.data[b];
      acc += ceil_div(c, sh.M);
      if (p.actual_sel_seq_kvlen.data[b] != acc)
        return arg_error("actual_sel_seq_kvlen[", b, "] must be the prefix sum of ceil(C_b / ", sh.M,
                         ") over the batches = ", acc, ", got ", p.actual_sel_seq_kvlen.data[b]);
    }
  }
  if (p.causal && p.atten_mask.data != nullptr)
    return arg_error("atten_mask must be absent when causal is set (the causal mask of §9 is applied from the ",
                     "lengths)");
  if (p.causal && p.topk_mask.data != nullptr)
    return arg_error("topk_mask must be absent when causal is set (the forced blocks of §9 are applied from the ",
                     "lengths)");
  if (!(s = check_mask(p.atten_mask, "atten_mask", sh.max_sq, sh.max_c, "[maxSq, maxC]", p.larger_masks)).ok())
    return s;
  if (!(s = check_mask(p.topk_mask, "topk_mask", sh.max_sq, sh.max_sel, "[maxSq, maxSel]", p.larger_masks)).ok())
    return s;

  s = detail::check_not_null({{p.attention_out, "attention_out"}, {p.topk_indices, "topk_indices"},
                              {p.softmax_max, "softmax_max"}, {p.softmax_sum, "softmax_sum"}});
  return detail::publish_shape(s, sh, out_shape);
}

Status validate_compress_attention_backward(const CompressAttentionGradParams& p, CompressAttentionShape* shape) {
  // The forward's output pointers play no part in the backward (the header says they are ignored).
  const auto own_rules = [&](const CompressAttentionShape& sh) -> Status {
    Status s;
    if (!(s = check_dout(p.attention_out, "attention_out", sh)).ok()) return s;
    if (!(s = check_dout(p.grad_out, "grad_out", sh)).ok()) return s;
    return detail::check_not_null({{p.softmax_max, "softmax_max"}, {p.softmax_sum, "softmax_sum"},
                                   {p.grad_query, "grad_query"}, {p.grad_key, "grad_key"},
                                   {p.grad_value, "grad_value"}});
  };
  using F = CompressAttentionParams;
  return detail::validate_backward(p.fwd, validate_compress_attention, shape, own_rules,
                                   &F::attention_out, &F::topk_indices, &F::softmax_max, &F::softmax_sum);
}

// Every size the CPU forward and backward form (packed K/V panels, dK/dV partials, per-worker tiles: elements; tile
// plans: entries) is at most (T + T2 + 64 B) N1 (D + D2 + 64) 128 or T (max C_b + 64) N1; both must stay below
// 2^62, computed here in long double so that the check itself cannot overflow.
Status check_cpu_workspace_sizes(const CompressAttentionShape& sh, const char* entry) {
  using LD = long double;
  const LD panels = (LD(sh.T) + LD(sh.T2) + 64 * LD(sh.B)) * LD(sh.N1) * (LD(sh.D) + LD(sh.D2) + 64) * 128;
  const LD plans = LD(sh.T) * (LD(sh.max_c) + 64) * LD(sh.N1);
  const LD limit = 4611686018427387904.0L;  // 2^62
  if (panels >= limit || plans >= limit)
    return arg_error(entry, ": sizes too large for the CPU backend's 64-bit workspace arithmetic ((T + T2 + 64 B) N1 ",
                     "(D + D2 + 64) 128 and T (max C_b + 64) N1 must be below 2^62)");
  return Status::Ok();
}

}  // namespace nsa
