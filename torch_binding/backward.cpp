// Backward of torch.ops.nsa.compress_attention (SPEC §7): CPU and Meta kernels of
// compress_attention_backward (int[] lengths) and its .tensor_lengths overload. Thin adapters to
// nsa::compress_attention_backward_cpu; the autograd formula that calls them is in
// python/nsa_ops/_autograd.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "binding.h"

namespace nsa_torch {
namespace {

BackwardResult backward_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& attention_out, const at::Tensor& softmax_max,
                            const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                            int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size,
                            int64_t select_block_count, const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                            OptIntList actual_cmp_seq_kvlen) {
  check_forward_inputs(query, key, value, head_num, std::nullopt, atten_mask);
  check_backward_inputs(grad_out, query, value, attention_out, softmax_max, softmax_sum);
  check_forward_devices(query, key, value, std::nullopt, atten_mask, c10::DeviceType::CPU, "CPU");
  for (const at::Tensor* t : {&grad_out, &attention_out, &softmax_max, &softmax_sum})
    TORCH_CHECK(t->device().is_cpu(), "the backward's tensors must be on the CPU, got ", t->device());
  nsa::CompressAttentionGradParams g;
  g.fwd = make_forward_params(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                              select_block_size, select_block_count, std::nullopt, atten_mask, actual_seq_qlen,
                              actual_cmp_seq_kvlen, std::nullopt);
  validate_forward_params(g.fwd);  // raises before any allocation
  g.attention_out = view3(attention_out);
  g.grad_out = view3(grad_out);
  g.softmax_max = softmax_max.const_data_ptr<float>();
  g.softmax_sum = softmax_sum.const_data_ptr<float>();
  at::Tensor dq = at::empty(query.sizes(), query.options());
  at::Tensor dk = at::empty(key.sizes(), key.options());
  at::Tensor dv = at::empty(value.sizes(), value.options());
  for (const at::Tensor* t : {&dq, &dk, &dv}) advise_huge_pages(*t);
  g.grad_query = dq.mutable_data_ptr();
  g.grad_key = dk.mutable_data_ptr();
  g.grad_value = dv.mutable_data_ptr();
  g.fwd.num_threads = at::get_num_threads();
  const nsa::Status st = nsa::compress_attention_backward_cpu(g);
  TORCH_CHECK(st.ok(), st.message());
  return {dq, dk, dv};
}

BackwardResult backward_tensor_lengths_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                           const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                                           int64_t compress_block_size, int64_t compress_stride,
                                           int64_t select_block_size, int64_t select_block_count,
                                           const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
                                           const OptTensor& actual_cmp_seq_kvlen) {
  std::vector<int64_t> q, c;
  return backward_cpu(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                      compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                      lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                      lengths_from_tensor(actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen", c));
}

BackwardResult backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const at::Tensor& attention_out, const at::Tensor& softmax_max,
                             const at::Tensor& softmax_sum, double /*scale_value*/, int64_t head_num,
                             int64_t /*compress_block_size*/, int64_t /*compress_stride*/,
                             int64_t /*select_block_size*/, int64_t /*select_block_count*/,
                             const OptTensor& atten_mask, OptIntList /*actual_seq_qlen*/,
                             OptIntList /*actual_cmp_seq_kvlen*/) {
  check_forward_inputs(query, key, value, head_num, std::nullopt, atten_mask);
  check_backward_inputs(grad_out, query, value, attention_out, softmax_max, softmax_sum);
  return {at::empty_symint(query.sym_sizes(), query.options()), at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options())};
}

BackwardResult backward_tensor_lengths_meta(const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                            const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                                            int64_t compress_block_size, int64_t compress_stride,
                                            int64_t select_block_size, int64_t select_block_count,
                                            const OptTensor& atten_mask, const OptTensor& /*actual_seq_qlen*/,
                                            const OptTensor& /*actual_cmp_seq_kvlen*/) {
  return backward_meta(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                       compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                       std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_attention_backward", &nsa_torch::backward_cpu);
  m.impl("compress_attention_backward.tensor_lengths", &nsa_torch::backward_tensor_lengths_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_attention_backward", &nsa_torch::backward_meta);
  m.impl("compress_attention_backward.tensor_lengths", &nsa_torch::backward_tensor_lengths_meta);
}
