// Internal header of the PyTorch binding (torch.ops.nsa): the checks and the tensor -> params
// mapping shared by the backend kernels (cpu_kernel.cpp, meta_kernel.cpp, and a CUDA kernel file
// later). Minimal torch headers only (docs/CONTRIBUTING.md rule 6); the operator's semantics live in the
// torch-free library (include/nsa/compress_attention.h, docs/spec/compress_attention.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "nsa/compress_attention.h"

namespace nsa_torch {

using OptTensor = std::optional<at::Tensor>;
using OptIntList = at::OptionalIntArrayRef;
// (attention_out, topk_indices, softmax_max, softmax_sum), the order of torch_npu (docs/spec/compress_attention.md §1).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A tensor as the library's strided 3-D view (sizes and element strides as they are).
nsa::Tensor3 view3(const at::Tensor& t);

// dtype of query/key/value as the library's enum; fails (naming `name`) for other dtypes.
nsa::DType to_nsa_dtype(at::ScalarType type, const char* name);

// Cheap checks that need no data and no concrete lengths, shared by every backend including Meta:
// query/key/value are 3-D, not empty, of one supported dtype; masks are 2-D bool/uint8; the head
// counts agree with head_num (checked where the sizes are concrete). docs/spec/compress_attention.md §6 is checked in full by
// nsa::validate_compress_attention once the lengths are known.
void check_forward_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          int64_t head_num, const OptTensor& topk_mask, const OptTensor& atten_mask);

// All tensors must be on `device_type` (named in messages as `backend`).
void check_forward_devices(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const OptTensor& topk_mask, const OptTensor& atten_mask, c10::DeviceType device_type,
                           const char* backend);

// Fills every input field of the params from the tensors (sizes and element strides as they are:
// non-contiguous inputs are read in place). Output pointers are left null. The tensors and lists
// must outlive the params.
nsa::CompressAttentionParams make_forward_params(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, double scale_value, int64_t head_num,
                                                 int64_t compress_block_size, int64_t compress_stride,
                                                 int64_t select_block_size, int64_t select_block_count,
                                                 const OptTensor& topk_mask, const OptTensor& atten_mask,
                                                 OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                                                 OptIntList actual_sel_seq_kvlen);

// Runs nsa::validate_compress_attention on params whose output pointers are not set yet (they are
// checked for non-null only, so placeholders are used): raises the library's message on failure,
// before anything is allocated or written. Returns the derived sizes.
nsa::CompressAttentionShape validate_forward_params(const nsa::CompressAttentionParams& params);

// Allocates the four contiguous outputs (docs/spec/compress_attention.md §4) with `options` (device) and points params at them.
ForwardResult allocate_forward_outputs(nsa::CompressAttentionParams& params, const nsa::CompressAttentionShape& shape,
                                       const at::Tensor& query);

// A prefix-sum list given as a 1-D integer CPU tensor (the .tensor_lengths overloads), copied to
// `storage`; nullopt for None. Fails naming `name` for other ranks, dtypes or devices.
OptIntList lengths_from_tensor(const OptTensor& t, const char* name, std::vector<int64_t>& storage);

// Cheap checks of the backward's tensors (shared by CPU and Meta): grad_out and attention_out are
// [T, N1, D2] of query's dtype; softmax_max and softmax_sum are float32 [T, N1, 8].
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value,
                           const at::Tensor& attention_out, const at::Tensor& softmax_max,
                           const at::Tensor& softmax_sum);

// (grad_query, grad_key, grad_value)
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

}  // namespace nsa_torch
