// torch.ops.nsa.compress (torch_npu.npu_nsa_compress, docs/spec/compress.md) and its backward
// torch.ops.nsa.compress_backward (torch_npu.npu_nsa_compress_grad): the schemas and the CPU and Meta kernels, as
// thin adapters from tensors to the torch-free library (nsa/compress.h).
//
// compress: the arguments, order and defaults of torch_npu (§1): (input, weight, compress_block_size,
// compress_stride, actual_seq_len=None) -> output [R, N, D]. Overload .tensor_lengths takes actual_seq_len as a
// 1-D integer CPU tensor: under torch.compile new lengths are then new tensor values, not new constants (no
// recompilation per batch composition). compress_reference: the same schema computed by the library's plain-loop
// reference (the contract in code, slow): the oracle for tests. compress_backward (§6): (grad, input, weight, l,
// d, actual_seq_len) -> (input_grad, weight_grad), with the same two overloads, and compress_backward_reference.
//
// Meta kernels (shapes and dtypes only; the fake kernels of torch.compile): the output has R = sum_b C_b rows
// (§3), which depends on the lengths' values. The int[] overload computes R from the list. The .tensor_lengths
// overload's R is data-dependent: its fake kernel is registered in Python (python/nsa_ops/ops/compress.py) with
// an unbacked size (ctx.new_dynamic_size()), so no Meta kernel is registered for it here. The backward's outputs
// have the shapes of input and weight: Meta kernels for both overloads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding.h"
#include "nsa/compress.h"
#include "output_cache.h"

#define NSA_COMPRESS_ARGS(LENGTHS) \
  "(Tensor input, Tensor weight, int compress_block_size, int compress_stride, " LENGTHS " actual_seq_len=None) -> Tensor"

#define NSA_COMPRESS_BACKWARD_ARGS(LENGTHS)                                                          \
  "(Tensor grad, Tensor input, Tensor weight, int compress_block_size, int compress_stride, " LENGTHS \
  " actual_seq_len=None) -> (Tensor input_grad, Tensor weight_grad)"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("compress" NSA_COMPRESS_ARGS("int[]?"));
  m.def("compress.tensor_lengths" NSA_COMPRESS_ARGS("Tensor?"));
  m.def("compress_reference" NSA_COMPRESS_ARGS("int[]?"));
  m.def("compress_backward" NSA_COMPRESS_BACKWARD_ARGS("int[]?"));
  m.def("compress_backward.tensor_lengths" NSA_COMPRESS_BACKWARD_ARGS("Tensor?"));
  m.def("compress_backward_reference" NSA_COMPRESS_BACKWARD_ARGS("int[]?"));
}

namespace nsa_torch {
namespace {

using CompressGrads = std::tuple<at::Tensor, at::Tensor>;

// ------------------------------------------------------------------ checks shared by every kernel
// Rank, dtype and (where the sizes are concrete) the weight's shape; the library checks §7 in full once the
// lengths are known.
void check_compress_inputs(const at::Tensor& input, const at::Tensor& weight, int64_t compress_block_size) {
  TORCH_CHECK(input.defined(), "input must be a tensor, got None");
  TORCH_CHECK(weight.defined(), "weight must be a tensor, got None");
  TORCH_CHECK(input.dim() == 3, "input must be a 3-D tensor [T, N, D], got a ", input.dim(), "-D tensor of shape ",
              input.sym_sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be a 2-D tensor [compress_block_size, N], got a ", weight.dim(),
              "-D tensor of shape ", weight.sym_sizes());
  to_nsa_dtype(input.scalar_type(), "input");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight must have the dtype of input (",
              input.scalar_type(), "), got ", weight.scalar_type());
  const auto l = weight.sym_size(0).maybe_as_int(), wn = weight.sym_size(1).maybe_as_int(),
             n = input.sym_size(1).maybe_as_int();
  if (compress_block_size < 1) return;  // the library names compress_block_size itself
  if (l) {
    TORCH_CHECK(*l == compress_block_size, "weight must have shape [compress_block_size, N] = [", compress_block_size,
                ", N], got ", weight.sym_sizes());
  }
  if (wn && n) {
    TORCH_CHECK(*wn == *n, "weight must have shape [compress_block_size, N] with N = input.size(1) = ", *n, ", got ",
                weight.sym_sizes());
  }
}

void check_grad_input(const at::Tensor& grad, const at::Tensor& input) {
  TORCH_CHECK(grad.defined(), "grad must be a tensor, got None");
  TORCH_CHECK(grad.dim() == 3, "grad must be a 3-D tensor [R, N, D] (the shape of the forward's output), got a ",
              grad.dim(), "-D tensor of shape ", grad.sym_sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "grad must have the dtype of input (", input.scalar_type(),
              "), got ", grad.scalar_type());
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor like the others, got ", t.device());
}

nsa::IntList int_list(OptIntList l) {
  nsa::IntList out;
  if (!l.has_value()) return out;
  static const int64_t kEmpty = 0;  // an empty list keeps a non-null pointer: "at least one element"
  out.data = l->empty() ? &kEmpty : l->data();
  out.size = static_cast<int64_t>(l->size());
  return out;
}

// A tensor as the library's 2-D view.
nsa::Tensor2 view2(const at::Tensor& t) {
  nsa::Tensor2 v;
  v.data = t.const_data_ptr();
  for (int i = 0; i < 2; ++i) {
    v.size[i] = t.size(i);
    v.stride[i] = t.stride(i);
  }
  return v;
}

nsa::CompressParams make_params(const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d,
                                OptIntList lens) {
  nsa::CompressParams p;
  p.dtype = to_nsa_dtype(input.scalar_type(), "input");
  p.input = view3(input);
  p.weight = view2(weight);
  p.compress_block_size = l;
  p.compress_stride = d;
  p.actual_seq_len = int_list(lens);
  return p;
}

// ------------------------------------------------------------------ CPU forward
using ForwardBackend = nsa::Status (*)(const nsa::CompressParams&, const nsa::CpuOptions&);

nsa::Status reference_forward(const nsa::CompressParams& p, const nsa::CpuOptions&) { return nsa::compress_reference(p); }

at::Tensor forward_cpu(ForwardBackend backend, const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d,
                       OptIntList lens) {
  check_compress_inputs(input, weight, l);
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  nsa::CompressParams p = make_params(input, weight, l, d, lens);
  // §7 in full before anything is allocated (the output is not there yet: a placeholder, never written)
  static unsigned char placeholder;
  p.output = &placeholder;
  nsa::CompressShape sh;
  nsa::Status st = nsa::validate_compress(p, &sh);
  TORCH_CHECK(st.ok(), st.message());
  at::Tensor out = empty_output({sh.R, sh.N, sh.D}, input.options());
  p.output = out.mutable_data_ptr();
  st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return out;
}

at::Tensor compress_cpu(const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d, OptIntList lens) {
  return forward_cpu(&nsa::compress_cpu, input, weight, l, d, lens);
}

at::Tensor compress_reference_cpu(const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d,
                                  OptIntList lens) {
  return forward_cpu(&reference_forward, input, weight, l, d, lens);
}

at::Tensor compress_tensor_lengths_cpu(const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d,
                                       const OptTensor& lens) {
  std::vector<int64_t> storage;
  return compress_cpu(input, weight, l, d, lengths_from_tensor(lens, "actual_seq_len", storage));
}

// ------------------------------------------------------------------ Meta forward (int[] lengths)
at::Tensor compress_meta(const at::Tensor& input, const at::Tensor& weight, int64_t l, int64_t d, OptIntList lens) {
  check_compress_inputs(input, weight, l);
  const nsa::IntList list = int_list(lens);
  int64_t R = 0;
  const nsa::Status st = nsa::compress_output_rows(list, l, d, &R);  // l, d and the list (§7)
  TORCH_CHECK(st.ok(), st.message());
  if (const auto T = input.sym_size(0).maybe_as_int()) {
    TORCH_CHECK(list.data[list.size - 1] == *T,
                "actual_seq_len[-1] must equal the number of input rows T = input.size(0) = ", *T, ", got ",
                list.data[list.size - 1]);
  }
  return at::empty_symint({c10::SymInt(R), input.sym_size(1), input.sym_size(2)}, input.options());
}

// ------------------------------------------------------------------ backward (§6): CPU and Meta
using BackwardBackend = nsa::Status (*)(const nsa::CompressGradParams&, const nsa::CpuOptions&);

nsa::Status reference_backward(const nsa::CompressGradParams& p, const nsa::CpuOptions&) {
  return nsa::compress_backward_reference(p);
}

CompressGrads backward_cpu(BackwardBackend backend, const at::Tensor& grad, const at::Tensor& input,
                           const at::Tensor& weight, int64_t l, int64_t d, OptIntList lens) {
  check_compress_inputs(input, weight, l);
  check_grad_input(grad, input);
  check_cpu(grad, "grad");
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  nsa::CompressGradParams g;
  g.fwd = make_params(input, weight, l, d, lens);
  g.grad = view3(grad);
  static unsigned char placeholder;
  g.input_grad = &placeholder;
  g.weight_grad = &placeholder;
  nsa::Status st = nsa::validate_compress_backward(g, nullptr);  // raises before any allocation
  TORCH_CHECK(st.ok(), st.message());
  at::Tensor input_grad = empty_output(input.sizes(), input.options());
  at::Tensor weight_grad = empty_output(weight.sizes(), weight.options());
  g.input_grad = input_grad.numel() ? input_grad.mutable_data_ptr() : nullptr;
  g.weight_grad = weight_grad.mutable_data_ptr();
  st = backend(g, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {input_grad, weight_grad};
}

CompressGrads compress_backward_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                    int64_t l, int64_t d, OptIntList lens) {
  return backward_cpu(&nsa::compress_backward_cpu, grad, input, weight, l, d, lens);
}

CompressGrads compress_backward_reference_cpu(const at::Tensor& grad, const at::Tensor& input,
                                              const at::Tensor& weight, int64_t l, int64_t d, OptIntList lens) {
  return backward_cpu(&reference_backward, grad, input, weight, l, d, lens);
}

CompressGrads compress_backward_tensor_lengths_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                   const at::Tensor& weight, int64_t l, int64_t d,
                                                   const OptTensor& lens) {
  std::vector<int64_t> storage;
  return compress_backward_cpu(grad, input, weight, l, d, lengths_from_tensor(lens, "actual_seq_len", storage));
}

CompressGrads compress_backward_meta(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                     int64_t l, int64_t d, OptIntList lens) {
  check_compress_inputs(input, weight, l);
  check_grad_input(grad, input);
  if (lens.has_value()) {
    int64_t R = 0;
    const nsa::Status st = nsa::compress_output_rows(int_list(lens), l, d, &R);
    TORCH_CHECK(st.ok(), st.message());
    if (const auto r = grad.sym_size(0).maybe_as_int()) {
      TORCH_CHECK(*r == R, "grad must have the output's shape [R, N, D] with R = ", R, " (from actual_seq_len), got ",
                  grad.sym_sizes());
    }
  }
  return {at::empty_symint(input.sym_sizes(), input.options()), at::empty_symint(weight.sym_sizes(), weight.options())};
}

CompressGrads compress_backward_tensor_lengths_meta(const at::Tensor& grad, const at::Tensor& input,
                                                    const at::Tensor& weight, int64_t l, int64_t d,
                                                    const OptTensor& lens) {
  if (lens.has_value() && lens->defined()) {
    TORCH_CHECK(lens->dim() == 1, "actual_seq_len must be a 1-D integer tensor (prefix sums, one per batch), got a ",
                lens->dim(), "-D tensor");
    TORCH_CHECK(lens->scalar_type() == at::kLong || lens->scalar_type() == at::kInt,
                "actual_seq_len must be an int64 or int32 tensor, got ", lens->scalar_type());
  }
  return compress_backward_meta(grad, input, weight, l, d, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress", &nsa_torch::compress_cpu);
  m.impl("compress.tensor_lengths", &nsa_torch::compress_tensor_lengths_cpu);
  m.impl("compress_reference", &nsa_torch::compress_reference_cpu);
  m.impl("compress_backward", &nsa_torch::compress_backward_cpu);
  m.impl("compress_backward.tensor_lengths", &nsa_torch::compress_backward_tensor_lengths_cpu);
  m.impl("compress_backward_reference", &nsa_torch::compress_backward_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress", &nsa_torch::compress_meta);
  m.impl("compress_reference", &nsa_torch::compress_meta);
  m.impl("compress_backward", &nsa_torch::compress_backward_meta);
  m.impl("compress_backward.tensor_lengths", &nsa_torch::compress_backward_tensor_lengths_meta);
  m.impl("compress_backward_reference", &nsa_torch::compress_backward_meta);
}
