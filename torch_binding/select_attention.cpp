// torch.ops.nsa.select_attention (torch_npu.npu_nsa_select_attention, docs/spec/select_attention.md) and its
// backward torch.ops.nsa.select_attention_backward (torch_npu.npu_nsa_select_attention_grad): the schemas and the
// CPU and Meta kernels, as thin adapters from tensors to the torch-free library (nsa/select_attention.h).
//
// select_attention: the arguments, order and defaults of torch_npu (§1), except that atten_mask and the lengths are
// not keyword-only here: torch.library.register_autograd (the autograd of python/nsa_ops/ops/) does not support
// keyword-only tensor arguments; the Python drop-ins keep torch_npu's keyword-only signature. The causal switch is
// torch_npu's: causal := (atten_mask is not None); the tensor must be 2-D bool/uint8 and its contents and size are
// never read (§1, §12 item 3). The Pythonic API (python/nsa_ops/ops/select_attention.py) requests causality by
// passing a placeholder mask. Overload .tensor_lengths takes the two prefix-sum lists as 1-D integer CPU tensors:
// under torch.compile new lengths are then new tensor values, not new constants (no recompilation per batch
// composition). select_attention_reference: the same schema computed by the library's plain-loop reference (the
// contract in code, slow): the oracle for tests. select_attention_backward (§8): torch_npu's grad schema (note its
// order: the three forward outputs come before topk_indices), with the same two overloads, and
// select_attention_backward_reference.
// Meta kernels (shapes and dtypes only; also the fake kernels of torch.compile): no output shape depends on data:
// [T1, N1, Dv] (query dtype) and [T1, N1, 8] float32 x 2; the gradients have the shapes of query, key, value.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding.h"
#include "nsa/select_attention.h"
#include "output_cache.h"

#define NSA_SELECT_ARGS(LENGTHS)                                                                        \
  "(Tensor query, Tensor key, Tensor value, Tensor topk_indices, float scale_value, int head_num, "   \
  "int select_block_size, int select_block_count, Tensor? atten_mask=None, " LENGTHS                   \
  " actual_seq_qlen=None, " LENGTHS " actual_seq_kvlen=None) "                                          \
  "-> (Tensor attention_out, Tensor softmax_max, Tensor softmax_sum)"

#define NSA_SELECT_BACKWARD_ARGS(LENGTHS)                                                                \
  "(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor attention_out, Tensor softmax_max, "   \
  "Tensor softmax_sum, Tensor topk_indices, float scale_value, int head_num, int select_block_size, "  \
  "int select_block_count, Tensor? atten_mask=None, " LENGTHS " actual_seq_qlen=None, " LENGTHS         \
  " actual_seq_kvlen=None) -> (Tensor query_grad, Tensor key_grad, Tensor value_grad)"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("select_attention" NSA_SELECT_ARGS("int[]?"));
  m.def("select_attention.tensor_lengths" NSA_SELECT_ARGS("Tensor?"));
  m.def("select_attention_reference" NSA_SELECT_ARGS("int[]?"));
  m.def("select_attention_backward" NSA_SELECT_BACKWARD_ARGS("int[]?"));
  m.def("select_attention_backward.tensor_lengths" NSA_SELECT_BACKWARD_ARGS("Tensor?"));
  m.def("select_attention_backward_reference" NSA_SELECT_BACKWARD_ARGS("int[]?"));
}

namespace nsa_torch {
namespace {

using OptTensor = std::optional<at::Tensor>;
using SelectResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ------------------------------------------------------------------ checks shared by every kernel
// What needs no data and no concrete lengths (§7 is checked in full by the library once the lengths are known).
void check_3d(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 3, name, " must be a 3-D tensor ", layout, ", got a ", t.dim(), "-D tensor of shape ",
              t.sym_sizes());
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& topk_indices, int64_t head_num, const OptTensor& atten_mask) {
  check_3d(query, "query", "[T1, N1, D]");
  check_3d(key, "key", "[T2, N2, D]");
  check_3d(value, "value", "[T2, N2, Dv]");
  check_3d(topk_indices, "topk_indices", "[T1, N2, K]");
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (", query.scalar_type(),
              "), got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == query.scalar_type(), "value must have the dtype of query (",
              query.scalar_type(), "), got ", value.scalar_type());
  const auto it = topk_indices.scalar_type();
  TORCH_CHECK(it == at::kInt || it == at::kLong, "topk_indices must be an int32 (or int64) tensor, got ", it);
  if (atten_mask.has_value() && atten_mask->defined()) {
    TORCH_CHECK(atten_mask->dim() == 2, "atten_mask must be a 2-D bool (or uint8) tensor (its presence turns causal "
                "masking on; its contents are not read), got a ", atten_mask->dim(), "-D tensor");
    const auto mt = atten_mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kByte, "atten_mask must be a bool (or uint8) tensor, got ", mt);
  }
  const auto n1 = query.sym_size(1).maybe_as_int(), n2 = key.sym_size(1).maybe_as_int();
  if (n1) {
    TORCH_CHECK(head_num == *n1, "head_num must equal the number of query heads query.size(1) = ", *n1, ", got ",
                head_num);
  }
  if (n1 && n2 && *n2 > 0) {
    TORCH_CHECK(*n1 % *n2 == 0, "the number of query heads (", *n1,
                ") must be a multiple of the number of key/value heads key.size(1) = ", *n2);
  }
}

// Every tensor on one device type (named `backend` in messages).
void check_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts, const OptTensor& atten_mask,
                   c10::DeviceType type, const char* backend) {
  for (const auto& [t, name] : ts)
    TORCH_CHECK(t->device().type() == type, name, " must be on the ", backend, " device like query, got ",
                t->device());
  if (atten_mask.has_value() && atten_mask->defined())
    TORCH_CHECK(atten_mask->device().type() == type, "atten_mask must be on the ", backend,
                " device like query, got ", atten_mask->device());
}

void check_backward_inputs(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& value,
                           const at::Tensor& attention_out, const at::Tensor& softmax_max,
                           const at::Tensor& softmax_sum) {
  auto like_out = [&](const at::Tensor& t, const char* name) {
    check_3d(t, name, "[T1, N1, Dv]");
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the dtype of query (", query.scalar_type(),
                "), got ", t.scalar_type());
  };
  like_out(grad, "grad");
  like_out(attention_out, "attention_out");
  auto stat = [&](const at::Tensor& t, const char* name) {
    check_3d(t, name, "[T1, N1, 8]");
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  };
  stat(softmax_max, "softmax_max");
  stat(softmax_sum, "softmax_sum");
  (void)value;
}

// A tensor as the library's strided view; data may be null only for a view without elements.
nsa::Tensor3 view(const at::Tensor& t) {
  nsa::Tensor3 v = view3(t);
  if (t.numel() == 0) v.data = nullptr;
  return v;
}

nsa::IntList int_list(OptIntList l) {
  nsa::IntList out;
  if (!l.has_value()) return out;
  static const int64_t kEmpty = 0;  // an empty list keeps a non-null pointer: the library reports "at least one"
  out.data = l->empty() ? &kEmpty : l->data();
  out.size = static_cast<int64_t>(l->size());
  return out;
}

nsa::SelectAttentionParams make_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                       int64_t select_block_size, int64_t select_block_count,
                                       const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                       OptIntList actual_seq_kvlen) {
  nsa::SelectAttentionParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.query = view(query);
  p.key = view(key);
  p.value = view(value);
  p.topk_indices = view(topk_indices);
  p.index_dtype = topk_indices.scalar_type() == at::kLong ? nsa::IndexDType::kInt64 : nsa::IndexDType::kInt32;
  p.scale_value = scale_value;
  p.head_num = head_num;
  p.select_block_size = select_block_size;
  p.select_block_count = select_block_count;
  p.causal = atten_mask.has_value() && atten_mask->defined();  // torch_npu's switch (§1)
  p.actual_seq_qlen = int_list(actual_seq_qlen);
  p.actual_seq_kvlen = int_list(actual_seq_kvlen);
  return p;
}

// nsa::validate_select_attention before anything is allocated (its output pointers are checked for non-null
// only: placeholders); raises the library's message.
nsa::SelectAttentionShape validate(const nsa::SelectAttentionParams& params) {
  nsa::SelectAttentionParams p = params;
  static float placeholder = 0.0f;
  p.attention_out = &placeholder;
  p.softmax_max = &placeholder;
  p.softmax_sum = &placeholder;
  nsa::SelectAttentionShape sh;
  const nsa::Status st = nsa::validate_select_attention(p, &sh);
  TORCH_CHECK(st.ok(), st.message());
  return sh;
}

// ------------------------------------------------------------------ CPU forward
using Forward = nsa::Status (*)(const nsa::SelectAttentionParams&, const nsa::CpuOptions&);

nsa::Status reference_forward(const nsa::SelectAttentionParams& p, const nsa::CpuOptions&) {
  return nsa::select_attention_reference(p);
}

SelectResult forward_cpu(Forward backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                         int64_t select_block_size, int64_t select_block_count, const OptTensor& atten_mask,
                         OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  check_inputs(query, key, value, topk_indices, head_num, atten_mask);
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}, {&topk_indices, "topk_indices"}}, atten_mask,
                c10::DeviceType::CPU, "CPU");
  nsa::SelectAttentionParams p = make_params(query, key, value, topk_indices, scale_value, head_num,
                                             select_block_size, select_block_count, atten_mask, actual_seq_qlen,
                                             actual_seq_kvlen);
  const nsa::SelectAttentionShape sh = validate(p);  // raises before any allocation
  at::Tensor out = empty_output({sh.T1, sh.N1, sh.Dv}, query.options());
  at::Tensor smax = empty_output({sh.T1, sh.N1, 8}, query.options().dtype(at::kFloat));
  at::Tensor ssum = empty_output({sh.T1, sh.N1, 8}, query.options().dtype(at::kFloat));
  p.attention_out = out.mutable_data_ptr();
  p.softmax_max = smax.mutable_data_ptr<float>();
  p.softmax_sum = ssum.mutable_data_ptr<float>();
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {out, smax, ssum};
}

SelectResult select_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                  int64_t select_block_size, int64_t select_block_count, const OptTensor& atten_mask,
                                  OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  return forward_cpu(&nsa::select_attention_cpu, query, key, value, topk_indices, scale_value, head_num,
                     select_block_size, select_block_count, atten_mask, actual_seq_qlen, actual_seq_kvlen);
}

SelectResult select_attention_reference_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                            int64_t select_block_size, int64_t select_block_count,
                                            const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                            OptIntList actual_seq_kvlen) {
  return forward_cpu(&reference_forward, query, key, value, topk_indices, scale_value, head_num, select_block_size,
                     select_block_count, atten_mask, actual_seq_qlen, actual_seq_kvlen);
}

SelectResult select_attention_tensor_lengths_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const at::Tensor& topk_indices,
                                                 double scale_value, int64_t head_num, int64_t select_block_size,
                                                 int64_t select_block_count, const OptTensor& atten_mask,
                                                 const OptTensor& actual_seq_qlen, const OptTensor& actual_seq_kvlen) {
  std::vector<int64_t> q, kv;
  return select_attention_cpu(query, key, value, topk_indices, scale_value, head_num, select_block_size,
                              select_block_count, atten_mask, lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                              lengths_from_tensor(actual_seq_kvlen, "actual_seq_kvlen", kv));
}

// ------------------------------------------------------------------ Meta forward
void check_meta_lengths(const at::Tensor& query, std::initializer_list<std::pair<const OptTensor*, const char*>> ls) {
  for (const auto& [t, name] : ls) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& x = **t;
    TORCH_CHECK(x.dim() == 1, name, " must be a 1-D integer tensor (prefix sums, one per batch), got a ", x.dim(),
                "-D tensor");
    TORCH_CHECK(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt, name,
                " must be an int64 or int32 tensor, got ", x.scalar_type());
    TORCH_CHECK(x.device().is_cpu() || x.device() == query.device(), name,
                " must be a CPU tensor (the lengths are read on the host), got ", x.device());
  }
}

SelectResult select_attention_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& topk_indices, double /*scale_value*/, int64_t head_num,
                                   int64_t select_block_size, int64_t select_block_count,
                                   const OptTensor& atten_mask, OptIntList /*actual_seq_qlen*/,
                                   OptIntList /*actual_seq_kvlen*/) {
  check_inputs(query, key, value, topk_indices, head_num, atten_mask);
  const std::string device = c10::DeviceTypeName(query.device().type());
  check_devices({{&key, "key"}, {&value, "value"}, {&topk_indices, "topk_indices"}}, atten_mask,
                query.device().type(), device.c_str());
  TORCH_CHECK(select_block_size >= 1, "select_block_size must be >= 1, got ", select_block_size);
  TORCH_CHECK(select_block_count >= 1, "select_block_count must be >= 1, got ", select_block_count);
  const auto k = topk_indices.sym_size(2).maybe_as_int();
  if (k) {
    TORCH_CHECK(*k == select_block_count, "topk_indices must have select_block_count = ", select_block_count,
                " as its last dimension, got shape ", topk_indices.sym_sizes());
  }
  const c10::SymInt T1 = query.sym_size(0), N1 = query.sym_size(1), Dv = value.sym_size(2);
  const auto opts = query.options();
  return {at::empty_symint({T1, N1, Dv}, opts), at::empty_symint({T1, N1, 8}, opts.dtype(at::kFloat)),
          at::empty_symint({T1, N1, 8}, opts.dtype(at::kFloat))};
}

SelectResult select_attention_tensor_lengths_meta(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const at::Tensor& topk_indices,
                                                  double scale_value, int64_t head_num, int64_t select_block_size,
                                                  int64_t select_block_count, const OptTensor& atten_mask,
                                                  const OptTensor& actual_seq_qlen,
                                                  const OptTensor& actual_seq_kvlen) {
  check_meta_lengths(query, {{&actual_seq_qlen, "actual_seq_qlen"}, {&actual_seq_kvlen, "actual_seq_kvlen"}});
  return select_attention_meta(query, key, value, topk_indices, scale_value, head_num, select_block_size,
                               select_block_count, atten_mask, std::nullopt, std::nullopt);
}

// ------------------------------------------------------------------ backward: CPU and Meta
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Backward = nsa::Status (*)(const nsa::SelectAttentionGradParams&, const nsa::CpuOptions&);

nsa::Status reference_backward(const nsa::SelectAttentionGradParams& p, const nsa::CpuOptions&) {
  return nsa::select_attention_backward_reference(p);
}

Grads backward_cpu(Backward backend, const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
                   const at::Tensor& value, const at::Tensor& attention_out, const at::Tensor& softmax_max,
                   const at::Tensor& softmax_sum, const at::Tensor& topk_indices, double scale_value,
                   int64_t head_num, int64_t select_block_size, int64_t select_block_count,
                   const OptTensor& atten_mask, OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  check_inputs(query, key, value, topk_indices, head_num, atten_mask);
  check_backward_inputs(grad, query, value, attention_out, softmax_max, softmax_sum);
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}, {&topk_indices, "topk_indices"}, {&grad, "grad"},
                 {&attention_out, "attention_out"}, {&softmax_max, "softmax_max"}, {&softmax_sum, "softmax_sum"}},
                atten_mask, c10::DeviceType::CPU, "CPU");
  nsa::SelectAttentionGradParams g;
  g.fwd = make_params(query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
                      atten_mask, actual_seq_qlen, actual_seq_kvlen);
  validate(g.fwd);  // raises before any allocation
  g.grad = view(grad);
  g.attention_out = view(attention_out);
  g.softmax_max = view(softmax_max);
  g.softmax_sum = view(softmax_sum);
  // the backward's own rules (shapes of grad, attention_out and the statistics), before any allocation
  {
    nsa::SelectAttentionGradParams probe = g;
    static char placeholder = 0;
    probe.grad_query = probe.grad_key = probe.grad_value = &placeholder;
    const nsa::Status st = nsa::validate_select_attention_backward(probe, nullptr);
    TORCH_CHECK(st.ok(), st.message());
  }
  at::Tensor dq = empty_output(query.sizes(), query.options());
  at::Tensor dk = empty_output(key.sizes(), key.options());
  at::Tensor dv = empty_output(value.sizes(), value.options());
  g.grad_query = dq.mutable_data_ptr();
  g.grad_key = dk.mutable_data_ptr();
  g.grad_value = dv.mutable_data_ptr();
  const nsa::Status st = backend(g, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {dq, dk, dv};
}

Grads select_attention_backward_cpu(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& attention_out,
                                    const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                                    const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                    int64_t select_block_size, int64_t select_block_count,
                                    const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                    OptIntList actual_seq_kvlen) {
  return backward_cpu(&nsa::select_attention_backward_cpu, grad, query, key, value, attention_out, softmax_max,
                      softmax_sum, topk_indices, scale_value, head_num, select_block_size, select_block_count,
                      atten_mask, actual_seq_qlen, actual_seq_kvlen);
}

Grads select_attention_backward_reference_cpu(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
                                              const at::Tensor& value, const at::Tensor& attention_out,
                                              const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                                              const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                              int64_t select_block_size, int64_t select_block_count,
                                              const OptTensor& atten_mask, OptIntList actual_seq_qlen,
                                              OptIntList actual_seq_kvlen) {
  return backward_cpu(&reference_backward, grad, query, key, value, attention_out, softmax_max, softmax_sum,
                      topk_indices, scale_value, head_num, select_block_size, select_block_count, atten_mask,
                      actual_seq_qlen, actual_seq_kvlen);
}

Grads select_attention_backward_tensor_lengths_cpu(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attention_out, const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
    const at::Tensor& topk_indices, double scale_value, int64_t head_num, int64_t select_block_size,
    int64_t select_block_count, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_seq_kvlen) {
  std::vector<int64_t> q, kv;
  return select_attention_backward_cpu(grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices,
                                       scale_value, head_num, select_block_size, select_block_count, atten_mask,
                                       lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                                       lengths_from_tensor(actual_seq_kvlen, "actual_seq_kvlen", kv));
}

Grads select_attention_backward_meta(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& attention_out,
                                     const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                                     const at::Tensor& topk_indices, double /*scale_value*/, int64_t head_num,
                                     int64_t /*select_block_size*/, int64_t /*select_block_count*/,
                                     const OptTensor& atten_mask, OptIntList /*actual_seq_qlen*/,
                                     OptIntList /*actual_seq_kvlen*/) {
  check_inputs(query, key, value, topk_indices, head_num, atten_mask);
  check_backward_inputs(grad, query, value, attention_out, softmax_max, softmax_sum);
  return {at::empty_symint(query.sym_sizes(), query.options()), at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options())};
}

Grads select_attention_backward_tensor_lengths_meta(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attention_out, const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
    const at::Tensor& topk_indices, double scale_value, int64_t head_num, int64_t select_block_size,
    int64_t select_block_count, const OptTensor& atten_mask, const OptTensor& actual_seq_qlen,
    const OptTensor& actual_seq_kvlen) {
  check_meta_lengths(query, {{&actual_seq_qlen, "actual_seq_qlen"}, {&actual_seq_kvlen, "actual_seq_kvlen"}});
  return select_attention_backward_meta(grad, query, key, value, attention_out, softmax_max, softmax_sum,
                                        topk_indices, scale_value, head_num, select_block_size, select_block_count,
                                        atten_mask, std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("select_attention", &nsa_torch::select_attention_cpu);
  m.impl("select_attention.tensor_lengths", &nsa_torch::select_attention_tensor_lengths_cpu);
  m.impl("select_attention_reference", &nsa_torch::select_attention_reference_cpu);
  m.impl("select_attention_backward", &nsa_torch::select_attention_backward_cpu);
  m.impl("select_attention_backward.tensor_lengths", &nsa_torch::select_attention_backward_tensor_lengths_cpu);
  m.impl("select_attention_backward_reference", &nsa_torch::select_attention_backward_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("select_attention", &nsa_torch::select_attention_meta);
  m.impl("select_attention.tensor_lengths", &nsa_torch::select_attention_tensor_lengths_meta);
  m.impl("select_attention_reference", &nsa_torch::select_attention_meta);
  m.impl("select_attention_backward", &nsa_torch::select_attention_backward_meta);
  m.impl("select_attention_backward.tensor_lengths", &nsa_torch::select_attention_backward_tensor_lengths_meta);
  m.impl("select_attention_backward_reference", &nsa_torch::select_attention_backward_meta);
}
