// torch.ops.nsa.paged_window_attention (nsa_ops.paged_window_attention, docs/spec/decode.md §9; no NPU
// counterpart): the schemas and the CPU and Meta kernels, as thin adapters from tensors to the torch-free library
// (nsa/paged_window_attention.h).
//
// paged_window_attention(query [T, N1, D], key_cache [num_pages, P, N2, D], value_cache [num_pages, P, N2, Dv],
// block_table [B, max_pages] int32, seq_lens (B per-batch S_b), window, scale, query_lens (B per-batch q_b, or None:
// 1 each)) -> attention_out [T, N1, Dv]. Overload .tensor_lengths takes the two length lists as 1-D integer CPU
// tensors (read inside the kernel: no recompilation under torch.compile for new lengths).
// paged_window_attention_reference: the same schema computed by the plain-loop reference (the tests' oracle). Meta
// kernel: [T, N1, Dv] in the query's dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "binding.h"
#include "decode_args.h"
#include "nsa/paged_window_attention.h"

#define NSA_PAGED_WINDOW_ARGS(LENGTHS, OPT)                                                              \
  "(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, " LENGTHS " seq_lens, "     \
  "int window, float scale, " LENGTHS OPT " query_lens=None) -> Tensor"

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.def("paged_window_attention" NSA_PAGED_WINDOW_ARGS("int[]", "?"));
  m.def("paged_window_attention.tensor_lengths" NSA_PAGED_WINDOW_ARGS("Tensor", "?"));
  m.def("paged_window_attention_reference" NSA_PAGED_WINDOW_ARGS("int[]", "?"));
}

namespace nsa_torch {
namespace {

void check_inputs(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                  const at::Tensor& block_table) {
  auto rank = [](const at::Tensor& t, const char* name, int64_t r, const char* shape) {
    TORCH_CHECK(t.dim() == r, name, " must be a ", r, "-D tensor ", shape, ", got a ", t.dim(), "-D tensor of shape ",
                t.sym_sizes());
  };
  rank(query, "query", 3, "[T, N1, D]");
  rank(key_cache, "key_cache", 4, "[num_pages, P, N2, D]");
  rank(value_cache, "value_cache", 4, "[num_pages, P, N2, Dv]");
  rank(block_table, "block_table", 2, "[B, max_pages] (int32)");
  to_nsa_dtype(query.scalar_type(), "query");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type(), "key_cache must have the dtype of query (",
              query.scalar_type(), "), got ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.scalar_type() == query.scalar_type(), "value_cache must have the dtype of query (",
              query.scalar_type(), "), got ", value_cache.scalar_type());
  TORCH_CHECK(block_table.scalar_type() == at::kInt, "block_table must be an int32 tensor, got ",
              block_table.scalar_type());
}

nsa::PagedCacheView cache_view(const at::Tensor& t) {
  nsa::PagedCacheView v;
  v.data = t.numel() == 0 ? nullptr : t.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    v.size[i] = t.size(i);
    v.stride[i] = t.stride(i);
  }
  return v;
}

using Backend = nsa::Status (*)(const nsa::PagedWindowAttentionParams&, const nsa::CpuOptions&);

nsa::Status reference_backend(const nsa::PagedWindowAttentionParams& p, const nsa::CpuOptions&) {
  return nsa::paged_window_attention_reference(p);
}

at::Tensor forward_cpu(Backend backend, const at::Tensor& query, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_table, OptIntList seq_lens,
                       int64_t window, double scale, OptIntList query_lens) {
  check_inputs(query, key_cache, value_cache, block_table);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&key_cache, "key_cache"},
                                {&value_cache, "value_cache"}, {&block_table, "block_table"}})
    TORCH_CHECK(t->device().is_cpu() && query.device().is_cpu(), name,
                " must be on the CPU device like query, got ", t->device());
  nsa::PagedWindowAttentionParams p;
  p.dtype = to_nsa_dtype(query.scalar_type(), "query");
  p.query = view3(query);
  if (query.numel() == 0) p.query.data = nullptr;
  p.key_cache = cache_view(key_cache);
  p.value_cache = cache_view(value_cache);
  static const int32_t kEmptyTable = 0;  // present but empty: the library reports "non-empty"
  p.block_table.data = block_table.numel() == 0 ? &kEmptyTable : block_table.const_data_ptr();
  for (int i = 0; i < 2; ++i) {
    p.block_table.size[i] = block_table.size(i);
    p.block_table.stride[i] = block_table.stride(i);
  }
  p.window = window;
  p.scale = scale;
  p.seq_lens = decode::int_list(seq_lens);
  p.query_lens = decode::int_list(query_lens);
  {  // every rule before anything is allocated
    nsa::PagedWindowAttentionParams probe = p;
    static char placeholder = 0;
    probe.attention_out = &placeholder;
    const nsa::Status st = nsa::validate_paged_window_attention(probe, nullptr);
    TORCH_CHECK(st.ok(), st.message());
  }
  at::Tensor out = at::empty({query.size(0), query.size(1), value_cache.size(3)}, query.options());
  p.attention_out = out.mutable_data_ptr();
  const nsa::Status st = backend(p, nsa::CpuOptions{-1, at::get_num_threads()});
  TORCH_CHECK(st.ok(), st.message());
  return out;
}

at::Tensor paged_window_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                      const at::Tensor& value_cache, const at::Tensor& block_table,
                                      at::IntArrayRef seq_lens, int64_t window, double scale,
                                      OptIntList query_lens) {
  return forward_cpu(&nsa::paged_window_attention_cpu, query, key_cache, value_cache, block_table, seq_lens, window,
                     scale, query_lens);
}

at::Tensor paged_window_attention_reference_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                                const at::Tensor& value_cache, const at::Tensor& block_table,
                                                at::IntArrayRef seq_lens, int64_t window, double scale,
                                                OptIntList query_lens) {
  return forward_cpu(&reference_backend, query, key_cache, value_cache, block_table, seq_lens, window, scale,
                     query_lens);
}

at::Tensor paged_window_attention_tensor_lengths_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                                     const at::Tensor& value_cache, const at::Tensor& block_table,
                                                     const at::Tensor& seq_lens, int64_t window, double scale,
                                                     const OptTensor& query_lens) {
  std::vector<int64_t> s, q;
  return forward_cpu(&nsa::paged_window_attention_cpu, query, key_cache, value_cache, block_table,
                     decode::lengths_from_tensor(seq_lens, "seq_lens", s), window, scale,
                     decode::lengths_from_tensor(query_lens, "query_lens", q));
}

at::Tensor paged_window_attention_meta(const at::Tensor& query, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_table,
                                       at::IntArrayRef /*seq_lens*/, int64_t window, double /*scale*/,
                                       OptIntList /*query_lens*/) {
  check_inputs(query, key_cache, value_cache, block_table);
  TORCH_CHECK(window >= 1, "window must be >= 1 (the positions a query token sees, itself included), got ", window);
  return at::empty_symint({query.sym_size(0), query.sym_size(1), value_cache.sym_size(3)}, query.options());
}

at::Tensor paged_window_attention_tensor_lengths_meta(const at::Tensor& query, const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache, const at::Tensor& block_table,
                                                      const at::Tensor& seq_lens, int64_t window, double scale,
                                                      const OptTensor& /*query_lens*/) {
  TORCH_CHECK(seq_lens.dim() == 1, "seq_lens must be a 1-D integer tensor (one length per batch), got a ",
              seq_lens.dim(), "-D tensor");
  return paged_window_attention_meta(query, key_cache, value_cache, block_table, {}, window, scale, std::nullopt);
}

}  // namespace
}  // namespace nsa_torch

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("paged_window_attention", &nsa_torch::paged_window_attention_cpu);
  m.impl("paged_window_attention.tensor_lengths", &nsa_torch::paged_window_attention_tensor_lengths_cpu);
  m.impl("paged_window_attention_reference", &nsa_torch::paged_window_attention_reference_cpu);
}

TORCH_LIBRARY_IMPL(nsa, Meta, m) {
  m.impl("paged_window_attention", &nsa_torch::paged_window_attention_meta);
  m.impl("paged_window_attention.tensor_lengths", &nsa_torch::paged_window_attention_tensor_lengths_meta);
  m.impl("paged_window_attention_reference", &nsa_torch::paged_window_attention_meta);
}
