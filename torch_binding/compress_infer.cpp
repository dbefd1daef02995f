// torch.ops.nsa.compress_infer (torch_npu.npu_nsa_compress_infer, overload .cache; docs/spec/decode.md §2): the
// schemas and the CPU and Meta kernels, as thin adapters from tensors to the torch-free library
// (nsa/compress_infer.h).
//
// Schema: torch_npu's arguments, order and defaults, with `cache` marked as mutated (Tensor(a!)). The op returns
// nothing; the Python drop-in (python/nsa_ops/ops/compress_infer.py) returns `cache`, as the NPU's .cache
// overload does. An op that returned its mutated argument could not be functionalized by torch.compile; this
// form is (auto_functionalized). Overload .tensor_lengths takes actual_seq_len as a 1-D integer CPU tensor: a
// decode step's new lengths are then new tensor values, not new constants (no recompilation per step).
// compress_infer_reference: the same schema computed by the library's plain-loop reference (the tests' oracle).
// Meta kernels check ranks and dtypes only (nothing to allocate). No autograd kernel: the op has no derivative
// (§2); the Python drop-in refuses inputs that require gradients.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "binding.h"
#include "decode_args.h"
#include "nsa/compress_infer.h"

#define NSA_COMPRESS_INFER_ARGS(LENGTHS)                                                                       \
  "(Tensor input, Tensor weight, Tensor slot_mapping, int compress_block_size, int compress_stride, "          \
  "int page_block_size, *, Tensor? block_table=None, " LENGTHS " actual_seq_len=None, Tensor(a!) cache) -> ()"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("compress_infer" NSA_COMPRESS_INFER_ARGS("int[]?"));
  m.def("compress_infer.tensor_lengths" NSA_COMPRESS_INFER_ARGS("Tensor?"));
  m.def("compress_infer_reference" NSA_COMPRESS_INFER_ARGS("int[]?"));
}

namespace nsa_torch {
namespace {

using decode::OptIntList;
using decode::OptTensor;

// Ranks, dtypes and (where concrete) the shapes that need no lengths; the library checks §2 in full.
void check_inputs(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& slot_mapping,
                  const OptTensor& block_table, const at::Tensor& cache) {
  TORCH_CHECK(input.dim() == 4, "input must be a 4-D tensor [num_pages, page_block_size, N, D] (the paged raw cache), got a ",
              input.dim(), "-D tensor of shape ", input.sym_sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be a 2-D tensor [compress_block_size, N], got a ", weight.dim(),
              "-D tensor of shape ", weight.sym_sizes());
  TORCH_CHECK(cache.dim() == 3, "cache must be a 3-D tensor [num_slots, N, D], got a ", cache.dim(),
              "-D tensor of shape ", cache.sym_sizes());
  to_nsa_dtype(input.scalar_type(), "input");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight must have the dtype of input (", input.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(cache.scalar_type() == input.scalar_type(), "cache must have the dtype of input (", input.scalar_type(),
              "), got ", cache.scalar_type());
  decode::check_index_tensor(slot_mapping, "slot_mapping", 1, "[B]");
  if (block_table.has_value() && block_table->defined())
    decode::check_index_tensor(*block_table, "block_table", 2, "[B, max_pages]");
}

using Backend = nsa::Status (*)(const nsa::CompressInferParams&, const nsa::CpuOptions&);
nsa::Status reference_backend(const nsa::CompressInferParams& p, const nsa::CpuOptions&) {
  return nsa::compress_infer_reference(p);
}

void run_cpu(Backend backend, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& slot_mapping,
             int64_t l, int64_t d, int64_t P, const OptTensor& block_table, OptIntList lens, at::Tensor& cache) {
  check_inputs(input, weight, slot_mapping, block_table, cache);
  decode::check_cpu(input, "input");
  decode::check_cpu(weight, "weight");
  decode::check_cpu(slot_mapping, "slot_mapping");
  decode::check_cpu(cache, "cache");
  const bool has_table = block_table.has_value() && block_table->defined();
  if (has_table) decode::check_cpu(*block_table, "block_table");
  // index tensors as contiguous host copies (small); float tensors read in place with their strides
  const at::Tensor slots = slot_mapping.contiguous();
  const at::Tensor table = has_table ? block_table->contiguous() : at::Tensor();
  nsa::CompressInferParams p;
  p.dtype = to_nsa_dtype(input.scalar_type(), "input");
  p.input = input.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.input_size[i] = input.size(i);
    p.input_stride[i] = input.stride(i);
  }
  p.weight.data = weight.const_data_ptr();
  for (int i = 0; i < 2; ++i) {
    p.weight.size[i] = weight.size(i);
    p.weight.stride[i] = weight.stride(i);
  }
  p.cache = cache.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.cache_size[i] = cache.size(i);
    p.cache_stride[i] = cache.stride(i);
  }
  p.slot_mapping = slots.const_data_ptr<int32_t>();
  p.slot_mapping_size = slots.size(0);
  if (has_table) {
    p.block_table = table.const_data_ptr<int32_t>();
    p.block_table_rows = table.size(0);
    p.block_table_cols = table.size(1);
    p.block_table_row_stride = table.size(1);
  }
  p.compress_block_size = l;
  p.compress_stride = d;
  p.page_block_size = P;
  p.actual_seq_len = decode::int_list(lens);
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
}

void compress_infer_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& slot_mapping, int64_t l,
                        int64_t d, int64_t P, const OptTensor& block_table, OptIntList lens, at::Tensor& cache) {
  run_cpu(&nsa::compress_infer_cpu, input, weight, slot_mapping, l, d, P, block_table, lens, cache);
}

void compress_infer_reference_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& slot_mapping,
                                  int64_t l, int64_t d, int64_t P, const OptTensor& block_table, OptIntList lens,
                                  at::Tensor& cache) {
  run_cpu(&reference_backend, input, weight, slot_mapping, l, d, P, block_table, lens, cache);
}

void compress_infer_tensor_lengths_cpu(const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& slot_mapping, int64_t l, int64_t d, int64_t P,
                                       const OptTensor& block_table, const OptTensor& lens, at::Tensor& cache) {
  std::vector<int64_t> storage;
  compress_infer_cpu(input, weight, slot_mapping, l, d, P, block_table,
                     decode::lengths_from_tensor(lens, "actual_seq_len", storage), cache);
}

// Meta: nothing is allocated or written; ranks and dtypes are checked.
void compress_infer_meta(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& slot_mapping, int64_t,
                         int64_t, int64_t, const OptTensor& block_table, OptIntList, at::Tensor& cache) {
  check_inputs(input, weight, slot_mapping, block_table, cache);
}

void compress_infer_tensor_lengths_meta(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& slot_mapping, int64_t, int64_t, int64_t,
                                        const OptTensor& block_table, const OptTensor&, at::Tensor& cache) {
  check_inputs(input, weight, slot_mapping, block_table, cache);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_infer", &nsa_torch::compress_infer_cpu);
  m.impl("compress_infer.tensor_lengths", &nsa_torch::compress_infer_tensor_lengths_cpu);
  m.impl("compress_infer_reference", &nsa_torch::compress_infer_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_infer", &nsa_torch::compress_infer_meta);
  m.impl("compress_infer.tensor_lengths", &nsa_torch::compress_infer_tensor_lengths_meta);
  m.impl("compress_infer_reference", &nsa_torch::compress_infer_meta);
}
