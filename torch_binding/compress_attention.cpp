// torch.ops.nsa.compress_attention (torch_npu.npu_nsa_compress_attention, docs/spec/compress_attention.md):
// the schemas and every dispatch key of the operator, as thin adapters from tensors to the torch-free library.
//
// compress_attention: the same arguments, order and defaults as torch_npu (§1). compress_attention_reference:
// the same schema, computed by the library's plain-loop reference (the spec in code, slow, CPU only): the
// oracle for tests and debugging. Overload .tensor_lengths takes the three prefix-sum lists as 1-D integer CPU
// tensors instead of int[]: under torch.compile new lengths are then new tensor values, not new constants (no
// recompilation per batch composition). compress_attention_backward (§7): dQ, dK, dV from dO and the forward's
// saved tensors; used by the autograd formula (python/nsa_ops/_autograd.py).
// Meta kernels (shapes and dtypes only; also the fake kernels of torch.compile): the output shapes depend on no
// data: [T, N1, D2] (query dtype), [T, N2, K] int32, [T, N1, 8] float32 x2.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "binding.h"
#include "output_cache.h"

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

// The overloads .ext / .ext_tensor_lengths (the Pythonic API, docs/spec/compress_attention.md §10): the same
// arguments plus `causal`, and the §10 extensions on (masks larger than [maxSq, maxC] / [maxSq, maxSel] with their
// top-left part used; batches with Sel_b < K padded with -1). causal = True applies the §9 masks from the lengths
// (atten_mask and topk_mask must be None) without materialising them.
#define NSA_FORWARD_EXT_ARGS(LENGTHS)                                                             \
  "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, "                   \
  "int compress_block_size, int compress_stride, int select_block_size, int select_block_count, " \
  "Tensor? topk_mask=None, Tensor? atten_mask=None, " LENGTHS " actual_seq_qlen=None, "          \
  LENGTHS " actual_cmp_seq_kvlen=None, " LENGTHS " actual_sel_seq_kvlen=None, bool causal=False) " \
  "-> (Tensor attention_out, Tensor topk_indices, Tensor softmax_max, Tensor softmax_sum)"

#define NSA_BACKWARD_EXT_ARGS(LENGTHS)                                                             \
  "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor attention_out, "             \
  "Tensor softmax_max, Tensor softmax_sum, float scale_value, int head_num, "                    \
  "int compress_block_size, int compress_stride, int select_block_size, int select_block_count, " \
  "Tensor? atten_mask, " LENGTHS " actual_seq_qlen, " LENGTHS " actual_cmp_seq_kvlen, bool causal=False) " \
  "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("compress_attention" NSA_FORWARD_ARGS);
  m.def("compress_attention.ext" NSA_FORWARD_EXT_ARGS("int[]?"));
  m.def("compress_attention.ext_tensor_lengths" NSA_FORWARD_EXT_ARGS("Tensor?"));
  m.def("compress_attention.tensor_lengths" NSA_FORWARD_ARGS_TENSOR_LENGTHS);
  m.def("compress_attention_reference" NSA_FORWARD_ARGS);
  m.def("compress_attention_backward" NSA_BACKWARD_ARGS("int[]?"));
  m.def("compress_attention_backward.tensor_lengths" NSA_BACKWARD_ARGS("Tensor?"));
  m.def("compress_attention_backward.ext" NSA_BACKWARD_EXT_ARGS("int[]?"));
  m.def("compress_attention_backward.ext_tensor_lengths" NSA_BACKWARD_EXT_ARGS("Tensor?"));
}

// ------------------------------------------------------------------ CPU forward
namespace nsa_torch {
namespace {

using Backend = nsa::Status (*)(const nsa::CompressAttentionParams&, const nsa::CpuOptions&);

// The reference takes no execution options.
nsa::Status reference_backend(const nsa::CompressAttentionParams& p, const nsa::CpuOptions&) {
  return nsa::compress_attention_reference(p);
}

ForwardResult forward_cpu(Backend backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          double scale_value, int64_t head_num, int64_t compress_block_size, int64_t compress_stride,
                          int64_t select_block_size, int64_t select_block_count, const OptTensor& topk_mask,
                          const OptTensor& atten_mask, OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                          OptIntList actual_sel_seq_kvlen, bool ext = false, bool causal = false) {
  check_forward_inputs(query, key, value, head_num, topk_mask, atten_mask);
  check_forward_devices(query, key, value, topk_mask, atten_mask, c10::DeviceType::CPU, "CPU");
  nsa::CompressAttentionParams p = make_forward_params(
      query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
      select_block_count, topk_mask, atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen);
  p.larger_masks = p.short_batches = ext;  // §10
  p.causal = causal;
  const nsa::CompressAttentionShape shape = validate_forward_params(p);  // raises before any allocation
  ForwardResult out = allocate_forward_outputs(p, shape, query);
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
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
  return forward_cpu(&reference_backend, query, key, value, scale_value, head_num,
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

ForwardResult compress_attention_ext_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                         double scale_value, int64_t head_num, int64_t compress_block_size,
                                         int64_t compress_stride, int64_t select_block_size,
                                         int64_t select_block_count, const OptTensor& topk_mask,
                                         const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                         OptIntList actual_cmp_seq_kvlen, OptIntList actual_sel_seq_kvlen,
                                         bool causal) {
  return forward_cpu(&nsa::compress_attention_cpu, query, key, value, scale_value, head_num, compress_block_size,
                     compress_stride, select_block_size, select_block_count, topk_mask, atten_mask, actual_seq_qlen,
                     actual_cmp_seq_kvlen, actual_sel_seq_kvlen, /*ext=*/true, causal);
}

ForwardResult compress_attention_ext_tensor_lengths_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale_value, int64_t head_num,
    int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size, int64_t select_block_count,
    const OptTensor& topk_mask, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_cmp_seq_kvlen, const OptTensor& actual_sel_seq_kvlen, bool causal) {
  std::vector<int64_t> q, c, s;
  return compress_attention_ext_cpu(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                                    select_block_size, select_block_count, topk_mask, atten_mask,
                                    lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                                    lengths_from_tensor(actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen", c),
                                    lengths_from_tensor(actual_sel_seq_kvlen, "actual_sel_seq_kvlen", s), causal);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_attention.ext", &nsa_torch::compress_attention_ext_cpu);
  m.impl("compress_attention.ext_tensor_lengths", &nsa_torch::compress_attention_ext_tensor_lengths_cpu);
  m.impl("compress_attention", &nsa_torch::compress_attention_cpu);
  m.impl("compress_attention.tensor_lengths", &nsa_torch::compress_attention_tensor_lengths_cpu);
  m.impl("compress_attention_reference", &nsa_torch::compress_attention_reference_cpu);
}

// ------------------------------------------------------------------ Meta forward
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

ForwardResult compress_attention_ext_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          double scale_value, int64_t head_num, int64_t compress_block_size,
                                          int64_t compress_stride, int64_t select_block_size,
                                          int64_t select_block_count, const OptTensor& topk_mask,
                                          const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                          OptIntList actual_cmp_seq_kvlen, OptIntList actual_sel_seq_kvlen,
                                          bool /*causal*/) {
  return compress_attention_meta(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                                 select_block_size, select_block_count, topk_mask, atten_mask, actual_seq_qlen,
                                 actual_cmp_seq_kvlen, actual_sel_seq_kvlen);
}

ForwardResult compress_attention_ext_tensor_lengths_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale_value, int64_t head_num,
    int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size, int64_t select_block_count,
    const OptTensor& topk_mask, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_cmp_seq_kvlen, const OptTensor& actual_sel_seq_kvlen, bool /*causal*/) {
  return compress_attention_tensor_lengths_meta(query, key, value, scale_value, head_num, compress_block_size,
                                                compress_stride, select_block_size, select_block_count, topk_mask,
                                                atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen,
                                                actual_sel_seq_kvlen);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_attention.ext", &nsa_torch::compress_attention_ext_meta);
  m.impl("compress_attention.ext_tensor_lengths", &nsa_torch::compress_attention_ext_tensor_lengths_meta);
  m.impl("compress_attention", &nsa_torch::compress_attention_meta);
  m.impl("compress_attention.tensor_lengths", &nsa_torch::compress_attention_tensor_lengths_meta);
  m.impl("compress_attention_reference", &nsa_torch::compress_attention_meta);
}

// ------------------------------------------------------------------ backward (§7): CPU and Meta
namespace nsa_torch {
namespace {

// ext: the §10 extensions (larger masks, short batches) and `causal`.
BackwardResult backward_cpu_impl(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& attention_out,
                                 const at::Tensor& softmax_max, const at::Tensor& softmax_sum, double scale_value,
                                 int64_t head_num, int64_t compress_block_size, int64_t compress_stride,
                                 int64_t select_block_size, int64_t select_block_count, const OptTensor& atten_mask,
                                 OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen, bool ext, bool causal) {
  check_forward_inputs(query, key, value, head_num, std::nullopt, atten_mask);
  check_backward_inputs(grad_out, query, value, attention_out, softmax_max, softmax_sum);
  check_forward_devices(query, key, value, std::nullopt, atten_mask, c10::DeviceType::CPU, "CPU");
  for (const at::Tensor* t : {&grad_out, &attention_out, &softmax_max, &softmax_sum})
    TORCH_CHECK(t->device().is_cpu(), "the backward's tensors must be on the CPU, got ", t->device());
  nsa::CompressAttentionGradParams g;
  g.fwd = make_forward_params(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                              select_block_size, select_block_count, std::nullopt, atten_mask, actual_seq_qlen,
                              actual_cmp_seq_kvlen, std::nullopt);
  g.fwd.larger_masks = g.fwd.short_batches = ext;  // §10
  g.fwd.causal = causal;
  validate_forward_params(g.fwd);  // raises before any allocation
  g.attention_out = view3(attention_out);
  g.grad_out = view3(grad_out);
  g.softmax_max = softmax_max.const_data_ptr<float>();
  g.softmax_sum = softmax_sum.const_data_ptr<float>();
  at::Tensor dq = empty_output(query.sizes(), query.options());
  at::Tensor dk = empty_output(key.sizes(), key.options());
  at::Tensor dv = empty_output(value.sizes(), value.options());
  g.grad_query = dq.mutable_data_ptr();
  g.grad_key = dk.mutable_data_ptr();
  g.grad_value = dv.mutable_data_ptr();
  const nsa::Status st = nsa::compress_attention_backward_cpu(g, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {dq, dk, dv};
}

BackwardResult backward_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& attention_out, const at::Tensor& softmax_max,
                            const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                            int64_t compress_block_size, int64_t compress_stride, int64_t select_block_size,
                            int64_t select_block_count, const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                            OptIntList actual_cmp_seq_kvlen) {
  return backward_cpu_impl(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                           compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                           actual_seq_qlen, actual_cmp_seq_kvlen, /*ext=*/false, /*causal=*/false);
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

BackwardResult backward_ext_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& attention_out,
                                const at::Tensor& softmax_max, const at::Tensor& softmax_sum, double scale_value,
                                int64_t head_num, int64_t compress_block_size, int64_t compress_stride,
                                int64_t select_block_size, int64_t select_block_count, const OptTensor& atten_mask,
                                OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen, bool causal) {
  return backward_cpu_impl(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                           compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                           actual_seq_qlen, actual_cmp_seq_kvlen, /*ext=*/true, causal);
}

BackwardResult backward_ext_tensor_lengths_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                               const at::Tensor& key, const at::Tensor& value,
                                               const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                               const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                                               int64_t compress_block_size, int64_t compress_stride,
                                               int64_t select_block_size, int64_t select_block_count,
                                               const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
                                               const OptTensor& actual_cmp_seq_kvlen, bool causal) {
  std::vector<int64_t> q, c;
  return backward_ext_cpu(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value,
                          head_num, compress_block_size, compress_stride, select_block_size, select_block_count,
                          atten_mask, lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                          lengths_from_tensor(actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen", c), causal);
}

BackwardResult backward_ext_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& attention_out,
                                 const at::Tensor& softmax_max, const at::Tensor& softmax_sum, double scale_value,
                                 int64_t head_num, int64_t compress_block_size, int64_t compress_stride,
                                 int64_t select_block_size, int64_t select_block_count, const OptTensor& atten_mask,
                                 OptIntList /*actual_seq_qlen*/, OptIntList /*actual_cmp_seq_kvlen*/,
                                 bool /*causal*/) {
  return backward_meta(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                       compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                       std::nullopt, std::nullopt);
}

BackwardResult backward_ext_tensor_lengths_meta(const at::Tensor& grad_out, const at::Tensor& query,
                                                const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                                const at::Tensor& softmax_sum, double scale_value, int64_t head_num,
                                                int64_t compress_block_size, int64_t compress_stride,
                                                int64_t select_block_size, int64_t select_block_count,
                                                const OptTensor& atten_mask, const OptTensor& /*actual_seq_qlen*/,
                                                const OptTensor& /*actual_cmp_seq_kvlen*/, bool /*causal*/) {
  return backward_meta(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
                       compress_block_size, compress_stride, select_block_size, select_block_count, atten_mask,
                       std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_attention_backward.ext", &nsa_torch::backward_ext_cpu);
  m.impl("compress_attention_backward.ext_tensor_lengths", &nsa_torch::backward_ext_tensor_lengths_cpu);
  m.impl("compress_attention_backward", &nsa_torch::backward_cpu);
  m.impl("compress_attention_backward.tensor_lengths", &nsa_torch::backward_tensor_lengths_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_attention_backward.ext", &nsa_torch::backward_ext_meta);
  m.impl("compress_attention_backward.ext_tensor_lengths", &nsa_torch::backward_ext_tensor_lengths_meta);
  m.impl("compress_attention_backward", &nsa_torch::backward_meta);
  m.impl("compress_attention_backward.tensor_lengths", &nsa_torch::backward_tensor_lengths_meta);
}
