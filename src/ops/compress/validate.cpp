// Argument rules of docs/spec/compress.md §7. Every failure names the argument and what was expected; no entry
// point writes anything when this fails.
#include <sstream>
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/compress.h"

namespace nsa {

namespace {

using detail::shape_str;
using detail::arg_error;

// l >= 1, d >= 1, d <= l (§7 "Wider than the NPU": any values, no upper bounds).
Status check_block(int64_t l, int64_t d) {
  if (l < 1) return arg_error("compress_block_size must be >= 1, got ", l);
  if (d < 1) return arg_error("compress_stride must be >= 1, got ", d);
  if (d > l) return arg_error("compress_stride (", d, ") must be <= compress_block_size (", l, ")");
  return Status::Ok();
}

// actual_seq_len: given, non-empty, entries >= 0, non-decreasing (§7). Returns R through *rows.
Status check_lengths(const IntList& lens, int64_t l, int64_t d, int64_t* rows) {
  if (lens.data == nullptr)
    return arg_error("actual_seq_len must be given: a list of prefix sums of the batches' lengths, ",
                     "the last equal to T");
  if (lens.size < 1) return arg_error("actual_seq_len must have at least one element");
  int64_t prev = 0, r = 0;
  for (int64_t b = 0; b < lens.size; ++b) {
    const int64_t x = lens.data[b];
    if (x < 0) return arg_error("actual_seq_len[", b, "] must be >= 0, got ", x);
    if (x < prev)
      return arg_error("actual_seq_len must be non-decreasing prefix sums, but element ", b, " (", x, ") < element ",
                       b - 1, " (", prev, ")");
    r += compress_count(x - prev, l, d);  // <= x: no overflow
    prev = x;
  }
  *rows = r;
  return Status::Ok();
}

bool mul_overflows(int64_t a, int64_t b, int64_t c) {
  int64_t ab, abc;
  return __builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc);
}

}  // namespace

Status compress_output_rows(const IntList& actual_seq_len, int64_t compress_block_size, int64_t compress_stride,
                            int64_t* total_rows, int64_t* cu_rows) {
  Status s = check_block(compress_block_size, compress_stride);
  if (!s.ok()) return s;
  int64_t rows = 0;
  if (!(s = check_lengths(actual_seq_len, compress_block_size, compress_stride, &rows)).ok()) return s;
  if (total_rows) *total_rows = rows;
  if (cu_rows) {
    int64_t prev = 0, acc = 0;
    cu_rows[0] = 0;
    for (int64_t b = 0; b < actual_seq_len.size; ++b) {
      acc += compress_count(actual_seq_len.data[b] - prev, compress_block_size, compress_stride);
      prev = actual_seq_len.data[b];
      cu_rows[b + 1] = acc;
    }
  }
  return Status::Ok();
}

Status validate_compress(const CompressParams& p, CompressShape* out_shape) {
  if (static_cast<int>(p.dtype) < 0 || static_cast<int>(p.dtype) > 3)
    return arg_error("dtype must be bfloat16, float16, float32 or float64, got the value ", static_cast<int>(p.dtype));
  CompressShape sh;
  sh.T = p.input.size[0];
  sh.N = p.input.size[1];
  sh.D = p.input.size[2];
  if (sh.T < 0 || sh.N < 1 || sh.D < 1)
    return arg_error("input must be [T, N, D] with T >= 0, N > 0 and D > 0, got shape ", shape_str(p.input.size, 3));
  if (mul_overflows(sh.T, sh.N, sh.D))
    return arg_error("input is too large: T*N*D overflows int64, shape ", shape_str(p.input.size, 3));
  if (p.input.data == nullptr && sh.T > 0) return arg_error("input must not be null");
  Status s = check_block(p.compress_block_size, p.compress_stride);
  if (!s.ok()) return s;
  sh.l = p.compress_block_size;
  sh.d = p.compress_stride;
  if (p.weight.size[0] != sh.l || p.weight.size[1] != sh.N)
    return arg_error("weight must have shape [compress_block_size, N] = [", sh.l, ", ", sh.N,
                     "] (N = input.size(1)), got ", shape_str(p.weight.size, 2));
  if (p.weight.data == nullptr) return arg_error("weight must not be null");
  if (!(s = check_lengths(p.actual_seq_len, sh.l, sh.d, &sh.R)).ok()) return s;
  sh.B = p.actual_seq_len.size;
  if (p.actual_seq_len.data[sh.B - 1] != sh.T)
    return arg_error("actual_seq_len[-1] must equal the number of input rows T = input.size(0) = ", sh.T, ", got ",
                     p.actual_seq_len.data[sh.B - 1]);
  if (p.output == nullptr && sh.R > 0) return arg_error("output must not be null (", sh.R, " output rows)");
  return detail::publish_shape(Status::Ok(), sh, out_shape);
}

Status validate_compress_backward(const CompressGradParams& p, CompressShape* out_shape) {
  // The forward's rules, without its output (not used by the backward).
  const auto own_rules = [&](const CompressShape& sh) -> Status {
    if (p.grad.size[0] != sh.R || p.grad.size[1] != sh.N || p.grad.size[2] != sh.D)
      return arg_error("grad must have the output's shape [R, N, D] = [", sh.R, ", ", sh.N, ", ", sh.D,
                       "] (R from actual_seq_len, compress_block_size and compress_stride), got ",
                       shape_str(p.grad.size, 3));
    if (p.grad.data == nullptr && sh.R > 0) return arg_error("grad must not be null");
    if (p.input_grad == nullptr && sh.T > 0) return arg_error("input_grad must not be null");
    if (p.weight_grad == nullptr) return arg_error("weight_grad must not be null");
    return Status::Ok();
  };
  return detail::validate_backward(p.fwd, validate_compress, out_shape, own_rules, &CompressParams::output);
}

}  // namespace nsa
