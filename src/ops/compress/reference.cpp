// Reference backend of the compression operator: docs/spec/compress.md line by line, plain loops, one thread.
// The tests' oracle. Acc is the arithmetic type of every "fp32" quantity of the contract: float for bf16, fp16
// and fp32 inputs (the contract literally), double for fp64 inputs (§4: "fp64 inputs: everything in fp64")
// and for the fp64 model (compress_ref::forward_model / backward_model).
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/numeric.h"
#include "ops/compress/batches.h"
#include "ops/compress/reference.h"
#include "ops/compress/rounding.h"

namespace nsa {
namespace {

using compress_detail::Batch;

// Element (i, j, k) of a strided 3-D view, widened exactly to Acc (§4: "both operands are widened to fp32
// exactly").
template <typename Acc>
Acc load3(const Tensor3& t, int64_t i, int64_t j, int64_t k, DType dt) {
  const int64_t off = i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(t.data, off, dt);
  else return detail::load_f32(t.data, off, dt);
}

template <typename Acc>
Acc load2(const Tensor2& t, int64_t i, int64_t j, DType dt) {
  const int64_t off = i * t.stride[0] + j * t.stride[1];
  if constexpr (std::is_same_v<Acc, double>) return detail::load_f64(t.data, off, dt);
  else return detail::load_f32(t.data, off, dt);
}

// rha_T(acc) into element i of a contiguous output (§4 final rounding; fp32 / fp64: no rounding).
template <typename Acc>
void store_rha(void* out, int64_t i, Acc acc, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(out)[i] = compress_detail::f32_to_bf16_rha(static_cast<float>(acc)); break;
    case DType::kF16: static_cast<uint16_t*>(out)[i] = compress_detail::f32_to_f16_rha(static_cast<float>(acc)); break;
    case DType::kF32: static_cast<float*>(out)[i] = static_cast<float>(acc); break;
    case DType::kF64: static_cast<double*>(out)[i] = static_cast<double>(acc); break;
  }
}

// rne_T(acc) (§6 output rounding).
template <typename Acc>
void store_rne(void* out, int64_t i, Acc acc, DType dt) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(out)[i] = compress_detail::f32_to_bf16_rne(static_cast<float>(acc)); break;
    case DType::kF16: static_cast<uint16_t*>(out)[i] = compress_detail::f32_to_f16_rne(static_cast<float>(acc)); break;
    case DType::kF32: static_cast<float*>(out)[i] = static_cast<float>(acc); break;
    case DType::kF64: static_cast<double*>(out)[i] = static_cast<double>(acc); break;
  }
}

// §4 for every (b, c, n, j); emit(row, n, j, acc, abs_sum) receives each sum before its rounding.
template <typename Acc, typename Emit>
void forward_loops(const CompressParams& p, const CompressShape& sh, Emit&& emit) {
  const DType dt = p.dtype;
  // §2: batch b owns rows [start_b, start_b + S_b); §3: C_b windows, output rows from R_b.
  for (const Batch& bt : compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d)) {
    for (int64_t c = 0; c < bt.C; ++c) {
      for (int64_t n = 0; n < sh.N; ++n) {
        for (int64_t j = 0; j < sh.D; ++j) {
          // §4: acc = sum_{w < l} f32(weight[w, n]) * f32(input[start_b + c*d + w, n, j]), in order w = 0, 1, ...
          Acc acc = 0, abs_sum = 0;
          for (int64_t w = 0; w < sh.l; ++w) {
            const Acc term = load2<Acc>(p.weight, w, n, dt) * load3<Acc>(p.input, bt.start + c * sh.d + w, n, j, dt);
            acc += term;
            abs_sum += std::fabs(term);
          }
          emit(bt.row_begin + c, n, j, acc, abs_sum);  // §3: output row R_b + c
        }
      }
    }
  }
}

// §6 input gradient for every input row; emit(t, n, j, acc, abs_sum) receives each sum (0 with no terms).
template <typename Acc, typename Emit>
void input_grad_loops(const CompressGradParams& g, const CompressShape& sh, Emit&& emit) {
  const CompressParams& p = g.fwd;
  const DType dt = p.dtype;
  for (const Batch& bt : compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d)) {
    for (int64_t pos = 0; pos < bt.S; ++pos) {
      for (int64_t n = 0; n < sh.N; ++n) {
        for (int64_t j = 0; j < sh.D; ++j) {
          // sum over the windows c < C_b with 0 <= pos - c*d < l, by increasing c (§5: at most ceil(l/d) terms;
          // none for a batch's tail or a short batch, §5)
          Acc acc = 0, abs_sum = 0;
          for (int64_t c = 0; c < bt.C; ++c) {
            const int64_t w = pos - c * sh.d;
            if (w < 0 || w >= sh.l) continue;
            const Acc term = load2<Acc>(p.weight, w, n, dt) * load3<Acc>(g.grad, bt.row_begin + c, n, j, dt);
            acc += term;
            abs_sum += std::fabs(term);
          }
          emit(bt.start + pos, n, j, acc, abs_sum);
        }
      }
    }
  }
}

// §6 weight gradient; emit(w, n, acc, abs_sum).
template <typename Acc, typename Emit>
void weight_grad_loops(const CompressGradParams& g, const CompressShape& sh, Emit&& emit) {
  const CompressParams& p = g.fwd;
  const DType dt = p.dtype;
  const std::vector<Batch> batches = compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d);
  for (int64_t w = 0; w < sh.l; ++w) {
    for (int64_t n = 0; n < sh.N; ++n) {
      // acc = sum_b sum_{c < C_b} sum_{j < D} f32(grad[R_b + c, n, j]) * f32(input[start_b + c*d + w, n, j])
      Acc acc = 0, abs_sum = 0;
      for (const Batch& bt : batches) {
        for (int64_t c = 0; c < bt.C; ++c) {
          for (int64_t j = 0; j < sh.D; ++j) {
            const Acc term = load3<Acc>(g.grad, bt.row_begin + c, n, j, dt) *
                             load3<Acc>(p.input, bt.start + c * sh.d + w, n, j, dt);
            acc += term;
            abs_sum += std::fabs(term);
          }
        }
      }
      emit(w, n, acc, abs_sum);
    }
  }
}

template <typename Acc>
Status forward_reference(const CompressParams& p) {
  CompressShape sh;
  const Status st = validate_compress(p, &sh);
  if (!st.ok()) return st;
  forward_loops<Acc>(p, sh, [&](int64_t r, int64_t n, int64_t j, Acc acc, Acc) {
    store_rha(p.output, (r * sh.N + n) * sh.D + j, acc, p.dtype);  // §4: output = rha_T(acc)
  });
  return Status::Ok();
}

template <typename Acc>
Status backward_reference(const CompressGradParams& g) {
  CompressShape sh;
  const Status st = validate_compress_backward(g, &sh);
  if (!st.ok()) return st;
  const DType dt = g.fwd.dtype;
  // §6: both gradients rounded to nearest even; input_grad has no rows outside the batches (§7: last == T).
  input_grad_loops<Acc>(g, sh, [&](int64_t t, int64_t n, int64_t j, Acc acc, Acc) {
    store_rne(g.input_grad, (t * sh.N + n) * sh.D + j, acc, dt);
  });
  weight_grad_loops<Acc>(g, sh, [&](int64_t w, int64_t n, Acc acc, Acc) { store_rne(g.weight_grad, w * sh.N + n, acc, dt); });
  return Status::Ok();
}

}  // namespace

Status compress_reference(const CompressParams& p) {
  if (p.dtype == DType::kF64) return forward_reference<double>(p);
  return forward_reference<float>(p);
}

Status compress_backward_reference(const CompressGradParams& p) {
  if (p.fwd.dtype == DType::kF64) return backward_reference<double>(p);
  return backward_reference<float>(p);
}

namespace compress_ref {

Status forward_model(const CompressParams& p, std::vector<double>* value, std::vector<double>* abs_sum) {
  CompressShape sh;
  const Status st = validate_compress(p, &sh);
  if (!st.ok()) return st;
  value->assign(static_cast<size_t>(sh.R * sh.N * sh.D), 0.0);
  abs_sum->assign(value->size(), 0.0);
  forward_loops<double>(p, sh, [&](int64_t r, int64_t n, int64_t j, double acc, double a) {
    const size_t i = static_cast<size_t>((r * sh.N + n) * sh.D + j);
    (*value)[i] = acc;
    (*abs_sum)[i] = a;
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
  input_grad_loops<double>(g, sh, [&](int64_t t, int64_t n, int64_t j, double acc, double a) {
    const size_t i = static_cast<size_t>((t * sh.N + n) * sh.D + j);
    (*input_grad)[i] = acc;
    (*input_grad_abs)[i] = a;
  });
  weight_grad_loops<double>(g, sh, [&](int64_t w, int64_t n, double acc, double a) {
    const size_t i = static_cast<size_t>(w * sh.N + n);
    (*weight_grad)[i] = acc;
    (*weight_grad_abs)[i] = a;
  });
  return Status::Ok();
}

}  // namespace compress_ref
}  // namespace nsa
