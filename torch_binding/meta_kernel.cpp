// Meta kernels of torch.ops.nsa (shapes and dtypes only; also the fake kernels of torch.compile).
// The output shapes depend on no data: [T, N1, D2] (query dtype), [T, N2, K] int32, [T, N1, 8] float32 x2.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "binding.h"

namespace nsa_torch {
namespace {

ForwardResult compress_attention_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                      double /*scale_value*/, int64_t head_num, int64_t /*compress_block_size*/,
                                      int64_t /*compress_stride*/, int64_t /*select_block_size*/,
                                      int64_t select_block_count, const OptTensor& topk_mask,
                                      const OptTensor& atten_mask, OptIntList /*actual_seq_qlen*/,
                                      OptIntList /*actual_cmp_seq_kvlen*/, OptIntList /*actual_sel_seq_kvlen*/) {
  check_forward_inputs(query, key, value, head_num, topk_mask, atten_mask);
  // Real tensors on different devices (e.g. CPU and meta) also dispatch here: require one device.
  // (Fake tensors under torch.compile all report their common device.)
  const std::string device_name = c10::DeviceTypeName(query.device().type());
  check_forward_devices(query, key, value, topk_mask, atten_mask, query.device().type(), device_name.c_str());
  TORCH_CHECK(select_block_count >= 1 && select_block_count <= 32, "select_block_count must be in [1, 32], got ",
              select_block_count);
  const auto opts = query.options();
  const c10::SymInt T = query.sym_size(0), N1 = query.sym_size(1), N2 = key.sym_size(1), D2 = value.sym_size(2);
  return {at::empty_symint({T, N1, D2}, opts), at::empty_symint({T, N2, select_block_count}, opts.dtype(at::kInt)),
          at::empty_symint({T, N1, 8}, opts.dtype(at::kFloat)), at::empty_symint({T, N1, 8}, opts.dtype(at::kFloat))};
}

ForwardResult compress_attention_tensor_lengths_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale_value, int64_t head_num,
    int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size, int64_t select_block_count,
    const OptTensor& topk_mask, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_cmp_seq_kvlen, const OptTensor& actual_sel_seq_kvlen) {
  // The values are read by the real kernels; here only what needs no data: rank, dtype, device.
  const std::pair<const OptTensor*, const char*> lengths[] = {
      {&actual_seq_qlen, "actual_seq_qlen"}, {&actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen"},
      {&actual_sel_seq_kvlen, "actual_sel_seq_kvlen"}};
  for (const auto& [t, name] : lengths) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& x = **t;
    TORCH_CHECK(x.dim() == 1, name, " must be a 1-D integer tensor (prefix sums, one per batch), got a ", x.dim(),
                "-D tensor");
    TORCH_CHECK(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt, name,
                " must be an int64 or int32 tensor, got ", x.scalar_type());
    TORCH_CHECK(x.device().is_cpu() || x.device() == query.device(), name,
                " must be a CPU tensor (the lengths are read on the host), got ", x.device());
  }
  return compress_attention_meta(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                                 select_block_size, select_block_count, topk_mask, atten_mask, std::nullopt,
                                 std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_attention", &nsa_torch::compress_attention_meta);
  m.impl("compress_attention.tensor_lengths", &nsa_torch::compress_attention_tensor_lengths_meta);
  m.impl("compress_attention_reference", &nsa_torch::compress_attention_meta);
}
