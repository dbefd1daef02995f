// Argument helpers of the decode operators' bindings (docs/spec/decode.md; compress_infer.cpp,
// compress_attention_infer.cpp, select_attention_infer.cpp, paged_window_attention.cpp): per-batch length lists
// given as 1-D integer CPU tensors, int32 index tensors (slot_mapping, block_table) read as contiguous host copies,
// and device checks. Every failure names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "nsa/common.h"

namespace nsa_torch::decode {

using OptTensor = std::optional<at::Tensor>;
using OptIntList = at::OptionalIntArrayRef;

// A per-batch length list (decode.md: lengths are per batch, not prefix sums) as the library's IntList; not given
// (data null) for nullopt.
inline nsa::IntList int_list(OptIntList l) {
  nsa::IntList out;
  if (!l.has_value()) return out;
  static const int64_t kEmpty = 0;  // an empty list keeps a non-null pointer: "given, with 0 entries"
  out.data = l->empty() ? &kEmpty : l->data();
  out.size = static_cast<int64_t>(l->size());
  return out;
}

// The .tensor_lengths overloads: a 1-D int64/int32 CPU tensor of per-batch lengths copied to `storage`.
inline OptIntList lengths_from_tensor(const OptTensor& t, const char* name, std::vector<int64_t>& storage) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1, name, " must be a 1-D integer tensor (one length per batch), got a ", t->dim(),
              "-D tensor");
  const auto type = t->scalar_type();
  TORCH_CHECK(type == at::kLong || type == at::kInt, name, " must be an int64 or int32 tensor, got ", type);
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor (the lengths are read on the host), got ",
              t->device());
  const int64_t n = t->size(0);
  storage.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    storage[static_cast<size_t>(i)] = type == at::kLong ? t->const_data_ptr<int64_t>()[i * t->stride(0)]
                                                        : t->const_data_ptr<int32_t>()[i * t->stride(0)];
  return OptIntList(storage);
}

// Checks of an int32 index tensor of rank `dim` (shape text `shape` for the message).
inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D int32 tensor ", shape, ", got a ", t.dim(),
              "-D tensor of shape ", t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be an int32 tensor, got ", t.scalar_type());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor like the others, got ", t.device());
}

}  // namespace nsa_torch::decode
