// torch.ops.nsa.window_attention* and sliding_window_attention* (torch_npu.npu_fusion_attention /
// npu_fusion_attention_grad, TND subset; docs/spec/window_attention.md): the schemas and every dispatch key, as thin
// adapters from tensors to the torch-free library (include/nsa/window_attention.h).
//
// window_attention: the forward with explicit arguments (what the Python drop-in npu_fusion_attention calls after
// its own checks of the arguments that have no C++ counterpart: input_layout, pse, keep_prob, ...); overload
// .tensor_lengths takes the two prefix-sum lists as 1-D integer CPU tensors (read inside the kernel: under
// torch.compile new lengths are new tensor values, not new constants). window_attention_reference: the same
// schema computed by the plain-loop reference (the oracle). window_attention_backward (+ .tensor_lengths,
// _reference): dq, dk, dv of §7. sliding_window_attention(_backward): §8, with cu_seqlens as a tensor (its checks
// name cu_seqlens) and the compressed mask of mode 4 implied.
// Meta kernels (shapes and dtypes only; the fake kernels of torch.compile): [T1, N1, Dv] in the query's dtype and
// [T1, N1, 8] float32 twice; the gradients take the shapes of query, key and value.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "binding.h"
#include "nsa/window_attention.h"
#include "output_cache.h"

#define NSA_WINDOW_ARGS(LENGTHS)                                                                     \
  "(Tensor query, Tensor key, Tensor value, int head_num, float scale, Tensor? atten_mask, "      \
  "int sparse_mode, int pre_tockens, int next_tockens, int inner_precise, " LENGTHS               \
  " actual_seq_qlen, " LENGTHS " actual_seq_kvlen, str softmax_layout) "                          \
  "-> (Tensor attention_out, Tensor softmax_max, Tensor softmax_sum)"

#define NSA_WINDOW_BACKWARD_ARGS(LENGTHS)                                                            \
  "(Tensor dy, Tensor query, Tensor key, Tensor value, Tensor attention_in, Tensor softmax_max, " \
  "Tensor softmax_sum, int head_num, float scale, Tensor? atten_mask, int sparse_mode, "          \
  "int pre_tockens, int next_tockens, int inner_precise, " LENGTHS " actual_seq_qlen, " LENGTHS   \
  " actual_seq_kvlen, str softmax_layout) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("window_attention" NSA_WINDOW_ARGS("int[]?"));
  m.def("window_attention.tensor_lengths" NSA_WINDOW_ARGS("Tensor?"));
  m.def("window_attention_reference" NSA_WINDOW_ARGS("int[]?"));
  m.def("window_attention_backward" NSA_WINDOW_BACKWARD_ARGS("int[]?"));
  m.def("window_attention_backward.tensor_lengths" NSA_WINDOW_BACKWARD_ARGS("Tensor?"));
  m.def("window_attention_backward_reference" NSA_WINDOW_BACKWARD_ARGS("int[]?"));
  m.def(
      "sliding_window_attention(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens, int window, float scale) "
      "-> (Tensor attention_out, Tensor softmax_max, Tensor softmax_sum)");
  m.def(
      "sliding_window_attention_backward(Tensor dy, Tensor query, Tensor key, Tensor value, Tensor attention_out, "
      "Tensor softmax_max, Tensor softmax_sum, Tensor cu_seqlens, int window, float scale) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

namespace nsa_torch {
namespace {

using WindowResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ------------------------------------------------------------------ checks shared by every kernel (Meta included)
std::optional<int64_t> concrete(const c10::SymInt& s) { return s.maybe_as_int(); }

void check_qkv(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 3, name, " must be a 3-D tensor ", layout, " (input_layout \"TND\"), got a ", t.dim(),
              "-D tensor of shape ", t.sym_sizes());
  const auto numel = concrete(t.sym_numel());
  TORCH_CHECK(!numel || *numel > 0, name, " must not be empty, got shape ", t.sym_sizes());
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t head_num,
                  const OptTensor& atten_mask) {
  check_qkv(query, "query", "[T1, N1, D]");
  check_qkv(key, "key", "[T2, N2, D]");
  check_qkv(value, "value", "[T2, N2, Dv]");
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (", query.scalar_type(),
              "), got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == query.scalar_type(), "value must have the dtype of query (",
              query.scalar_type(), "), got ", value.scalar_type());
  if (atten_mask.has_value() && atten_mask->defined()) {
    const at::Tensor& m = *atten_mask;
    TORCH_CHECK(m.dim() == 2, "atten_mask must be a 2-D tensor ([maxSq, maxSkv] in sparse_mode 0/1, the [2048, 2048] ",
                "compressed mask in modes 2-4), got a ", m.dim(), "-D tensor of shape ", m.sym_sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte,
                "atten_mask must be a bool (or uint8) tensor, got ", m.scalar_type());
  }
  TORCH_CHECK(head_num > 0, "head_num must be > 0, got ", head_num);
  const auto n1 = concrete(query.sym_size(1)), n2 = concrete(key.sym_size(1));
  if (n1) {
    TORCH_CHECK(head_num == *n1, "head_num must equal the number of query heads query.size(1) = ", *n1, ", got ",
                head_num);
  }
  if (n1 && n2) {
    TORCH_CHECK(*n1 % *n2 == 0, "the number of query heads (", *n1,
                ") must be a multiple of the number of key/value heads key.size(1) = ", *n2);
  }
}

void check_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors, c10::DeviceType type,
                   const char* backend) {
  for (const auto& [t, name] : tensors)
    if (t != nullptr && t->defined())
      TORCH_CHECK(t->device().type() == type, name, " must be on the ", backend, " device like the others, got ",
                  t->device());
}

nsa::StatsLayout stats_layout(const std::string& s) {
  if (s.empty()) return nsa::StatsLayout::kPerBatch;
  TORCH_CHECK(s == "TND", "softmax_layout must be \"\" (per batch) or \"TND\", got \"", s, "\"");
  return nsa::StatsLayout::kTnd;
}

void check_grad_inputs(const at::Tensor& dy, const at::Tensor& query, const at::Tensor& value,
                       const at::Tensor& attention_in, const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                       const char* out_name) {
  auto like_out = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined(), name, " must be given");
    TORCH_CHECK(t.dim() == 3, name, " must be a 3-D tensor [T1, N1, Dv], got shape ", t.sym_sizes());
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the dtype of query (", query.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.sym_size(0) == query.sym_size(0) && t.sym_size(1) == query.sym_size(1) &&
                    t.sym_size(2) == value.sym_size(2),
                name, " must have shape [T1, N1, Dv] = [", query.sym_size(0), ", ", query.sym_size(1), ", ",
                value.sym_size(2), "], got ", t.sym_sizes());
  };
  like_out(dy, "dy");
  like_out(attention_in, out_name);
  auto stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined(), name, " must be given");
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.sym_size(0) == query.sym_size(0) && t.sym_size(1) == query.sym_size(1) &&
                    t.sym_size(2) == 8,
                name, " must have shape [T1, N1, 8], got ", t.sym_sizes());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the statistics as the forward returned them)");
  };
  stat(softmax_max, "softmax_max");
  stat(softmax_sum, "softmax_sum");
}

// The library's params from the tensors (read in place, any strides); output pointers left null.
nsa::WindowAttentionParams make_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       int64_t head_num, double scale, const OptTensor& atten_mask,
                                       int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise,
                                       OptIntList seq_q, OptIntList seq_kv, const std::string& softmax_layout) {
  nsa::WindowAttentionParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.query = view3(query);
  p.key = view3(key);
  p.value = view3(value);
  p.head_num = head_num;
  p.scale = scale;
  p.sparse_mode = sparse_mode;
  p.pre_tockens = pre;
  p.next_tockens = next;
  p.inner_precise = inner_precise;
  p.softmax_layout = stats_layout(softmax_layout);
  if (atten_mask.has_value() && atten_mask->defined()) {
    // bool storage is one byte per element (0 or 1), read as uint8. A present but empty mask has no storage: a
    // placeholder pointer keeps it "present" so that its shape is checked (and rejected).
    static const uint8_t kEmpty = 0;
    const at::Tensor& m = *atten_mask;
    p.atten_mask.data = m.numel() == 0 ? &kEmpty : static_cast<const uint8_t*>(m.const_data_ptr());
    for (int i = 0; i < 2; ++i) {
      p.atten_mask.size[i] = m.size(i);
      p.atten_mask.stride[i] = m.stride(i);
    }
  }
  static const int64_t kEmptyList = 0;
  if (seq_q.has_value()) p.actual_seq_qlen = {seq_q->empty() ? &kEmptyList : seq_q->data(), static_cast<int64_t>(seq_q->size())};
  if (seq_kv.has_value())
    p.actual_seq_kvlen = {seq_kv->empty() ? &kEmptyList : seq_kv->data(), static_cast<int64_t>(seq_kv->size())};
  return p;
}

// nsa::validate_window_attention before anything is allocated (placeholders for the outputs, never written).
nsa::WindowAttentionShape validate(const nsa::WindowAttentionParams& params) {
  static float placeholder[1];
  nsa::WindowAttentionParams p = params;
  p.attention_out = placeholder;
  p.softmax_max = placeholder;
  p.softmax_sum = placeholder;
  nsa::WindowAttentionShape sh;
  const nsa::Status st = nsa::validate_window_attention(p, &sh);
  TORCH_CHECK(st.ok(), st.message());
  return sh;
}

using ForwardBackend = nsa::Status (*)(const nsa::WindowAttentionParams&, const nsa::CpuOptions&);
using BackwardBackend = nsa::Status (*)(const nsa::WindowAttentionGradParams&, const nsa::CpuOptions&);

nsa::Status forward_reference(const nsa::WindowAttentionParams& p, const nsa::CpuOptions&) {
  return nsa::window_attention_reference(p);
}
nsa::Status backward_reference(const nsa::WindowAttentionGradParams& p, const nsa::CpuOptions&) {
  return nsa::window_attention_backward_reference(p);
}

WindowResult run_forward(ForwardBackend backend, nsa::WindowAttentionParams& p, const at::Tensor& query) {
  const nsa::WindowAttentionShape sh = validate(p);  // raises before any allocation
  const auto opts = query.options();
  at::Tensor out = empty_output({sh.T1, sh.N1, sh.Dv}, opts);
  at::Tensor smax = empty_output({sh.T1, sh.N1, 8}, opts.dtype(at::kFloat));
  at::Tensor ssum = empty_output({sh.T1, sh.N1, 8}, opts.dtype(at::kFloat));
  p.attention_out = out.mutable_data_ptr();
  p.softmax_max = smax.mutable_data_ptr<float>();
  p.softmax_sum = ssum.mutable_data_ptr<float>();
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {out, smax, ssum};
}

WindowResult run_backward(BackwardBackend backend, nsa::WindowAttentionGradParams& g, const at::Tensor& dy,
                          const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& attention_in, const at::Tensor& softmax_max,
                          const at::Tensor& softmax_sum) {
  validate(g.fwd);  // raises before any allocation
  g.attention_in = view3(attention_in);
  g.dy = view3(dy);
  g.softmax_max = softmax_max.const_data_ptr<float>();
  g.softmax_sum = softmax_sum.const_data_ptr<float>();
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

// ------------------------------------------------------------------ CPU: window_attention
WindowResult forward_cpu_impl(ForwardBackend backend, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, int64_t head_num, double scale, const OptTensor& atten_mask,
                              int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise, OptIntList seq_q,
                              OptIntList seq_kv, const std::string& softmax_layout) {
  check_inputs(query, key, value, head_num, atten_mask);
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"},
                 {atten_mask.has_value() ? &*atten_mask : nullptr, "atten_mask"}},
                c10::DeviceType::CPU, "CPU");
  nsa::WindowAttentionParams p = make_params(query, key, value, head_num, scale, atten_mask, sparse_mode, pre, next,
                                             inner_precise, seq_q, seq_kv, softmax_layout);
  return run_forward(backend, p, query);
}

WindowResult window_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  int64_t head_num, double scale, const OptTensor& atten_mask, int64_t sparse_mode,
                                  int64_t pre, int64_t next, int64_t inner_precise, OptIntList seq_q, OptIntList seq_kv,
                                  const std::string& softmax_layout) {
  return forward_cpu_impl(&nsa::window_attention_cpu, query, key, value, head_num, scale, atten_mask, sparse_mode, pre,
                          next, inner_precise, seq_q, seq_kv, softmax_layout);
}

WindowResult window_attention_reference_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                            int64_t head_num, double scale, const OptTensor& atten_mask,
                                            int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise,
                                            OptIntList seq_q, OptIntList seq_kv, const std::string& softmax_layout) {
  return forward_cpu_impl(&forward_reference, query, key, value, head_num, scale, atten_mask, sparse_mode, pre, next,
                          inner_precise, seq_q, seq_kv, softmax_layout);
}

WindowResult window_attention_tensor_lengths_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, int64_t head_num, double scale,
                                                 const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre,
                                                 int64_t next, int64_t inner_precise, const OptTensor& seq_q,
                                                 const OptTensor& seq_kv, const std::string& softmax_layout) {
  std::vector<int64_t> q, kv;
  return window_attention_cpu(query, key, value, head_num, scale, atten_mask, sparse_mode, pre, next, inner_precise,
                              lengths_from_tensor(seq_q, "actual_seq_qlen", q),
                              lengths_from_tensor(seq_kv, "actual_seq_kvlen", kv), softmax_layout);
}

// ------------------------------------------------------------------ CPU: window_attention_backward
WindowResult backward_cpu_impl(BackwardBackend backend, const at::Tensor& dy, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& attention_in,
                               const at::Tensor& softmax_max, const at::Tensor& softmax_sum, int64_t head_num,
                               double scale, const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre,
                               int64_t next, int64_t inner_precise, OptIntList seq_q, OptIntList seq_kv,
                               const std::string& softmax_layout) {
  check_inputs(query, key, value, head_num, atten_mask);
  check_grad_inputs(dy, query, value, attention_in, softmax_max, softmax_sum, "attention_in");
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}, {&dy, "dy"}, {&attention_in, "attention_in"},
                 {&softmax_max, "softmax_max"}, {&softmax_sum, "softmax_sum"},
                 {atten_mask.has_value() ? &*atten_mask : nullptr, "atten_mask"}},
                c10::DeviceType::CPU, "CPU");
  nsa::WindowAttentionGradParams g;
  g.fwd = make_params(query, key, value, head_num, scale, atten_mask, sparse_mode, pre, next, inner_precise, seq_q,
                      seq_kv, softmax_layout);
  return run_backward(backend, g, dy, query, key, value, attention_in, softmax_max, softmax_sum);
}

WindowResult window_attention_backward_cpu(const at::Tensor& dy, const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, const at::Tensor& attention_in,
                                           const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                                           int64_t head_num, double scale, const OptTensor& atten_mask,
                                           int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise,
                                           OptIntList seq_q, OptIntList seq_kv, const std::string& softmax_layout) {
  return backward_cpu_impl(&nsa::window_attention_backward_cpu, dy, query, key, value, attention_in, softmax_max,
                           softmax_sum, head_num, scale, atten_mask, sparse_mode, pre, next, inner_precise, seq_q,
                           seq_kv, softmax_layout);
}

WindowResult window_attention_backward_reference_cpu(const at::Tensor& dy, const at::Tensor& query,
                                                     const at::Tensor& key, const at::Tensor& value,
                                                     const at::Tensor& attention_in, const at::Tensor& softmax_max,
                                                     const at::Tensor& softmax_sum, int64_t head_num, double scale,
                                                     const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre,
                                                     int64_t next, int64_t inner_precise, OptIntList seq_q,
                                                     OptIntList seq_kv, const std::string& softmax_layout) {
  return backward_cpu_impl(&backward_reference, dy, query, key, value, attention_in, softmax_max, softmax_sum,
                           head_num, scale, atten_mask, sparse_mode, pre, next, inner_precise, seq_q, seq_kv,
                           softmax_layout);
}

WindowResult window_attention_backward_tensor_lengths_cpu(
    const at::Tensor& dy, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attention_in, const at::Tensor& softmax_max, const at::Tensor& softmax_sum, int64_t head_num,
    double scale, const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise,
    const OptTensor& seq_q, const OptTensor& seq_kv, const std::string& softmax_layout) {
  std::vector<int64_t> q, kv;
  return window_attention_backward_cpu(dy, query, key, value, attention_in, softmax_max, softmax_sum, head_num, scale,
                                       atten_mask, sparse_mode, pre, next, inner_precise,
                                       lengths_from_tensor(seq_q, "actual_seq_qlen", q),
                                       lengths_from_tensor(seq_kv, "actual_seq_kvlen", kv), softmax_layout);
}

// ------------------------------------------------------------------ CPU: sliding_window_attention (§8)
// cu_seqlens (B+1 entries, leading 0, non-decreasing, last = T; key and value have T rows) and window >= 1, each
// error naming its argument; then the params of §8: mode 4, pre = window - 1, next = 0, the compressed mask
// implied, TND statistics, the lengths cu_seqlens[1:] for queries and keys.
nsa::WindowAttentionParams sliding_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          const at::Tensor& cu_seqlens, int64_t window, double scale,
                                          std::vector<int64_t>& lengths) {
  check_inputs(query, key, value, query.size(1), std::nullopt);
  TORCH_CHECK(window >= 1, "window must be >= 1 (the keys a query sees, itself included), got ", window);
  std::vector<int64_t> cu;
  lengths_from_tensor(cu_seqlens, "cu_seqlens", cu);
  const int64_t T = query.size(0);
  TORCH_CHECK(cu.size() >= 2, "cu_seqlens must have B+1 >= 2 entries (a leading 0, then the running totals), got ",
              cu.size());
  TORCH_CHECK(cu[0] == 0, "cu_seqlens must start with 0, got ", cu[0]);
  for (size_t i = 1; i < cu.size(); ++i)
    TORCH_CHECK(cu[i] >= cu[i - 1], "cu_seqlens must be non-decreasing, but cu_seqlens[", i, "] = ", cu[i],
                " < cu_seqlens[", i - 1, "] = ", cu[i - 1]);
  TORCH_CHECK(cu.back() == T, "cu_seqlens[-1] must equal the number of query rows T = query.size(0) = ", T, ", got ",
              cu.back());
  TORCH_CHECK(key.size(0) == T, "key must have the T = ", T, " rows of query (self-attention), got key.size(0) = ",
              key.size(0));
  lengths.assign(cu.begin() + 1, cu.end());
  nsa::WindowAttentionParams p =
      make_params(query, key, value, query.size(1), scale, std::nullopt, 4, window - 1, 0, 0,
                  OptIntList(lengths), OptIntList(lengths), "TND");
  p.compressed_mask_implied = true;
  return p;
}

WindowResult sliding_window_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          const at::Tensor& cu_seqlens, int64_t window, double scale) {
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}}, c10::DeviceType::CPU, "CPU");
  std::vector<int64_t> lengths;
  nsa::WindowAttentionParams p = sliding_params(query, key, value, cu_seqlens, window, scale, lengths);
  return run_forward(&nsa::window_attention_cpu, p, query);
}

WindowResult sliding_window_attention_backward_cpu(const at::Tensor& dy, const at::Tensor& query,
                                                   const at::Tensor& key, const at::Tensor& value,
                                                   const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                                   const at::Tensor& softmax_sum, const at::Tensor& cu_seqlens,
                                                   int64_t window, double scale) {
  check_grad_inputs(dy, query, value, attention_out, softmax_max, softmax_sum, "attention_out");
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}, {&dy, "dy"}, {&attention_out, "attention_out"},
                 {&softmax_max, "softmax_max"}, {&softmax_sum, "softmax_sum"}},
                c10::DeviceType::CPU, "CPU");
  std::vector<int64_t> lengths;
  nsa::WindowAttentionGradParams g;
  g.fwd = sliding_params(query, key, value, cu_seqlens, window, scale, lengths);
  return run_backward(&nsa::window_attention_backward_cpu, g, dy, query, key, value, attention_out, softmax_max,
                      softmax_sum);
}

// ------------------------------------------------------------------ Meta
void check_lengths_meta(const OptTensor& t, const char* name, const at::Tensor& query) {
  if (!t.has_value() || !t->defined()) return;
  const at::Tensor& x = *t;
  TORCH_CHECK(x.dim() == 1, name, " must be a 1-D integer tensor, got a ", x.dim(), "-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt, name,
              " must be an int64 or int32 tensor, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() || x.device() == query.device(), name,
              " must be a CPU tensor (the lengths are read on the host), got ", x.device());
}

WindowResult forward_shapes(const at::Tensor& query, const at::Tensor& value) {
  const auto opts = query.options();
  const c10::SymInt T = query.sym_size(0), N1 = query.sym_size(1), Dv = value.sym_size(2);
  return {at::empty_symint({T, N1, Dv}, opts), at::empty_symint({T, N1, 8}, opts.dtype(at::kFloat)),
          at::empty_symint({T, N1, 8}, opts.dtype(at::kFloat))};
}

WindowResult window_attention_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   int64_t head_num, double, const OptTensor& atten_mask, int64_t, int64_t, int64_t,
                                   int64_t, OptIntList, OptIntList, const std::string& softmax_layout) {
  check_inputs(query, key, value, head_num, atten_mask);
  stats_layout(softmax_layout);
  const std::string dev = c10::DeviceTypeName(query.device().type());
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"},
                 {atten_mask.has_value() ? &*atten_mask : nullptr, "atten_mask"}},
                query.device().type(), dev.c_str());
  return forward_shapes(query, value);
}

WindowResult window_attention_tensor_lengths_meta(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, int64_t head_num, double scale,
                                                  const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre,
                                                  int64_t next, int64_t inner_precise, const OptTensor& seq_q,
                                                  const OptTensor& seq_kv, const std::string& softmax_layout) {
  check_lengths_meta(seq_q, "actual_seq_qlen", query);
  check_lengths_meta(seq_kv, "actual_seq_kvlen", query);
  return window_attention_meta(query, key, value, head_num, scale, atten_mask, sparse_mode, pre, next, inner_precise,
                               std::nullopt, std::nullopt, softmax_layout);
}

WindowResult window_attention_backward_meta(const at::Tensor& dy, const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value, const at::Tensor& attention_in,
                                            const at::Tensor& softmax_max, const at::Tensor& softmax_sum,
                                            int64_t head_num, double, const OptTensor& atten_mask, int64_t, int64_t,
                                            int64_t, int64_t, OptIntList, OptIntList,
                                            const std::string& softmax_layout) {
  check_inputs(query, key, value, head_num, atten_mask);
  check_grad_inputs(dy, query, value, attention_in, softmax_max, softmax_sum, "attention_in");
  stats_layout(softmax_layout);
  return {at::empty_symint(query.sym_sizes(), query.options()), at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options())};
}

WindowResult window_attention_backward_tensor_lengths_meta(
    const at::Tensor& dy, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attention_in, const at::Tensor& softmax_max, const at::Tensor& softmax_sum, int64_t head_num,
    double scale, const OptTensor& atten_mask, int64_t sparse_mode, int64_t pre, int64_t next, int64_t inner_precise,
    const OptTensor& seq_q, const OptTensor& seq_kv, const std::string& softmax_layout) {
  check_lengths_meta(seq_q, "actual_seq_qlen", query);
  check_lengths_meta(seq_kv, "actual_seq_kvlen", query);
  return window_attention_backward_meta(dy, query, key, value, attention_in, softmax_max, softmax_sum, head_num, scale,
                                        atten_mask, sparse_mode, pre, next, inner_precise, std::nullopt, std::nullopt,
                                        softmax_layout);
}

WindowResult sliding_window_attention_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& cu_seqlens, int64_t window, double) {
  const auto n1 = concrete(query.sym_size(1));
  check_inputs(query, key, value, n1 ? *n1 : 1, std::nullopt);
  check_lengths_meta(cu_seqlens, "cu_seqlens", query);
  TORCH_CHECK(window >= 1, "window must be >= 1 (the keys a query sees, itself included), got ", window);
  return forward_shapes(query, value);
}

WindowResult sliding_window_attention_backward_meta(const at::Tensor& dy, const at::Tensor& query,
                                                    const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& attention_out, const at::Tensor& softmax_max,
                                                    const at::Tensor& softmax_sum, const at::Tensor& cu_seqlens,
                                                    int64_t window, double scale) {
  sliding_window_attention_meta(query, key, value, cu_seqlens, window, scale);
  check_grad_inputs(dy, query, value, attention_out, softmax_max, softmax_sum, "attention_out");
  return {at::empty_symint(query.sym_sizes(), query.options()), at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options())};
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("window_attention", &nsa_torch::window_attention_cpu);
  m.impl("window_attention.tensor_lengths", &nsa_torch::window_attention_tensor_lengths_cpu);
  m.impl("window_attention_reference", &nsa_torch::window_attention_reference_cpu);
  m.impl("window_attention_backward", &nsa_torch::window_attention_backward_cpu);
  m.impl("window_attention_backward.tensor_lengths", &nsa_torch::window_attention_backward_tensor_lengths_cpu);
  m.impl("window_attention_backward_reference", &nsa_torch::window_attention_backward_reference_cpu);
  m.impl("sliding_window_attention", &nsa_torch::sliding_window_attention_cpu);
  m.impl("sliding_window_attention_backward", &nsa_torch::sliding_window_attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("window_attention", &nsa_torch::window_attention_meta);
  m.impl("window_attention.tensor_lengths", &nsa_torch::window_attention_tensor_lengths_meta);
  m.impl("window_attention_reference", &nsa_torch::window_attention_meta);
  m.impl("window_attention_backward", &nsa_torch::window_attention_backward_meta);
  m.impl("window_attention_backward.tensor_lengths", &nsa_torch::window_attention_backward_tensor_lengths_meta);
  m.impl("window_attention_backward_reference", &nsa_torch::window_attention_backward_meta);
  m.impl("sliding_window_attention", &nsa_torch::sliding_window_attention_meta);
  m.impl("sliding_window_attention_backward", &nsa_torch::sliding_window_attention_backward_meta);
}
