// Building blocks of the operators' argument checks (internal): every failure is a Status whose message names the
// argument and says what was expected.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "nsa/common.h"

namespace nsa::detail {

// An error whose message is the arguments streamed one after the other.
template <typename... Args>
Status arg_error(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return Status::Error(os.str());
}

// "[s0, s1, ...]" of n sizes.
inline std::string shape_str(const int64_t* s, int n) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < n; ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

// The first null pointer of a list of (pointer, argument name) pairs as "<name> must not be null".
inline Status check_not_null(std::initializer_list<std::pair<const void*, const char*>> args) {
  for (const auto& [ptr, name] : args)
    if (ptr == nullptr) return arg_error(name, " must not be null");
  return Status::Ok();
}

// The element type of an operator's floating-point arguments: one of the four DType values.
inline Status check_dtype(DType dtype) {
  if (static_cast<int>(dtype) < 0 || static_cast<int>(dtype) > 3)
    return arg_error("dtype must be bfloat16, float16, float32 or float64");
  return Status::Ok();
}

// A softmax scale (unitless factor of the scores) that is finite in float64 and still finite once rounded to
// float32 (the kernels multiply fp32 scores by it).
inline Status check_finite_scale(double scale, const char* name) {
  if (!std::isfinite(scale)) return arg_error(name, " must be finite, got ", scale);
  if (!std::isfinite(static_cast<float>(scale))) return arg_error(name, " must be finite as float32, got ", scale);
  return Status::Ok();
}

// "<name> must <what> = [s0, s1, s2], got [t0, t1, t2]" unless the 3-D view t has exactly those sizes;
// `what` states the layout, e.g. "have the shape of attention_out [T1, N1, Dv]".
inline Status check_sizes3(const Tensor3& t, const char* name, const char* what, int64_t s0, int64_t s1, int64_t s2) {
  if (t.size[0] != s0 || t.size[1] != s1 || t.size[2] != s2)
    return arg_error(name, " must ", what, " = [", s0, ", ", s1, ", ", s2, "], got ", shape_str(t.size, 3));
  return Status::Ok();
}

// Sizes of the dense (packed TND) attention inputs query [T1, N1, D], key [T2, N2, D], value [T2, N2, Dv], and the
// group size G = N1 / N2 (query heads per key/value head).
struct QkvSizes {
  int64_t T1 = 0, N1 = 0, D = 0, T2 = 0, N2 = 0, Dv = 0, G = 0;

  // An operator's shape with these seven sizes as its first fields (the public *Shape structs all begin with
  // T1 (or T), N1, D, T2, N2, Dv (or D2), G, in this order), the other fields zero.
  template <typename Shape>
  Shape as_shape() const {
    static_assert(sizeof(Shape) >= 7 * sizeof(int64_t), "an attention shape begins with seven int64_t sizes");
    return Shape{T1, N1, D, T2, N2, Dv, G};
  }
};

// How an operator words and bounds the views of its dense attention inputs.
struct QkvRules {
  const char* dv = "Dv";        // the value head dim's name in the messages ("Dv", "D2")
  bool layout_named = true;     // the messages name the layout after the view: "query [T1, N1, D] must ..."
  bool empty_rows = false;      // T1 = 0 / T2 = 0 allowed (data may then be null); else every size >= 1, data given
};

// One view [rows, heads, dim] of a dense attention call under `rules` (`layout` follows the name in the messages
// when rules.layout_named).
inline Status check_qkv_view(const Tensor3& t, const char* name, const std::string& layout, const QkvRules& rules) {
  const std::string who = rules.layout_named ? name + (" " + layout) : std::string(name);
  if (rules.empty_rows) {
    for (int i = 0; i < 3; ++i)
      if (t.size[i] < 0) return arg_error(who, " must have non-negative sizes, got ", shape_str(t.size, 3));
    for (int i = 1; i < 3; ++i)
      if (t.size[i] < 1) return arg_error(who, " must have sizes >= 1 in dims 1 and 2, got ", shape_str(t.size, 3));
    if (t.data == nullptr && t.size[0] > 0) return arg_error(name, " must not be null");
    return Status::Ok();
  }
  if (t.data == nullptr) return arg_error(name, " must not be null");
  for (int i = 0; i < 3; ++i)
    if (t.size[i] <= 0) return arg_error(who, " must not be empty: got shape ", shape_str(t.size, 3));
  return Status::Ok();
}

// The element type and the views of a dense attention call, each checked under `rules`, then their agreements with
// each other and head_num: key has query's head dim D, value has key's rows and heads [T2, N2], Dv <= D,
// head_num = N1, and N1 is a multiple of N2. `p` is an operator's params struct with the fields dtype, query, key,
// value and head_num, `Shape` its shape struct (QkvSizes::as_shape). On success *out holds the seven sizes, its other
// fields zero.
template <typename Params, typename Shape>
Status check_qkv(const Params& p, const QkvRules& rules, Shape* out) {
  const Tensor3 &query = p.query, &key = p.key, &value = p.value;
  const int64_t head_num = p.head_num;
  Status st = check_dtype(p.dtype);
  if (st.ok()) st = check_qkv_view(query, "query", "[T1, N1, D]", rules);
  if (st.ok()) st = check_qkv_view(key, "key", "[T2, N2, D]", rules);
  if (st.ok()) st = check_qkv_view(value, "value", std::string("[T2, N2, ") + rules.dv + "]", rules);
  if (!st.ok()) return st;
  const char* dv = rules.dv;
  QkvSizes s{query.size[0], query.size[1], query.size[2], key.size[0], key.size[1], value.size[2]};
  if (key.size[2] != s.D)
    return arg_error("key must have the head dim D of query (", s.D, "), got key.size(2) = ", key.size[2]);
  if (value.size[0] != s.T2 || value.size[1] != s.N2)
    return arg_error("value must have the first two dims of key [", s.T2, ", ", s.N2, "], got [", value.size[0], ", ",
                     value.size[1], "]");
  if (s.Dv > s.D)
    return arg_error("value head dim ", dv, " (", s.Dv, ") must be <= the head dim D of query and key (", s.D, ")");
  if (head_num != s.N1)
    return arg_error("head_num must equal the number of query heads query.size(1) = ", s.N1, ", got ", head_num);
  if (s.N1 % s.N2 != 0)
    return arg_error("the number of query heads (", s.N1, ") must be a multiple of the number of key/value heads (",
                     s.N2, ")");
  s.G = s.N1 / s.N2;
  *out = s.as_shape<Shape>();
  return Status::Ok();
}

// An operator's rule for its prefix-sum lists: which entries are checked, and the words of the messages (each
// follows the list's name).
struct PrefixSumRules {
  bool trailing_zeros;     // only the entries up to the last non-zero one are checked (the zeros are empty batches)
  const char* missing;     // the list is absent, e.g. " must be given (a list of prefix sums, one per batch)"
  const char* empty;       // it has no entry, e.g. " must have at least one element"
  const char* negative;    // before the first entry's value, e.g. " must start at a value >= 0, got "
  const char* decreasing;  // before "i (x_i) < element i-1 (x_{i-1})": " must be non-decreasing ..., but element "
};

// Index of the last non-zero entry of a prefix-sum list (-1 when every entry is 0): under the trailing-zeros
// convention the entries after it are empty batches.
inline int64_t last_nonzero(const IntList& l) {
  int64_t last = -1;
  for (int64_t b = 0; b < l.size; ++b)
    if (l.data[b] != 0) last = b;
  return last;
}

// A per-batch list of prefix sums (token offsets): given, B >= 1 entries, non-decreasing from a value >= 0, under
// the operator's rules `w`.
inline Status check_prefix_sums(const IntList& l, const char* name, const PrefixSumRules& w) {
  if (l.data == nullptr) return arg_error(name, w.missing);
  if (l.size < 1) return arg_error(name, w.empty);
  const int64_t end = w.trailing_zeros ? last_nonzero(l) + 1 : l.size;  // the entries [0, end) are checked
  if (end > 0 && l.data[0] < 0) return arg_error(name, w.negative, l.data[0]);
  for (int64_t i = 1; i < end; ++i)
    if (l.data[i] < l.data[i - 1])
      return arg_error(name, w.decreasing, i, " (", l.data[i], ") < element ", i - 1, " (", l.data[i - 1], ")");
  return Status::Ok();
}

// A per-batch list of the same batch count B as actual_seq_qlen.
inline Status check_batch_count(const IntList& list, const char* name, int64_t B) {
  if (list.size != B)
    return arg_error(name, " must have as many elements as actual_seq_qlen (", B, "), got ", list.size);
  return Status::Ok();
}

// How a varlen attention operator names its key/value list and its row counts in the messages of check_seq_lists.
struct SeqListWords {
  const char* kv_name;   // the key/value list, e.g. "actual_seq_kvlen"
  const char* t1_rows;   // the query rows, e.g. "T1 = query.size(0)"
  const char* t2_rows;   // the key rows, e.g. "T2 = key.size(0)"
};

// The two prefix-sum lists of a varlen attention call, actual_seq_qlen and the key/value list, each under `rules`,
// with the same batch count B (*B): the query list ends at exactly T1 rows, the key/value list at most at T2 rows.
// A list's end is its last entry, or with rules.trailing_zeros its last non-zero one (0 when every entry is 0);
// the messages name it "actual_seq_qlen[-1]", or "max(actual_seq_qlen)" under trailing zeros.
inline Status check_seq_lists(const IntList& q, const IntList& kv, int64_t T1, int64_t T2, const SeqListWords& words,
                              const PrefixSumRules& rules, int64_t* B) {
  Status s = check_prefix_sums(q, "actual_seq_qlen", rules);
  if (s.ok()) s = check_prefix_sums(kv, words.kv_name, rules);
  if (s.ok()) s = check_batch_count(kv, words.kv_name, q.size);
  if (!s.ok()) return s;
  auto list_end = [&](const IntList& l) {
    const int64_t last = rules.trailing_zeros ? last_nonzero(l) : l.size - 1;
    return last >= 0 ? l.data[last] : int64_t(0);
  };
  auto end_name = [&](const char* name) {
    return rules.trailing_zeros ? "max(" + std::string(name) + ")" : name + std::string("[-1]");
  };
  const int64_t q_end = list_end(q), kv_end = list_end(kv);
  if (q_end != T1)
    return arg_error(end_name("actual_seq_qlen"), " must equal the number of query rows ", words.t1_rows, " = ", T1,
                     ", got ", q_end);
  if (kv_end > T2)
    return arg_error(end_name(words.kv_name), " must be <= the number of key rows ", words.t2_rows, " = ", T2,
                     ", got ", kv_end);
  *B = q.size;
  return Status::Ok();
}

// The last step of every validator: on success *out (may be null) receives the shape; on failure it is untouched
// (nothing is written on error).
template <typename Shape>
Status publish_shape(Status s, const Shape& sh, Shape* out) {
  if (s.ok() && out) *out = sh;
  return s;
}

// A backward's argument rules: first the forward's, `validate` (the forward's validate_<op>) run on a copy of the
// forward params `fwd` whose output pointers (the members `outputs`) point at a placeholder -- a backward reads the
// forward's inputs only (its own arguments say where the forward's results are), but the forward's rules require
// the output pointers to be set; the placeholder is never dereferenced -- then own(shape), the backward's rules on
// its own arguments. On success *out (may be null) receives the shape; on failure it is untouched.
template <typename Params, typename Shape, typename OwnRules, typename... Ptr>
Status validate_backward(Params fwd, Status (*validate)(const Params&, Shape*), Shape* out, OwnRules&& own,
                         Ptr Params::*... outputs) {
  alignas(std::max_align_t) static unsigned char placeholder[sizeof(std::max_align_t)];
  ((fwd.*outputs = static_cast<Ptr>(static_cast<void*>(placeholder))), ...);
  Shape sh;
  Status s = validate(fwd, &sh);
  if (s.ok()) s = own(static_cast<const Shape&>(sh));
  return publish_shape(s, sh, out);
}

// ceil(a / b) for a >= 0, b > 0 without overflow ((a + b - 1) / b overflows for a near INT64_MAX, reachable with
// stride-0 views).
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace nsa::detail
