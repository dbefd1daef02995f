// Operator schemas of torch.ops.nsa (the kernels are registered per backend in *_kernel.cpp).
//
// compress_attention: torch_npu.npu_nsa_compress_attention with the same arguments, order and
// defaults (SPEC §1). compress_attention_reference: the same schema, computed by the library's
// plain-loop reference (the spec in code, slow, CPU only): the oracle for tests and debugging.
// Overload .tensor_lengths takes the three prefix-sum lists as 1-D integer CPU tensors instead of
// int[]: under torch.compile new lengths are then new tensor values, not new constants (no
// recompilation per batch composition). compress_attention_backward (SPEC §7): dQ, dK, dV from dO
// and the forward's saved tensors; used by the autograd formula (python/nsa_ops/_autograd.py).
#include <torch/library.h>

#include <string>
#include <tuple>

#include "nsa/compress_attention.h"

#define NSA_FORWARD_ARGS_TENSOR_LENGTHS                                                           \
  "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, "                   \
  "int compress_block_size, int compress_stride, int select_block_size, int select_block_count, " \
  "Tensor? topk_mask=None, Tensor? atten_mask=None, Tensor? actual_seq_qlen=None, "              \
  "Tensor? actual_cmp_seq_kvlen=None, Tensor? actual_sel_seq_kvlen=None) "                       \
  "-> (Tensor attention_out, Tensor topk_indices, Tensor softmax_max, Tensor softmax_sum)"

#define NSA_BACKWARD_ARGS(LENGTHS)                                                                 \
  "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor attention_out, "             \
  "Tensor softmax_max, Tensor softmax_sum, float scale_value, int head_num, "                    \
  "int compress_block_size, int compress_stride, int select_block_size, int select_block_count, " \
  "Tensor? atten_mask, " LENGTHS " actual_seq_qlen, " LENGTHS " actual_cmp_seq_kvlen) "          \
  "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"

#define NSA_FORWARD_ARGS                                                                          \
  "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, "                   \
  "int compress_block_size, int compress_stride, int select_block_size, int select_block_count, " \
  "Tensor? topk_mask=None, Tensor? atten_mask=None, int[]? actual_seq_qlen=None, "               \
  "int[]? actual_cmp_seq_kvlen=None, int[]? actual_sel_seq_kvlen=None) "                         \
  "-> (Tensor attention_out, Tensor topk_indices, Tensor softmax_max, Tensor softmax_sum)"

namespace {
// The CPU backend's instruction-set paths: (detected by cpuid + XCR0, active after the NSA_CPU_ISA cap).
std::tuple<std::string, std::string> cpu_isa() {
  return {nsa::cpu_isa_name(nsa::cpu_detected_isa()), nsa::cpu_isa_name(nsa::cpu_active_isa())};
}
}  // namespace

TORCH_LIBRARY(nsa, m) {
  m.def("compress_attention" NSA_FORWARD_ARGS);
  m.def("compress_attention.tensor_lengths" NSA_FORWARD_ARGS_TENSOR_LENGTHS);
  m.def("compress_attention_reference" NSA_FORWARD_ARGS);
  m.def("compress_attention_backward" NSA_BACKWARD_ARGS("int[]?"));
  m.def("compress_attention_backward.tensor_lengths" NSA_BACKWARD_ARGS("Tensor?"));
  m.def("cpu_isa() -> (str detected, str active)", &cpu_isa);
}
