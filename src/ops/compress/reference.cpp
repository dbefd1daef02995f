// Reference backend of the compression operator: docs/spec/compress.md line by line, plain loops, one thread.
// The tests' oracle. Acc is the arithmetic type of every "fp32" quantity of the contract: float for bf16, fp16
// and fp32 inputs (the contract literally), double for fp64 inputs (§4: "fp64 inputs: everything in fp64")
// and for the fp64 model (compress_ref::forward_model / backward_model).
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
#include "common/rounding.h"
#include "ops/compress/batches.h"
#include "ops/compress/reference.h"

namespace nsa {
namespace {

using compress_detail::Batch;

// For every (n, j): the sum of the products f32(weight[w, n]) * f32(x[row, n, j]) (§4: "both operands are widened
// to fp32 exactly") over the pairs (w, row) that pairs(add) passes to add, in that order; emit(n, j, sum).
template <typename Acc, typename Pairs, typename Emit>
void weighted_rows(const CompressParams& p, const CompressShape& sh, const Tensor3& x, Pairs&& pairs, Emit&& emit) {
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t j = 0; j < sh.D; ++j) {
      ref::TermSum<Acc> sum;
      pairs([&](int64_t w, int64_t row) {
        sum.add(ref::load2_at<Acc>(p.weight, w, n, p.dtype) * detail::load_at<Acc>(x, row, n, j, p.dtype));
      });
      emit(n, j, sum);
    }
  }
}

// §4 for every (b, c, n, j); emit(row, n, j, sum) receives each sum before its rounding.
template <typename Acc, typename Emit>
void forward_loops(const CompressParams& p, const CompressShape& sh, Emit&& emit) {
  // §2: batch b owns rows [start_b, start_b + S_b); §3: C_b windows, output rows from R_b.
  for (const Batch& bt : compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d)) {
    for (int64_t c = 0; c < bt.C; ++c) {
      // §4: acc = sum_{w < l} f32(weight[w, n]) * f32(input[start_b + c*d + w, n, j]), in order w = 0, 1, ...
      const auto window = [&](auto&& add) {
        for (int64_t w = 0; w < sh.l; ++w) add(w, bt.start + c * sh.d + w);
      };
      weighted_rows<Acc>(p, sh, p.input, window, [&](int64_t n, int64_t j, const ref::TermSum<Acc>& sum) {
        emit(bt.row_begin + c, n, j, sum);  // §3: output row R_b + c
      });
    }
  }
}

// §6 input gradient for every input row; emit(t, n, j, sum) receives each sum (0 with no terms).
template <typename Acc, typename Emit>
void input_grad_loops(const CompressGradParams& g, const CompressShape& sh, Emit&& emit) {
  const CompressParams& p = g.fwd;
  for (const Batch& bt : compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d)) {
    for (int64_t pos = 0; pos < bt.S; ++pos) {
      // sum over the windows c < C_b with 0 <= w = pos - c*d < l of f32(weight[w, n]) * f32(grad[R_b + c, n, j]), by
      // increasing c (§5: at most ceil(l/d) terms; none for a batch's tail or a short batch, §5)
      const auto covering = [&](auto&& add) {
        for (int64_t c = 0; c < bt.C; ++c) {
          const int64_t w = pos - c * sh.d;
          if (w >= 0 && w < sh.l) add(w, bt.row_begin + c);
        }
      };
      weighted_rows<Acc>(p, sh, g.grad, covering, [&](int64_t n, int64_t j, const ref::TermSum<Acc>& sum) {
        emit(bt.start + pos, n, j, sum);
      });
    }
  }
}

// §6 weight gradient; emit(w, n, sum).
template <typename Acc, typename Emit>
void weight_grad_loops(const CompressGradParams& g, const CompressShape& sh, Emit&& emit) {
  const CompressParams& p = g.fwd;
  const DType dt = p.dtype;
  const std::vector<Batch> batches = compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d);
  for (int64_t w = 0; w < sh.l; ++w) {
    for (int64_t n = 0; n < sh.N; ++n) {
      // acc = sum_b sum_{c < C_b} sum_{j < D} f32(grad[R_b + c, n, j]) * f32(input[start_b + c*d + w, n, j])
      ref::TermSum<Acc> sum;
      for (const Batch& bt : batches) {
        for (int64_t c = 0; c < bt.C; ++c) {
          for (int64_t j = 0; j < sh.D; ++j) {
            sum.add(detail::load_at<Acc>(g.grad, bt.row_begin + c, n, j, dt) *
                    detail::load_at<Acc>(p.input, bt.start + c * sh.d + w, n, j, dt));
          }
        }
      }
      emit(w, n, sum);
    }
  }
}

// Element i of the fp64 model: the sum and the sum of the absolute values of its terms.
void record(std::vector<double>* value, std::vector<double>* abs_sum, int64_t i, const ref::TermSum<double>& sum) {
  (*value)[static_cast<size_t>(i)] = sum.value;
  (*abs_sum)[static_cast<size_t>(i)] = sum.abs;
}

}  // namespace

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress>::run(const Params& p, const Shape& sh, DType dt) {
  forward_loops<Acc>(p, sh, [&](int64_t r, int64_t n, int64_t j, const ref::TermSum<Acc>& sum) {
    detail::store_rha(p.output, (r * sh.N + n) * sh.D + j, sum.value, dt);  // §4: output = rha_T(acc)
  });
}

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress_backward>::run(const Params& g, const Shape& sh, DType dt) {
  // §6: both gradients rounded to nearest even; input_grad has no rows outside the batches (§7: last == T).
  input_grad_loops<Acc>(g, sh, [&](int64_t t, int64_t n, int64_t j, const ref::TermSum<Acc>& sum) {
    detail::store_f64(g.input_grad, (t * sh.N + n) * sh.D + j, sum.value, dt);
  });
  weight_grad_loops<Acc>(g, sh, [&](int64_t w, int64_t n, const ref::TermSum<Acc>& sum) {
    detail::store_f64(g.weight_grad, w * sh.N + n, sum.value, dt);
  });
}

template struct detail::ReferenceEntry<validate_compress>;
template struct detail::ReferenceEntry<validate_compress_backward>;

Status compress_reference(const CompressParams& p) { return detail::ReferenceEntry<validate_compress>::for_dtype(p); }

Status compress_backward_reference(const CompressGradParams& p) {
  return detail::ReferenceEntry<validate_compress_backward>::for_dtype(p);
}

namespace compress_ref {

Status forward_model(const CompressParams& p, std::vector<double>* value, std::vector<double>* abs_sum) {
  CompressShape sh;
  const Status st = validate_compress(p, &sh);
  if (!st.ok()) return st;
  value->assign(static_cast<size_t>(sh.R * sh.N * sh.D), 0.0);
  abs_sum->assign(value->size(), 0.0);
  forward_loops<double>(p, sh, [&](int64_t r, int64_t n, int64_t j, const ref::TermSum<double>& sum) {
    record(value, abs_sum, (r * sh.N + n) * sh.D + j, sum);
  });
  return Status::Ok();
}

Status backward_model(const CompressGradParams& g, std::vector<double>* input_grad, std::vector<double>* input_grad_abs,
                      std::vector<double>* weight_grad, std::vector<double>* weight_grad_abs) {
  CompressShape sh;
  const Status st = validate_compress_backward(g, &sh);
  if (!st.ok()) return st;
  input_grad->assign(static_cast<size_t>(sh.T * sh.N * sh.D), 0.0);
  input_grad_abs->assign(input_grad->size(), 0.0);
  weight_grad->assign(static_cast<size_t>(sh.l * sh.N), 0.0);
  weight_grad_abs->assign(weight_grad->size(), 0.0);
  input_grad_loops<double>(g, sh, [&](int64_t t, int64_t n, int64_t j, const ref::TermSum<double>& sum) {
    record(input_grad, input_grad_abs, (t * sh.N + n) * sh.D + j, sum);
  });
  weight_grad_loops<double>(g, sh, [&](int64_t w, int64_t n, const ref::TermSum<double>& sum) {
    record(weight_grad, weight_grad_abs, w * sh.N + n, sum);
  });
  return Status::Ok();
}

}  // namespace compress_ref
}  // namespace nsa
