// nsa-ops public C++ API: sliding-window attention at decode time over a paged raw key/value cache (torch-free).
//
// nsa_ops.paged_window_attention has no NPU counterpart; the contract is docs/spec/decode.md §9 (sections cited as
// §), with the roundings of docs/spec/window_attention.md §5 step 4. No backward. Every entry point validates its
// params first (validate_paged_window_attention) and writes nothing when validation fails; the returned Status
// names the offending argument.
//
// Tensor shapes (G = N1 / N2, P = the page size key_cache.size[1]):
//   query          [T, N1, D]  dtype, any element strides; batch b owns rows [q0_b, q0_b + q_b), T = sum q_b
//   key_cache      [num_pages, P, N2, D ]  dtype, any element strides
//   value_cache    [num_pages, P, N2, Dv]  dtype, any element strides
//   block_table    [B, max_pages] int32, any element strides: raw position p of batch b is in page
//                  block_table[b][p / P], row p % P; only the entries a row needs are read
//   attention_out  [T, N1, Dv] dtype, contiguous
// Query token i < q_b of batch b is at raw position L_i - 1 with L_i = S_b - (q_b - 1 - i) and attends to the
// positions [max(0, L_i - window), L_i).
#pragma once

#include <cstdint>

#include "nsa/common.h"
#include "nsa/cpu.h"
#include "nsa/select_attention_infer.h"  // PagedCacheView

namespace nsa {

struct PagedWindowAttentionParams {
  DType dtype = DType::kBF16;  // dtype of query, key_cache, value_cache and attention_out

  Tensor3 query;               // [T, N1, D]
  PagedCacheView key_cache;    // [num_pages, P, N2, D]
  PagedCacheView value_cache;  // [num_pages, P, N2, Dv]
  Tensor2 block_table;         // [B, max_pages] int32; data == nullptr: not given (an error)

  int64_t window = 0;  // >= 1: the positions a query token sees, itself included
  double scale = 1.0;  // multiplies the fp32 product q.k; used as float32

  IntList seq_lens;    // B per-batch S_b (required)
  IntList query_lens;  // B per-batch q_b, or absent (1 each)

  void* attention_out = nullptr;  // [T, N1, Dv] dtype, contiguous
};

struct PagedWindowAttentionShape {
  int64_t T = 0, N1 = 0, D = 0, N2 = 0, Dv = 0, G = 0, B = 0;
  int64_t num_pages = 0, page = 0, max_pages = 0;
  int64_t max_entries = 0;  // the most positions one query token attends to
};

// Checks every argument rule of docs/spec/decode.md §9 (plus non-null pointers), including every page a query
// token needs. On success fills *shape (may be null); on failure leaves it untouched.
Status validate_paged_window_attention(const PagedWindowAttentionParams& p, PagedWindowAttentionShape* shape);

// Reference: plain loops, §9 line by line (single-threaded; slow). fp32 arithmetic for bf16 / fp16 / fp32, fp64
// for fp64 inputs.
Status paged_window_attention_reference(const PagedWindowAttentionParams& p);
// Optimized CPU backend: the window's rows gathered from the pages into a packed tile per (batch, KV head), per-ISA
// GEMM kernels, threads over units; results do not depend on options.num_threads. fp64 inputs run the reference.
Status paged_window_attention_cpu(const PagedWindowAttentionParams& p, const CpuOptions& options = {});

}  // namespace nsa
