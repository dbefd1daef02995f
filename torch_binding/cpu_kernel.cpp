// CPU kernels of torch.ops.nsa: thin adapters from tensors to nsa::compress_attention_cpu / _reference.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "binding.h"

namespace nsa_torch {
namespace {

using Backend = nsa::Status (*)(const nsa::CompressAttentionParams&);

ForwardResult forward_cpu(Backend backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          double scale_value, int64_t head_num, int64_t compress_block_size, int64_t compress_stride,
                          int64_t select_block_size, int64_t select_block_count, const OptTensor& topk_mask,
                          const OptTensor& atten_mask, OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                          OptIntList actual_sel_seq_kvlen) {
  check_forward_inputs(query, key, value, head_num, topk_mask, atten_mask);
  check_forward_devices(query, key, value, topk_mask, atten_mask, c10::DeviceType::CPU, "CPU");
  nsa::CompressAttentionParams p = make_forward_params(
      query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
      select_block_count, topk_mask, atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen);
  const nsa::CompressAttentionShape shape = validate_forward_params(p);  // raises before any allocation
  ForwardResult out = allocate_forward_outputs(p, shape, query);
  p.num_threads = at::get_num_threads();
  const nsa::Status st = backend(p);
  TORCH_CHECK(st.ok(), st.message());
  return out;
}

ForwardResult compress_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                     double scale_value, int64_t head_num, int64_t compress_block_size,
                                     int64_t compress_stride, int64_t select_block_size, int64_t select_block_count,
                                     const OptTensor& topk_mask, const OptTensor& atten_mask,
                                     OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                                     OptIntList actual_sel_seq_kvlen) {
  return forward_cpu(&nsa::compress_attention_cpu, query, key, value, scale_value, head_num, compress_block_size,
                     compress_stride, select_block_size, select_block_count, topk_mask, atten_mask, actual_seq_qlen,
                     actual_cmp_seq_kvlen, actual_sel_seq_kvlen);
}

ForwardResult compress_attention_reference_cpu(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, double scale_value, int64_t head_num,
                                               int64_t compress_block_size, int64_t compress_stride,
                                               int64_t select_block_size, int64_t select_block_count,
                                               const OptTensor& topk_mask, const OptTensor& atten_mask,
                                               OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                                               OptIntList actual_sel_seq_kvlen) {
  return forward_cpu(&nsa::compress_attention_reference, query, key, value, scale_value, head_num,
                     compress_block_size, compress_stride, select_block_size, select_block_count, topk_mask,
                     atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen);
}

ForwardResult compress_attention_tensor_lengths_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale_value, int64_t head_num,
    int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size, int64_t select_block_count,
    const OptTensor& topk_mask, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_cmp_seq_kvlen, const OptTensor& actual_sel_seq_kvlen) {
  std::vector<int64_t> q, c, s;
  return compress_attention_cpu(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                                select_block_size, select_block_count, topk_mask, atten_mask,
                                lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                                lengths_from_tensor(actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen", c),
                                lengths_from_tensor(actual_sel_seq_kvlen, "actual_sel_seq_kvlen", s));
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_attention", &nsa_torch::compress_attention_cpu);
  m.impl("compress_attention.tensor_lengths", &nsa_torch::compress_attention_tensor_lengths_cpu);
  m.impl("compress_attention_reference", &nsa_torch::compress_attention_reference_cpu);
}
