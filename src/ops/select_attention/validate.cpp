// Argument rules of docs/spec/select_attention.md §7, forward and backward. Every failure names the argument and
// what was expected; no entry point writes anything when this fails (each calls it before its first write).
#include <cmath>
#include <sstream>
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/batches.h"

namespace nsa {

namespace {

using detail::shape_str;
// err(...): detail::arg_error, the message streamed from its arguments.
constexpr auto err = [](auto&&... args) { return detail::arg_error(std::forward<decltype(args)>(args)...); };

using select_detail::ceil_div;

// 3-D with sizes >= 0 (dim 0 may be 0: an empty packed dimension; the others must be >= 1); data may be null only
// when the view holds no element.
Status check_tensor(const Tensor3& t, const char* name, const char* layout) {
  for (int i = 0; i < 3; ++i)
    if (t.size[i] < 0) return err(name, " ", layout, " must have non-negative sizes, got ", shape_str(t.size, 3));
  for (int i = 1; i < 3; ++i)
    if (t.size[i] < 1)
      return err(name, " ", layout, " must have sizes >= 1 in dims 1 and 2, got ", shape_str(t.size, 3));
  if (t.data == nullptr && t.size[0] > 0) return err(name, " must not be null");
  return Status::Ok();
}

Status check_list(const IntList& l, const char* name) {
  if (l.data == nullptr) return err(name, " must be given (a list of prefix sums, one per batch)");
  if (l.size < 1) return err(name, " must have at least one element (B >= 1)");
  if (l.data[0] < 0) return err(name, " must hold non-negative prefix sums, but element 0 is ", l.data[0]);
  for (int64_t i = 1; i < l.size; ++i)
    if (l.data[i] < l.data[i - 1])
      return err(name, " must be non-decreasing prefix sums, but element ", i, " (", l.data[i], ") < element ",
                 i - 1, " (", l.data[i - 1], ")");
  return Status::Ok();
}

}  // namespace

Status validate_select_attention(const SelectAttentionParams& p, SelectAttentionShape* out_shape) {
  Status s;
  if (static_cast<int>(p.dtype) < 0 || static_cast<int>(p.dtype) > 3)
    return err("dtype must be bfloat16, float16, float32 or float64");
  if (!(s = check_tensor(p.query, "query", "[T1, N1, D]")).ok()) return s;
  if (!(s = check_tensor(p.key, "key", "[T2, N2, D]")).ok()) return s;
  if (!(s = check_tensor(p.value, "value", "[T2, N2, Dv]")).ok()) return s;

  SelectAttentionShape sh;
  sh.T1 = p.query.size[0];
  sh.N1 = p.query.size[1];
  sh.D = p.query.size[2];
  sh.T2 = p.key.size[0];
  sh.N2 = p.key.size[1];
  sh.Dv = p.value.size[2];
  if (p.key.size[2] != sh.D)
    return err("key must have the head dim D of query (", sh.D, "), got key.size(2) = ", p.key.size[2]);
  if (p.value.size[0] != sh.T2 || p.value.size[1] != sh.N2)
    return err("value must have the first two dims of key [", sh.T2, ", ", sh.N2, "], got [", p.value.size[0],
               ", ", p.value.size[1], "]");
  if (sh.Dv > sh.D)
    return err("value head dim Dv (", sh.Dv, ") must be <= the head dim D of query and key (", sh.D, ")");
  if (p.head_num != sh.N1)
    return err("head_num must equal the number of query heads query.size(1) = ", sh.N1, ", got ", p.head_num);
  if (sh.N1 % sh.N2 != 0)
    return err("the number of query heads (", sh.N1, ") must be a multiple of the number of key/value heads (",
               sh.N2, ")");
  sh.G = sh.N1 / sh.N2;

  if (p.select_block_size < 1) return err("select_block_size must be >= 1, got ", p.select_block_size);
  if (p.select_block_count < 1) return err("select_block_count must be >= 1, got ", p.select_block_count);
  sh.block = p.select_block_size;
  sh.K = p.select_block_count;
  if (static_cast<int>(p.index_dtype) != 0 && static_cast<int>(p.index_dtype) != 1)
    return err("topk_indices must be int32 or int64 (index_dtype)");
  const Tensor3& ti = p.topk_indices;
  for (int i = 0; i < 3; ++i)
    if (ti.size[i] < 0) return err("topk_indices must have non-negative sizes, got ", shape_str(ti.size, 3));
  if (ti.size[2] != sh.K)
    return err("topk_indices must have select_block_count = ", sh.K, " as its last dimension, got shape ",
               shape_str(ti.size, 3));
  if (ti.size[0] != sh.T1 || ti.size[1] != sh.N2)
    return err("topk_indices must have shape [T1, N2, K] = [", sh.T1, ", ", sh.N2, ", ", sh.K, "], got ",
               shape_str(ti.size, 3));
  if (ti.data == nullptr && sh.T1 > 0) return err("topk_indices must not be null");
  if (!std::isfinite(p.scale_value)) return err("scale_value must be finite, got ", p.scale_value);
  if (!std::isfinite(static_cast<float>(p.scale_value)))
    return err("scale_value must be finite as float32, got ", p.scale_value);

  if (!(s = check_list(p.actual_seq_qlen, "actual_seq_qlen")).ok()) return s;
  if (!(s = check_list(p.actual_seq_kvlen, "actual_seq_kvlen")).ok()) return s;
  sh.B = p.actual_seq_qlen.size;
  if (p.actual_seq_kvlen.size != sh.B)
    return err("actual_seq_kvlen must have as many elements as actual_seq_qlen (", sh.B, "), got ",
               p.actual_seq_kvlen.size);
  if (p.actual_seq_qlen.data[sh.B - 1] != sh.T1)
    return err("actual_seq_qlen[-1] must equal the number of query rows T1 = query.size(0) = ", sh.T1, ", got ",
               p.actual_seq_qlen.data[sh.B - 1]);
  if (p.actual_seq_kvlen.data[sh.B - 1] > sh.T2)
    return err("actual_seq_kvlen[-1] must be <= the number of key rows T2 = key.size(0) = ", sh.T2, ", got ",
               p.actual_seq_kvlen.data[sh.B - 1]);
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
            return err("topk_indices[", t, "][", n2, "][", j, "] = ", x, " is out of range: query row ", t,
                       " belongs to batch ", b, " whose ", skv, " keys form ceil(", skv, " / ", sh.block, ") = ", blocks,
                       " blocks, so an index must be -1 (empty slot) or in [0, ", blocks, ")");
        }
    q_prev = p.actual_seq_qlen.data[b];
    k_prev = p.actual_seq_kvlen.data[b];
  }

  if (sh.T1 > 0) {
    if (p.attention_out == nullptr) return err("attention_out must not be null");
    if (p.softmax_max == nullptr) return err("softmax_max must not be null");
    if (p.softmax_sum == nullptr) return err("softmax_sum must not be null");
  }
  if (out_shape) *out_shape = sh;
  return Status::Ok();
}

namespace {

Status check_like_out(const Tensor3& t, const char* name, const SelectAttentionShape& sh) {
  if (t.size[0] != sh.T1 || t.size[1] != sh.N1 || t.size[2] != sh.Dv)
    return err(name, " must have the shape of attention_out [T1, N1, Dv] = [", sh.T1, ", ", sh.N1, ", ", sh.Dv,
               "], got ", shape_str(t.size, 3));
  if (t.data == nullptr && sh.T1 > 0) return err(name, " must not be null");
  return Status::Ok();
}

Status check_stat(const Tensor3& t, const char* name, const SelectAttentionShape& sh) {
  if (t.size[0] != sh.T1 || t.size[1] != sh.N1 || t.size[2] != 8)
    return err(name, " must be float32 of shape [T1, N1, 8] = [", sh.T1, ", ", sh.N1, ", 8], got ",
               shape_str(t.size, 3));
  if (t.data == nullptr && sh.T1 > 0) return err(name, " must not be null");
  return Status::Ok();
}

}  // namespace

Status validate_select_attention_backward(const SelectAttentionGradParams& p, SelectAttentionShape* out_shape) {
  // The forward's output pointers play no part in the backward (the header says they are ignored), but
  // validate_select_attention requires them: stand-ins that are never dereferenced.
  SelectAttentionParams f = p.fwd;
  static float dummy = 0.0f;
  f.attention_out = &dummy;
  f.softmax_max = &dummy;
  f.softmax_sum = &dummy;
  SelectAttentionShape sh;
  Status s = validate_select_attention(f, &sh);
  if (!s.ok()) return s;
  if (!(s = check_like_out(p.grad, "grad", sh)).ok()) return s;
  if (!(s = check_like_out(p.attention_out, "attention_out", sh)).ok()) return s;
  if (!(s = check_stat(p.softmax_max, "softmax_max", sh)).ok()) return s;
  if (!(s = check_stat(p.softmax_sum, "softmax_sum", sh)).ok()) return s;
  if (p.grad_query == nullptr && sh.T1 > 0) return err("grad_query must not be null");
  if (p.grad_key == nullptr && sh.T2 > 0) return err("grad_key must not be null");
  if (p.grad_value == nullptr && sh.T2 > 0) return err("grad_value must not be null");
  if (out_shape) *out_shape = sh;
  return Status::Ok();
}

}  // namespace nsa
