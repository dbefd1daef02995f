// torch.ops.nsa.select_attention_infer (torch_npu.npu_nsa_select_attention_infer, docs/spec/decode.md §4): the
// schemas and the CPU and Meta kernels, as thin adapters from tensors to the torch-free library
// (nsa/select_attention_infer.h).
//
// The arguments, order and defaults of torch_npu (§4), except that the arguments after page_block_size are not
// keyword-only here: torch.library.register_autograd (python/nsa_ops/ops/select_attention_infer.py registers a
// backward that raises: the operator has no derivative) does not support keyword-only tensor arguments; the Python
// drop-in keeps torch_npu's keyword-only signature. atten_mask is accepted and never read (§4: MTP causality is
// always on). Overload .tensor_lengths takes the two per-batch length lists as 1-D integer CPU tensors (under
// torch.compile new lengths are new tensor values, not new constants). select_attention_infer_reference: the same
// schema computed by the plain-loop reference (the tests' oracle).
// Layouts (§4 table): BSND query [B, Sq, N1, D], caches [num_pages, P, N2, D|Dv], topk [B, Sq, N2, K] (also
// [B, N2, K] when Sq = 1), out [B, Sq, N1, Dv]; BSH query [B, Sq, N1 D], caches [num_pages, P, N2 D|N2 Dv], topk
// [B, Sq, N2, K], out [B, Sq, N1 Dv]; TND query [T, N1, D], caches [num_pages, P, N2 D|N2 Dv], topk [T, N2, K], out
// [T, N1, Dv]. Meta kernels: those output shapes in the query's dtype (no shape depends on data).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "binding.h"
#include "decode_args.h"
#include "nsa/select_attention_infer.h"

#define NSA_SELECT_INFER_ARGS(LENGTHS)                                                                   \
  "(Tensor query, Tensor key, Tensor value, Tensor topk_indices, float scale_value, int head_num, "    \
  "int key_value_head_num, int select_block_size, int select_block_count, int page_block_size, "       \
  "str layout=\"BSND\", Tensor? atten_mask=None, Tensor? block_table=None, " LENGTHS                    \
  " actual_seq_qlen=None, " LENGTHS " actual_seq_kvlen=None) -> Tensor"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("select_attention_infer" NSA_SELECT_INFER_ARGS("int[]?"));
  m.def("select_attention_infer.tensor_lengths" NSA_SELECT_INFER_ARGS("Tensor?"));
  m.def("select_attention_infer_reference" NSA_SELECT_INFER_ARGS("int[]?"));
}

namespace nsa_torch {
namespace {

enum class Layout { kBSND, kBSH, kTND };

Layout parse_layout(const std::string& layout) {
  if (layout == "BSND") return Layout::kBSND;
  if (layout == "BSH") return Layout::kBSH;
  if (layout == "TND") return Layout::kTND;
  TORCH_CHECK(false, "layout must be \"BSND\", \"BSH\" or \"TND\", got \"", layout, "\"");
  return Layout::kBSND;
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* shape, const std::string& layout) {
  TORCH_CHECK(t.dim() == rank, name, " must be a ", rank, "-D tensor ", shape, " for layout \"", layout,
              "\", got a ", t.dim(), "-D tensor of shape ", t.sym_sizes());
}

// The checks that need no data (shared with Meta): ranks per layout, dtypes, head counts, divisibility of the
// flattened head dims. Returns the layout.
Layout check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& topk_indices, int64_t head_num, int64_t key_value_head_num,
                    const std::string& layout_str, const OptTensor& block_table) {
  const Layout layout = parse_layout(layout_str);
  const bool bsnd = layout == Layout::kBSND;
  check_rank(query, "query", layout == Layout::kTND ? 3 : (bsnd ? 4 : 3),
             layout == Layout::kTND ? "[T, N1, D]" : (bsnd ? "[B, Sq, N1, D]" : "[B, Sq, N1*D]"), layout_str);
  check_rank(key, "key", bsnd ? 4 : 3, bsnd ? "[num_pages, P, N2, D]" : "[num_pages, P, N2*D]", layout_str);
  check_rank(value, "value", bsnd ? 4 : 3, bsnd ? "[num_pages, P, N2, Dv]" : "[num_pages, P, N2*Dv]", layout_str);
  if (layout == Layout::kTND) {
    check_rank(topk_indices, "topk_indices", 3, "[T, N2, K]", layout_str);
  } else {
    TORCH_CHECK(topk_indices.dim() == 4 || (bsnd && topk_indices.dim() == 3 && query.sym_size(1) == 1),
                "topk_indices must be a 4-D tensor [B, Sq, N2, K]", bsnd ? " (or [B, N2, K] when Sq = 1)" : "",
                " for layout \"", layout_str, "\", got shape ", topk_indices.sym_sizes());
  }
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (", query.scalar_type(),
              "), got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == query.scalar_type(), "value must have the dtype of query (",
              query.scalar_type(), "), got ", value.scalar_type());
  const auto it = topk_indices.scalar_type();
  TORCH_CHECK(it == at::kInt || it == at::kLong, "topk_indices must be an int32 (or int64) tensor, got ", it);
  TORCH_CHECK(block_table.has_value() && block_table->defined(),
              "block_table must be given: an int32 tensor [B, max_pages] (the pages of each batch)");
  TORCH_CHECK(block_table->dim() == 2, "block_table must be a 2-D int32 tensor [B, max_pages], got shape ",
              block_table->sym_sizes());
  TORCH_CHECK(block_table->scalar_type() == at::kInt, "block_table must be an int32 tensor, got ",
              block_table->scalar_type());
  TORCH_CHECK(key_value_head_num >= 1, "key_value_head_num must be >= 1, got ", key_value_head_num);
  TORCH_CHECK(head_num >= 1, "head_num must be >= 1, got ", head_num);
  if (!bsnd) {
    auto divisible = [&](const at::Tensor& t, const char* name, int64_t by, const char* what) {
      const auto n = t.sym_size(t.dim() - 1).maybe_as_int();
      if (n) TORCH_CHECK(*n % by == 0, name, ".size(-1) = ", *n, " must be a multiple of ", what, " = ", by);
    };
    divisible(key, "key", key_value_head_num, "key_value_head_num");
    divisible(value, "value", key_value_head_num, "key_value_head_num");
    if (layout == Layout::kBSH) divisible(query, "query", head_num, "head_num");
    // the flattened key holds N2 heads of the query's head dim
    const auto qd = query.sym_size(query.dim() - 1).maybe_as_int(), kd = key.sym_size(2).maybe_as_int();
    if (qd && kd) {
      const int64_t d = layout == Layout::kBSH ? *qd / head_num : *qd;
      TORCH_CHECK(*kd == key_value_head_num * d, "key.size(-1) = ", *kd, " must be key_value_head_num * D = ",
                  key_value_head_num, " * ", d, " for layout \"", layout_str, "\"");
    }
  }
  return layout;
}

void check_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts, c10::DeviceType type,
                   const char* backend) {
  for (const auto& [t, name] : ts)
    TORCH_CHECK(t->device().type() == type, name, " must be on the ", backend, " device like query, got ",
                t->device());
}

nsa::Tensor3 view(const at::Tensor& t) {
  nsa::Tensor3 v = view3(t);
  if (t.numel() == 0) v.data = nullptr;
  return v;
}

// A cache as [num_pages, P, N2, d]: 4-D as it is, or 3-D [num_pages, P, N2 d] split (a view of any strides).
nsa::PagedCacheView cache_view(const at::Tensor& t, int64_t n2) {
  nsa::PagedCacheView v;
  v.data = t.numel() == 0 ? nullptr : t.const_data_ptr();
  if (t.dim() == 4) {
    for (int i = 0; i < 4; ++i) {
      v.size[i] = t.size(i);
      v.stride[i] = t.stride(i);
    }
  } else {
    const int64_t d = t.size(2) / n2;
    const int64_t sz[4] = {t.size(0), t.size(1), n2, d};
    const int64_t st[4] = {t.stride(0), t.stride(1), d * t.stride(2), t.stride(2)};
    for (int i = 0; i < 4; ++i) {
      v.size[i] = sz[i];
      v.stride[i] = st[i];
    }
  }
  return v;
}

using Backend = nsa::Status (*)(const nsa::SelectAttentionInferParams&, const nsa::CpuOptions&);

nsa::Status reference_backend(const nsa::SelectAttentionInferParams& p, const nsa::CpuOptions&) {
  return nsa::select_attention_infer_reference(p);
}

at::Tensor forward_cpu(Backend backend, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                       int64_t key_value_head_num, int64_t select_block_size, int64_t select_block_count,
                       int64_t page_block_size, const std::string& layout_str, const OptTensor& atten_mask,
                       const OptTensor& block_table, OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  (void)atten_mask;  // §4: never read, MTP causality is always on
  const Layout layout = check_inputs(query, key, value, topk_indices, head_num, key_value_head_num, layout_str,
                                     block_table);
  check_devices({{&query, "query"}, {&key, "key"}, {&value, "value"}, {&topk_indices, "topk_indices"},
                 {&*block_table, "block_table"}},
                c10::DeviceType::CPU, "CPU");
  const int64_t n1 = head_num;
  at::Tensor q3, topk3;
  int64_t batch_rows = 0, B = 0, Sq = 0;
  if (layout == Layout::kTND) {
    q3 = query;
    topk3 = topk_indices;
  } else {
    B = query.size(0);
    Sq = query.size(1);
    const int64_t D = layout == Layout::kBSND ? query.size(3) : query.size(2) / n1;
    q3 = query.reshape({B * Sq, layout == Layout::kBSND ? query.size(2) : n1, D});
    topk3 = topk_indices.dim() == 3 ? topk_indices
                                    : topk_indices.reshape({B * Sq, topk_indices.size(2), topk_indices.size(3)});
    batch_rows = Sq;
    TORCH_CHECK(Sq >= 1, "query must have Sq >= 1 rows per batch, got shape ", query.sizes());
  }
  nsa::SelectAttentionInferParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.query = view(q3);
  p.batch_rows = batch_rows;
  p.key = cache_view(key, key_value_head_num);
  p.value = cache_view(value, key_value_head_num);
  p.topk_indices = view(topk3);
  p.index_int64 = topk_indices.scalar_type() == at::kLong;
  const at::Tensor& bt = *block_table;
  p.block_table.data = bt.numel() == 0 ? nullptr : bt.const_data_ptr();
  p.block_table.size[0] = bt.size(0);
  p.block_table.size[1] = bt.size(1);
  p.block_table.stride[0] = bt.stride(0);
  p.block_table.stride[1] = bt.stride(1);
  if (bt.numel() == 0) {  // present but empty: a placeholder so that the library reports "non-empty"
    static const int32_t kEmpty = 0;
    p.block_table.data = &kEmpty;
  }
  p.scale_value = scale_value;
  p.head_num = head_num;
  p.key_value_head_num = key_value_head_num;
  p.select_block_size = select_block_size;
  p.select_block_count = select_block_count;
  p.page_block_size = page_block_size;
  p.actual_seq_qlen = decode::int_list(actual_seq_qlen);
  p.actual_seq_kvlen = decode::int_list(actual_seq_kvlen);
  {  // every rule before anything is allocated
    nsa::SelectAttentionInferParams probe = p;
    static char placeholder = 0;
    probe.attention_out = &placeholder;
    nsa::SelectAttentionInferShape sh;
    const nsa::Status st = nsa::validate_select_attention_infer(probe, &sh);
    TORCH_CHECK(st.ok(), st.message());
  }
  const int64_t Dv = p.value.size[3];
  at::Tensor out = layout == Layout::kTND   ? at::empty({q3.size(0), n1, Dv}, query.options())
                   : layout == Layout::kBSND ? at::empty({B, Sq, n1, Dv}, query.options())
                                             : at::empty({B, Sq, n1 * Dv}, query.options());
  p.attention_out = out.mutable_data_ptr();
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return out;
}

at::Tensor select_attention_infer_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                      const at::Tensor& topk_indices, double scale_value, int64_t head_num,
                                      int64_t key_value_head_num, int64_t select_block_size,
                                      int64_t select_block_count, int64_t page_block_size, c10::string_view layout,
                                      const OptTensor& atten_mask, const OptTensor& block_table,
                                      OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  return forward_cpu(&nsa::select_attention_infer_cpu, query, key, value, topk_indices, scale_value, head_num,
                     key_value_head_num, select_block_size, select_block_count, page_block_size, std::string(layout),
                     atten_mask, block_table, actual_seq_qlen, actual_seq_kvlen);
}

at::Tensor select_attention_infer_reference_cpu(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const at::Tensor& topk_indices,
                                                double scale_value, int64_t head_num, int64_t key_value_head_num,
                                                int64_t select_block_size, int64_t select_block_count,
                                                int64_t page_block_size, c10::string_view layout,
                                                const OptTensor& atten_mask, const OptTensor& block_table,
                                                OptIntList actual_seq_qlen, OptIntList actual_seq_kvlen) {
  return forward_cpu(&reference_backend, query, key, value, topk_indices, scale_value, head_num, key_value_head_num,
                     select_block_size, select_block_count, page_block_size, std::string(layout), atten_mask,
                     block_table, actual_seq_qlen, actual_seq_kvlen);
}

at::Tensor select_attention_infer_tensor_lengths_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, const at::Tensor& topk_indices,
                                                     double scale_value, int64_t head_num,
                                                     int64_t key_value_head_num, int64_t select_block_size,
                                                     int64_t select_block_count, int64_t page_block_size,
                                                     c10::string_view layout, const OptTensor& atten_mask,
                                                     const OptTensor& block_table, const OptTensor& actual_seq_qlen,
                                                     const OptTensor& actual_seq_kvlen) {
  std::vector<int64_t> q, kv;
  return select_attention_infer_cpu(query, key, value, topk_indices, scale_value, head_num, key_value_head_num,
                                    select_block_size, select_block_count, page_block_size, layout, atten_mask,
                                    block_table,
                                    decode::lengths_from_tensor(actual_seq_qlen, "actual_seq_qlen", q),
                                    decode::lengths_from_tensor(actual_seq_kvlen, "actual_seq_kvlen", kv));
}

// ------------------------------------------------------------------ Meta
at::Tensor select_attention_infer_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& topk_indices, double /*scale_value*/, int64_t head_num,
                                       int64_t key_value_head_num, int64_t /*select_block_size*/,
                                       int64_t /*select_block_count*/, int64_t /*page_block_size*/,
                                       c10::string_view layout, const OptTensor& /*atten_mask*/,
                                       const OptTensor& block_table, OptIntList /*actual_seq_qlen*/,
                                       OptIntList /*actual_seq_kvlen*/) {
  const Layout l = check_inputs(query, key, value, topk_indices, head_num, key_value_head_num, std::string(layout),
                                block_table);
  const auto opts = query.options();
  if (l == Layout::kBSND)
    return at::empty_symint({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)}, opts);
  const c10::SymInt dv = value.sym_size(2) / key_value_head_num;
  if (l == Layout::kBSH) return at::empty_symint({query.sym_size(0), query.sym_size(1), dv * head_num}, opts);
  return at::empty_symint({query.sym_size(0), query.sym_size(1), dv}, opts);
}

at::Tensor select_attention_infer_tensor_lengths_meta(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value, const at::Tensor& topk_indices,
                                                      double scale_value, int64_t head_num,
                                                      int64_t key_value_head_num, int64_t select_block_size,
                                                      int64_t select_block_count, int64_t page_block_size,
                                                      c10::string_view layout, const OptTensor& atten_mask,
                                                      const OptTensor& block_table, const OptTensor& actual_seq_qlen,
                                                      const OptTensor& actual_seq_kvlen) {
  for (const auto& [t, name] : {std::pair<const OptTensor*, const char*>{&actual_seq_qlen, "actual_seq_qlen"},
                                {&actual_seq_kvlen, "actual_seq_kvlen"}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->dim() == 1, name, " must be a 1-D integer tensor (one length per batch), got a ",
                (*t)->dim(), "-D tensor");
    TORCH_CHECK((*t)->scalar_type() == at::kLong || (*t)->scalar_type() == at::kInt, name,
                " must be an int64 or int32 tensor, got ", (*t)->scalar_type());
  }
  return select_attention_infer_meta(query, key, value, topk_indices, scale_value, head_num, key_value_head_num,
                                     select_block_size, select_block_count, page_block_size, layout, atten_mask,
                                     block_table, std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("select_attention_infer", &nsa_torch::select_attention_infer_cpu);
  m.impl("select_attention_infer.tensor_lengths", &nsa_torch::select_attention_infer_tensor_lengths_cpu);
  m.impl("select_attention_infer_reference", &nsa_torch::select_attention_infer_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("select_attention_infer", &nsa_torch::select_attention_infer_meta);
  m.impl("select_attention_infer.tensor_lengths", &nsa_torch::select_attention_infer_tensor_lengths_meta);
  m.impl("select_attention_infer_reference", &nsa_torch::select_attention_infer_meta);
}
