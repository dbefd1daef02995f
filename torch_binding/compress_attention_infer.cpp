// torch.ops.nsa.compress_attention_infer (torch_npu.npu_nsa_compress_attention_infer; docs/spec/decode.md §3): the
// schemas and the CPU and Meta kernels, as thin adapters from tensors to the torch-free library
// (nsa/compress_attention_infer.h).
//
// Schema: torch_npu's arguments, order and defaults, without its keyword-only marker (torch.library's
// register_autograd refuses keyword-only tensors; the Python drop-in keeps the marker); returns
// (attention_out, topk_indices).
// Overload .tensor_lengths takes the three length lists as 1-D integer CPU tensors (a decode step's new lengths are
// new tensor values, not new constants: no recompilation per step under torch.compile).
// compress_attention_infer_reference: the same schema computed by the library's plain-loop reference (the tests'
// oracle). atten_mask: only its presence is used (§3 step 3); topk_mask is ignored (§3 table). Meta kernels: the
// output shapes follow from the input shapes alone (TND [T, N1, Dv] / [T, N2, K]; BSND [B, Sq, N1, Dv] /
// [B, Sq, N2, K] with Dv = value.shape[2] / N2). No autograd kernel here: the Python package registers one whose
// backward raises (the operator has no derivative).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding.h"
#include "decode_args.h"
#include "nsa/compress_attention_infer.h"

#define NSA_CAI_ARGS(LENGTHS)                                                                                        \
  "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, int key_value_head_num, "               \
  "int select_block_size, int select_block_count, int page_block_size, int compress_block_size, "                     \
  "int compress_stride, str layout='TND', Tensor? atten_mask=None, Tensor? block_table=None, "                     \
  "Tensor? topk_mask=None, " LENGTHS " actual_seq_qlen=None, " LENGTHS " actual_cmp_seq_kvlen=None, " LENGTHS        \
  " actual_sel_seq_kvlen=None) -> (Tensor attention_out, Tensor topk_indices)"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("compress_attention_infer" NSA_CAI_ARGS("int[]?"));
  m.def("compress_attention_infer.tensor_lengths" NSA_CAI_ARGS("Tensor?"));
  m.def("compress_attention_infer_reference" NSA_CAI_ARGS("int[]?"));
}

namespace nsa_torch {
namespace {

using decode::OptIntList;
using decode::OptTensor;
using Result = std::tuple<at::Tensor, at::Tensor>;

nsa::DecodeLayout parse_layout(const std::string& layout) {
  if (layout == "TND") return nsa::DecodeLayout::kTND;
  if (layout == "BSND") return nsa::DecodeLayout::kBSND;
  TORCH_CHECK(false, "layout must be \"TND\" or \"BSND\", got \"", layout, "\"");
  return nsa::DecodeLayout::kTND;
}

// Ranks, dtypes and the shape rules that need no lengths; the library checks §3 in full.
void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t head_num,
                  int64_t kv_heads, int64_t K, nsa::DecodeLayout layout, const OptTensor& block_table) {
  const int64_t qdim = layout == nsa::DecodeLayout::kTND ? 3 : 4;
  TORCH_CHECK(query.dim() == qdim, "query must be a ", qdim, "-D tensor ",
              qdim == 3 ? "[T, N1, D] for layout TND" : "[B, Sq, N1, D] for layout BSND", ", got a ", query.dim(),
              "-D tensor of shape ", query.sym_sizes());
  TORCH_CHECK(key.dim() == 3, "key must be a 3-D tensor [num_pages, page_block_size, N2 * D], got a ", key.dim(),
              "-D tensor of shape ", key.sym_sizes());
  TORCH_CHECK(value.dim() == 3, "value must be a 3-D tensor [num_pages, page_block_size, N2 * Dv], got a ",
              value.dim(), "-D tensor of shape ", value.sym_sizes());
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (", query.scalar_type(),
              "), got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == query.scalar_type(), "value must have the dtype of query (", query.scalar_type(),
              "), got ", value.scalar_type());
  TORCH_CHECK(kv_heads >= 1, "key_value_head_num must be >= 1, got ", kv_heads);
  TORCH_CHECK(K >= 1, "select_block_count must be >= 1, got ", K);
  TORCH_CHECK(head_num >= 1, "head_num must be >= 1, got ", head_num);
  if (const auto n1 = query.sym_size(qdim - 2).maybe_as_int()) {
    TORCH_CHECK(*n1 == head_num, "head_num (", head_num, ") must equal the number of query heads N1 = query.shape[-2] (",
                *n1, ")");
  }
  if (const auto v = value.sym_size(2).maybe_as_int()) {
    TORCH_CHECK(*v % kv_heads == 0 && *v > 0, "value must have shape [num_pages, page_block_size, N2 * Dv]: its last dim (",
                *v, ") must be a positive multiple of key_value_head_num (", kv_heads, ")");
  }
  if (block_table.has_value() && block_table->defined())
    decode::check_index_tensor(*block_table, "block_table", 2, "[B, max_pages]");
}

using Backend = nsa::Status (*)(const nsa::CompressAttentionInferParams&, const nsa::CpuOptions&);
nsa::Status reference_backend(const nsa::CompressAttentionInferParams& p, const nsa::CpuOptions&) {
  return nsa::compress_attention_infer_reference(p);
}

nsa::Tensor3 view3_of(const at::Tensor& t) {
  nsa::Tensor3 v;
  v.data = t.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    v.size[i] = t.size(i);
    v.stride[i] = t.stride(i);
  }
  return v;
}

Result run_cpu(Backend backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
               int64_t head_num, int64_t kv_heads, int64_t lp, int64_t K, int64_t P, int64_t l, int64_t d,
               const std::string& layout_s, const OptTensor& atten_mask, const OptTensor& block_table,
               OptIntList qlen, OptIntList cmplen, OptIntList sellen) {
  const nsa::DecodeLayout layout = parse_layout(layout_s);
  check_inputs(query, key, value, head_num, kv_heads, K, layout, block_table);
  decode::check_cpu(query, "query");
  decode::check_cpu(key, "key");
  decode::check_cpu(value, "value");
  const bool has_table = block_table.has_value() && block_table->defined();
  if (has_table) decode::check_cpu(*block_table, "block_table");
  const at::Tensor table = has_table ? block_table->contiguous() : at::Tensor();
  nsa::CompressAttentionInferParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.layout = layout;
  p.query = query.const_data_ptr();
  if (layout == nsa::DecodeLayout::kTND) {  // the view [1, T, N1, D]
    p.query_size[0] = 1;
    p.query_stride[0] = 0;
    for (int i = 0; i < 3; ++i) {
      p.query_size[i + 1] = query.size(i);
      p.query_stride[i + 1] = query.stride(i);
    }
  } else {
    for (int i = 0; i < 4; ++i) {
      p.query_size[i] = query.size(i);
      p.query_stride[i] = query.stride(i);
    }
  }
  p.key = view3_of(key);
  p.value = view3_of(value);
  p.scale_value = scale;
  p.head_num = head_num;
  p.key_value_head_num = kv_heads;
  p.select_block_size = lp;
  p.select_block_count = K;
  p.page_block_size = P;
  p.compress_block_size = l;
  p.compress_stride = d;
  p.has_atten_mask = atten_mask.has_value() && atten_mask->defined();
  if (has_table) {
    p.block_table = table.const_data_ptr<int32_t>();
    p.block_table_rows = table.size(0);
    p.block_table_cols = table.size(1);
    p.block_table_row_stride = table.size(1);
  }
  p.actual_seq_qlen = decode::int_list(qlen);
  p.actual_cmp_seq_kvlen = decode::int_list(cmplen);
  p.actual_sel_seq_kvlen = decode::int_list(sellen);
  // §3 in full before anything is allocated (placeholders for the outputs, never written)
  static unsigned char placeholder;
  static int32_t placeholder_idx;
  p.attention_out = &placeholder;
  p.topk_indices = &placeholder_idx;
  nsa::CompressAttentionInferShape sh;
  nsa::Status st = nsa::validate_compress_attention_infer(p, &sh);
  TORCH_CHECK(st.ok(), st.message());
  std::vector<int64_t> out_shape, idx_shape;
  if (layout == nsa::DecodeLayout::kTND) {
    out_shape = {sh.rows, sh.N1, sh.Dv};
    idx_shape = {sh.rows, sh.N2, sh.K};
  } else {
    out_shape = {sh.B, sh.Sq, sh.N1, sh.Dv};
    idx_shape = {sh.B, sh.Sq, sh.N2, sh.K};
  }
  at::Tensor out = at::empty(out_shape, query.options());
  at::Tensor idx = at::empty(idx_shape, query.options().dtype(at::kInt));
  p.attention_out = out.mutable_data_ptr();
  p.topk_indices = idx.mutable_data_ptr<int32_t>();
  st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return {out, idx};
}

Result cai_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale, int64_t head_num,
               int64_t kv_heads, int64_t lp, int64_t K, int64_t P, int64_t l, int64_t d, const std::string& layout,
               const OptTensor& atten_mask, const OptTensor& block_table, const OptTensor&, OptIntList qlen,
               OptIntList cmplen, OptIntList sellen) {
  return run_cpu(&nsa::compress_attention_infer_cpu, query, key, value, scale, head_num, kv_heads, lp, K, P, l, d,
                 layout, atten_mask, block_table, qlen, cmplen, sellen);
}

Result cai_reference_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                         int64_t head_num, int64_t kv_heads, int64_t lp, int64_t K, int64_t P, int64_t l, int64_t d,
                         const std::string& layout, const OptTensor& atten_mask, const OptTensor& block_table,
                         const OptTensor&, OptIntList qlen, OptIntList cmplen, OptIntList sellen) {
  return run_cpu(&reference_backend, query, key, value, scale, head_num, kv_heads, lp, K, P, l, d, std::string(layout),
                 atten_mask, block_table, qlen, cmplen, sellen);
}

Result cai_tensor_lengths_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                              int64_t head_num, int64_t kv_heads, int64_t lp, int64_t K, int64_t P, int64_t l,
                              int64_t d, const std::string& layout, const OptTensor& atten_mask,
                              const OptTensor& block_table, const OptTensor& topk_mask, const OptTensor& qlen,
                              const OptTensor& cmplen, const OptTensor& sellen) {
  std::vector<int64_t> s1, s2, s3;
  return cai_cpu(query, key, value, scale, head_num, kv_heads, lp, K, P, l, d, layout, atten_mask, block_table,
                 topk_mask, decode::lengths_from_tensor(qlen, "actual_seq_qlen", s1),
                 decode::lengths_from_tensor(cmplen, "actual_cmp_seq_kvlen", s2),
                 decode::lengths_from_tensor(sellen, "actual_sel_seq_kvlen", s3));
}

// Meta: shapes from the input shapes (TND: T rows; BSND: [B, Sq]), Dv = value.shape[2] / N2.
Result meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t head_num,
            int64_t kv_heads, int64_t K, const std::string& layout_s, const OptTensor& block_table) {
  const nsa::DecodeLayout layout = parse_layout(layout_s);
  check_inputs(query, key, value, head_num, kv_heads, K, layout, block_table);
  const c10::SymInt dv = value.sym_size(2) / kv_heads;
  if (layout == nsa::DecodeLayout::kTND)
    return {at::empty_symint({query.sym_size(0), c10::SymInt(head_num), dv}, query.options()),
            at::empty_symint({query.sym_size(0), c10::SymInt(kv_heads), c10::SymInt(K)}, query.options().dtype(at::kInt))};
  return {at::empty_symint({query.sym_size(0), query.sym_size(1), c10::SymInt(head_num), dv}, query.options()),
          at::empty_symint({query.sym_size(0), query.sym_size(1), c10::SymInt(kv_heads), c10::SymInt(K)},
                           query.options().dtype(at::kInt))};
}

Result cai_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double, int64_t head_num,
                int64_t kv_heads, int64_t, int64_t K, int64_t, int64_t, int64_t, const std::string& layout,
                const OptTensor&, const OptTensor& block_table, const OptTensor&, OptIntList, OptIntList, OptIntList) {
  return meta(query, key, value, head_num, kv_heads, K, layout, block_table);
}

Result cai_tensor_lengths_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double,
                               int64_t head_num, int64_t kv_heads, int64_t, int64_t K, int64_t, int64_t, int64_t,
                               const std::string& layout, const OptTensor&, const OptTensor& block_table,
                               const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&) {
  return meta(query, key, value, head_num, kv_heads, K, layout, block_table);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("compress_attention_infer", &nsa_torch::cai_cpu);
  m.impl("compress_attention_infer.tensor_lengths", &nsa_torch::cai_tensor_lengths_cpu);
  m.impl("compress_attention_infer_reference", &nsa_torch::cai_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("compress_attention_infer", &nsa_torch::cai_meta);
  m.impl("compress_attention_infer.tensor_lengths", &nsa_torch::cai_tensor_lengths_meta);
  m.impl("compress_attention_infer_reference", &nsa_torch::cai_meta);
}
