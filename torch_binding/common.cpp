// Checks and tensor -> params mapping shared by the backend kernels (see binding.h).
#include "binding.h"
#include "output_cache.h"

#include <c10/util/Exception.h>

namespace nsa_torch {
namespace {

// A size that may be symbolic (Meta tensors under torch.compile): its value when it is concrete.
std::optional<int64_t> concrete(const c10::SymInt& s) { return s.maybe_as_int(); }

void check_qkv(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 3, name, " must be a 3-D tensor ", layout, ", got a ", t.dim(), "-D tensor of shape ",
              t.sym_sizes());
  const auto numel = concrete(t.sym_numel());
  TORCH_CHECK(!numel || *numel > 0, name, " must not be empty, got shape ", t.sym_sizes());
}

void check_mask(const OptTensor& m, const char* name, const char* layout) {
  if (!m.has_value() || !m->defined()) return;
  TORCH_CHECK(m->dim() == 2, name, " must be a 2-D tensor ", layout, ", got a ", m->dim(), "-D tensor of shape ",
              m->sym_sizes());
  const auto type = m->scalar_type();
  TORCH_CHECK(type == at::kBool || type == at::kByte, name, " must be a bool (or uint8) tensor, got ", type);
}

const uint8_t* mask_data(const OptTensor& m, nsa::Mask2* out) {
  if (!m.has_value() || !m->defined()) return nullptr;
  // bool storage is one byte per element (0 or 1): read it as uint8 (docs/spec/compress_attention.md §2). A present but empty mask
  // has no storage (null data pointer), which the library would read as "absent": point it at a
  // placeholder so that its shape is checked (and rejected: maxSq, maxC >= 1).
  static const uint8_t kEmptyMask = 0;
  const auto* data = m->numel() == 0 ? &kEmptyMask : static_cast<const uint8_t*>(m->const_data_ptr());
  for (int i = 0; i < 2; ++i) {
    out->size[i] = m->size(i);
    out->stride[i] = m->stride(i);
  }
  out->data = data;
  return data;
}

nsa::IntList int_list(OptIntList l) {
  nsa::IntList out;
  if (!l.has_value()) return out;
  // An empty list keeps a non-null pointer so that the library reports "at least one element".
  static const int64_t kEmpty = 0;
  out.data = l->empty() ? &kEmpty : l->data();
  out.size = static_cast<int64_t>(l->size());
  return out;
}

}  // namespace

nsa::Tensor3 view3(const at::Tensor& t) {
  nsa::Tensor3 v;
  v.data = t.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    v.size[i] = t.size(i);
    v.stride[i] = t.stride(i);
  }
  return v;
}

nsa::DType to_nsa_dtype(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kBFloat16: return nsa::DType::kBF16;
    case at::kHalf: return nsa::DType::kF16;
    case at::kFloat: return nsa::DType::kF32;
    case at::kDouble: return nsa::DType::kF64;
    default: break;
  }
  TORCH_CHECK(false, name, " must be bfloat16, float16, float32 or float64 (a testing extension), got ", type);
  return nsa::DType::kF32;  // not reached
}

void check_forward_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          int64_t head_num, const OptTensor& topk_mask, const OptTensor& atten_mask) {
  check_qkv(query, "query", "[T, N1, D]");
  check_qkv(key, "key", "[T2, N2, D]");
  check_qkv(value, "value", "[T2, N2, D2]");
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (", query.scalar_type(),
              "), got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == query.scalar_type(), "value must have the dtype of query (",
              query.scalar_type(), "), got ", value.scalar_type());
  check_mask(topk_mask, "topk_mask", "[maxSq, maxSel]");
  check_mask(atten_mask, "atten_mask", "[maxSq, maxC]");
  // Head counts, where the sizes are concrete (the full rules are in nsa::validate_compress_attention).
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

void check_forward_devices(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const OptTensor& topk_mask, const OptTensor& atten_mask, c10::DeviceType device_type,
                           const char* backend) {
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().type() == device_type, name, " must be on the ", backend, " device like the others, got ",
                t.device());
  };
  check(query, "query");
  check(key, "key");
  check(value, "value");
  if (topk_mask.has_value() && topk_mask->defined()) check(*topk_mask, "topk_mask");
  if (atten_mask.has_value() && atten_mask->defined()) check(*atten_mask, "atten_mask");
}

nsa::CompressAttentionParams make_forward_params(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, double scale_value, int64_t head_num,
                                                 int64_t compress_block_size, int64_t compress_stride,
                                                 int64_t select_block_size, int64_t select_block_count,
                                                 const OptTensor& topk_mask, const OptTensor& atten_mask,
                                                 OptIntList actual_seq_qlen, OptIntList actual_cmp_seq_kvlen,
                                                 OptIntList actual_sel_seq_kvlen) {
  nsa::CompressAttentionParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.query = view3(query);
  p.key = view3(key);
  p.value = view3(value);
  p.scale_value = scale_value;
  p.head_num = head_num;
  p.compress_block_size = compress_block_size;
  p.compress_stride = compress_stride;
  p.select_block_size = select_block_size;
  p.select_block_count = select_block_count;
  mask_data(topk_mask, &p.topk_mask);
  mask_data(atten_mask, &p.atten_mask);
  p.actual_seq_qlen = int_list(actual_seq_qlen);
  p.actual_cmp_seq_kvlen = int_list(actual_cmp_seq_kvlen);
  p.actual_sel_seq_kvlen = int_list(actual_sel_seq_kvlen);
  return p;
}

nsa::CompressAttentionShape validate_forward_params(const nsa::CompressAttentionParams& params) {
  // The outputs do not exist yet: point them at a placeholder, never written (validation only
  // checks that they are set).
  static float placeholder[1];
  static int32_t placeholder_i[1];
  nsa::CompressAttentionParams p = params;
  p.attention_out = placeholder;
  p.topk_indices = placeholder_i;
  p.softmax_max = placeholder;
  p.softmax_sum = placeholder;
  nsa::CompressAttentionShape shape;
  const nsa::Status st = nsa::validate_compress_attention(p, &shape);
  TORCH_CHECK(st.ok(), st.message());
  return shape;
}

ForwardResult allocate_forward_outputs(nsa::CompressAttentionParams& params, const nsa::CompressAttentionShape& sh,
                                       const at::Tensor& query) {
  const auto opts = query.options();
  at::Tensor out = empty_output({sh.T, sh.N1, sh.D2}, opts);
  at::Tensor topk = empty_output({sh.T, sh.N2, sh.K}, opts.dtype(at::kInt));
  // [T, N1, 8] declared; the memory is the per-batch layout of docs/spec/compress_attention.md §4, written by the library.
  at::Tensor smax = empty_output({sh.T, sh.N1, 8}, opts.dtype(at::kFloat));
  at::Tensor ssum = empty_output({sh.T, sh.N1, 8}, opts.dtype(at::kFloat));
  params.attention_out = out.mutable_data_ptr();
  params.topk_indices = topk.mutable_data_ptr<int32_t>();
  params.softmax_max = smax.mutable_data_ptr<float>();
  params.softmax_sum = ssum.mutable_data_ptr<float>();
  return {out, topk, smax, ssum};
}

OptIntList lengths_from_tensor(const OptTensor& t, const char* name, std::vector<int64_t>& storage) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1, name, " must be a 1-D integer tensor (prefix sums, one per batch), got a ", t->dim(),
              "-D tensor");
  const auto type = t->scalar_type();
  TORCH_CHECK(type == at::kLong || type == at::kInt, name, " must be an int64 or int32 tensor, got ", type);
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor (the lengths are read on the host), got ",
              t->device());
  const int64_t n = t->size(0);
  storage.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    storage[i] = type == at::kLong ? t->const_data_ptr<int64_t>()[i * t->stride(0)]
                                   : t->const_data_ptr<int32_t>()[i * t->stride(0)];
  return OptIntList(storage);
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value,
                           const at::Tensor& attention_out, const at::Tensor& softmax_max,
                           const at::Tensor& softmax_sum) {
  auto check_like_out = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 3, name, " must be a 3-D tensor [T, N1, D2], got shape ", t.sym_sizes());
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the dtype of query (", query.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.sym_size(0) == query.sym_size(0) && t.sym_size(1) == query.sym_size(1) &&
                    t.sym_size(2) == value.sym_size(2),
                name, " must have shape [T, N1, D2] = [", query.sym_size(0), ", ", query.sym_size(1), ", ",
                value.sym_size(2), "], got ", t.sym_sizes());
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(attention_out, "attention_out");
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.sym_size(0) == query.sym_size(0) && t.sym_size(1) == query.sym_size(1) &&
                    t.sym_size(2) == 8,
                name, " must have shape [T, N1, 8], got ", t.sym_sizes());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the per-batch layout of docs/spec/compress_attention.md §4 as returned)");
  };
  check_stat(softmax_max, "softmax_max");
  check_stat(softmax_sum, "softmax_sum");
}

}  // namespace nsa_torch
