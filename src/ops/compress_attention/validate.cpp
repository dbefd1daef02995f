// Argument rules of §6 (forward) and of the backward's extra arguments (§7: the forward's results and dO),
// shared by every backend. Every failure names the argument and what was expected; nothing is written by any
// entry point when this fails.
#include <cmath>
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/validate.h"

namespace nsa {

namespace {

// err(...): detail::arg_error, the message streamed from its arguments.
constexpr auto err = [](auto&&... args) { return detail::arg_error(std::forward<decltype(args)>(args)...); };

using detail::ceil_div;
using detail::shape_str;

Status check_tensor(const Tensor3& t, const char* name) {
  if (t.data == nullptr) return err(name, " must not be null");
  for (int i = 0; i < 3; ++i)
    if (t.size[i] <= 0) return err(name, " must not be empty: got shape ", shape_str(t.size, 3));
  return Status::Ok();
}

Status check_list(const IntList& l, const char* name) {
  if (l.data == nullptr) return err(name, " must be given (a list of prefix sums, one per batch)");
  if (l.size < 1) return err(name, " must have at least one element");
  if (l.data[0] < 0) return err(name, " must start at a value >= 0, got ", l.data[0]);
  for (int64_t i = 1; i < l.size; ++i)
    if (l.data[i] < l.data[i - 1])
      return err(name, " must be non-decreasing prefix sums, but element ", i, " (", l.data[i],
                 ") < element ", i - 1, " (", l.data[i - 1], ")");
  return Status::Ok();
}

Status check_mask(const Mask2& m, const char* name, int64_t rows, int64_t cols, const char* expect, bool larger) {
  if (m.data == nullptr) return Status::Ok();
  if (larger && (m.size[0] < rows || m.size[1] < cols))
    return err(name, " must have at least [", rows, ", ", cols, "] (", expect, ") rows and columns, got ",
               shape_str(m.size, 2));
  if (!larger && (m.size[0] != rows || m.size[1] != cols))
    return err(name, " must have shape [", rows, ", ", cols, "] (", expect, "), got ", shape_str(m.size, 2));
  return Status::Ok();
}

// A [T, N1, D2] argument of the backward (attention_out, grad_out).
Status check_dout(const Tensor3& t, const char* name, const CompressAttentionShape& sh) {
  if (t.data == nullptr) return err(name, " must not be null");
  if (t.size[0] != sh.T || t.size[1] != sh.N1 || t.size[2] != sh.D2)
    return err(name, " must have the shape of attention_out [T, N1, D2] = [", sh.T, ", ", sh.N1, ", ", sh.D2,
               "], got [", t.size[0], ", ", t.size[1], ", ", t.size[2], "]");
  return Status::Ok();
}

Status check_block_param(int64_t v, const char* name, int64_t lo, int64_t hi) {
  if (v % 16 != 0 || v < lo || v > hi)
    return err(name, " must be a multiple of 16 in [", lo, ", ", hi, "], got ", v);
  return Status::Ok();
}

}  // namespace

Status validate_compress_attention(const CompressAttentionParams& p, CompressAttentionShape* out_shape) {
  Status s;
  if (static_cast<int>(p.dtype) < 0 || static_cast<int>(p.dtype) > 3)
    return err("dtype must be bfloat16, float16, float32 or float64");
  if (!(s = check_tensor(p.query, "query")).ok()) return s;
  if (!(s = check_tensor(p.key, "key")).ok()) return s;
  if (!(s = check_tensor(p.value, "value")).ok()) return s;

  CompressAttentionShape sh;
  sh.T = p.query.size[0];
  sh.N1 = p.query.size[1];
  sh.D = p.query.size[2];
  sh.T2 = p.key.size[0];
  sh.N2 = p.key.size[1];
  sh.D2 = p.value.size[2];
  if (p.key.size[2] != sh.D)
    return err("key must have the head dim D of query (", sh.D, "), got key.size(2) = ", p.key.size[2]);
  if (p.value.size[0] != sh.T2 || p.value.size[1] != sh.N2)
    return err("value must have the first two dims of key [", sh.T2, ", ", sh.N2, "], got [", p.value.size[0],
               ", ", p.value.size[1], "]");
  if (sh.D2 > sh.D)
    return err("value head dim D2 (", sh.D2, ") must be <= the head dim D of query and key (", sh.D, ")");
  if (!std::isfinite(p.scale_value)) return err("scale_value must be finite, got ", p.scale_value);
  if (!std::isfinite(static_cast<float>(p.scale_value)))
    return err("scale_value must be finite as float32, got ", p.scale_value);
  if (p.head_num != sh.N1)
    return err("head_num must equal the number of query heads query.size(1) = ", sh.N1, ", got ", p.head_num);
  if (sh.N1 % sh.N2 != 0)
    return err("the number of query heads (", sh.N1, ") must be a multiple of the number of key/value heads (",
               sh.N2, ")");
  sh.G = sh.N1 / sh.N2;

  const int64_t l = p.compress_block_size, d = p.compress_stride, lp = p.select_block_size;
  if (!(s = check_block_param(l, "compress_block_size", 16, 128)).ok()) return s;
  if (!(s = check_block_param(d, "compress_stride", 16, 64)).ok()) return s;
  if (!(s = check_block_param(lp, "select_block_size", 16, 128)).ok()) return s;
  if (d > l) return err("compress_stride (", d, ") must be <= compress_block_size (", l, ")");
  if (l > lp) return err("compress_block_size (", l, ") must be <= select_block_size (", lp, ")");
  if (lp % d != 0)
    return err("select_block_size (", lp, ") must be a multiple of compress_stride (", d, ")");
  sh.M = lp / d;
  sh.N = l / d;
  sh.K = p.select_block_count;
  if (sh.K < 1 || sh.K > 32) return err("select_block_count must be in [1, 32], got ", sh.K);

  if (!(s = check_list(p.actual_seq_qlen, "actual_seq_qlen")).ok()) return s;
  if (!(s = check_list(p.actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen")).ok()) return s;
  sh.B = p.actual_seq_qlen.size;
  if (p.actual_cmp_seq_kvlen.size != sh.B)
    return err("actual_cmp_seq_kvlen must have as many elements as actual_seq_qlen (", sh.B, "), got ",
               p.actual_cmp_seq_kvlen.size);
  if (p.actual_seq_qlen.data[sh.B - 1] != sh.T)
    return err("actual_seq_qlen[-1] must equal the number of query rows T = query.size(0) = ", sh.T, ", got ",
               p.actual_seq_qlen.data[sh.B - 1]);
  if (p.actual_cmp_seq_kvlen.data[sh.B - 1] > sh.T2)
    return err("actual_cmp_seq_kvlen[-1] must be <= the number of key rows key.size(0) = ", sh.T2, ", got ",
               p.actual_cmp_seq_kvlen.data[sh.B - 1]);
  int64_t min_sel = INT64_MAX, q_prev = 0, c_prev = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t sq = p.actual_seq_qlen.data[b] - q_prev;
    const int64_t c = p.actual_cmp_seq_kvlen.data[b] - c_prev;
    if (c < 1)
      return err("actual_cmp_seq_kvlen must give every batch at least one compressed token, but batch ", b,
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
    return err("select_block_count (", sh.K, ") must be <= the smallest number of selection blocks of a batch, ",
               "min_b ceil(C_b / ", sh.M, ") = ", min_sel);
  if (p.actual_sel_seq_kvlen.data != nullptr) {
    if (p.actual_sel_seq_kvlen.size != sh.B)
      return err("actual_sel_seq_kvlen must have as many elements as actual_seq_qlen (", sh.B, "), got ",
                 p.actual_sel_seq_kvlen.size);
    int64_t acc = 0;
    c_prev = 0;
    for (int64_t b = 0; b < sh.B; ++b) {
      const int64_t c = p.actual_cmp_seq_kvlen.data[b] - c_prev;
      c_prev = p.actual_cmp_seq_kvlen.data[b];
      acc += ceil_div(c, sh.M);
      if (p.actual_sel_seq_kvlen.data[b] != acc)
        return err("actual_sel_seq_kvlen[", b, "] must be the prefix sum of ceil(C_b / ", sh.M,
                   ") over the batches = ", acc, ", got ", p.actual_sel_seq_kvlen.data[b]);
    }
  }
  if (p.causal && p.atten_mask.data != nullptr)
    return err("atten_mask must be absent when causal is set (the causal mask of §9 is applied from the lengths)");
  if (p.causal && p.topk_mask.data != nullptr)
    return err("topk_mask must be absent when causal is set (the forced blocks of §9 are applied from the lengths)");
  if (!(s = check_mask(p.atten_mask, "atten_mask", sh.max_sq, sh.max_c, "[maxSq, maxC]", p.larger_masks)).ok())
    return s;
  if (!(s = check_mask(p.topk_mask, "topk_mask", sh.max_sq, sh.max_sel, "[maxSq, maxSel]", p.larger_masks)).ok())
    return s;

  s = detail::check_not_null({{p.attention_out, "attention_out"}, {p.topk_indices, "topk_indices"},
                              {p.softmax_max, "softmax_max"}, {p.softmax_sum, "softmax_sum"}});
  if (s.ok() && out_shape) *out_shape = sh;
  return s;
}

Status validate_compress_attention_backward(const CompressAttentionGradParams& p, CompressAttentionShape* shape) {
  // The forward's output pointers play no part in the backward (the header says they are ignored), but
  // validate_compress_attention requires them: hand it stand-ins that are never dereferenced.
  CompressAttentionParams f = p.fwd;
  static float dummy_f = 0.0f;
  static int32_t dummy_i = 0;
  f.attention_out = &dummy_f;
  f.topk_indices = &dummy_i;
  f.softmax_max = &dummy_f;
  f.softmax_sum = &dummy_f;
  CompressAttentionShape sh;
  Status s = validate_compress_attention(f, &sh);
  if (!s.ok()) return s;
  if (!(s = check_dout(p.attention_out, "attention_out", sh)).ok()) return s;
  if (!(s = check_dout(p.grad_out, "grad_out", sh)).ok()) return s;
  s = detail::check_not_null({{p.softmax_max, "softmax_max"}, {p.softmax_sum, "softmax_sum"},
                              {p.grad_query, "grad_query"}, {p.grad_key, "grad_key"}, {p.grad_value, "grad_value"}});
  if (s.ok() && shape) *shape = sh;
  return s;
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
    return err(entry, ": sizes too large for the CPU backend's 64-bit workspace arithmetic ((T + T2 + 64 B) N1 ",
               "(D + D2 + 64) 128 and T (max C_b + 64) N1 must be below 2^62)");
  return Status::Ok();
}

}  // namespace nsa
