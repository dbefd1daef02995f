// nsa-ops public C++ API: NSA selected attention at decode time over a paged raw key/value cache (torch-free).
//
// Reproduces torch_npu.npu_nsa_select_attention_infer; the contract is docs/spec/decode.md §4 (sections cited as
// §). No backward: the decode operators have none. Every entry point validates its params first
// (validate_select_attention_infer: every argument rule of §4, the range of every index and every page a row
// needs) and writes nothing when validation fails; the returned Status names the offending argument.
//
// Tensor shapes (G = N1 / N2, l' = select_block_size, K = select_block_count, P = page_block_size):
//   query          [T, N1, D ]  dtype, any element strides. The query rows of all batches, in one of two
//                               arrangements (batch_rows): packed (TND, batch_rows = 0: batch b owns rows
//                               [q0_b, q0_b + q_b), q0_b = q_0 + .. + q_{b-1}, T = sum q_b) or batch-major (BSND /
//                               BSH, batch_rows = Sq: batch b owns rows [b Sq, (b + 1) Sq), T = B Sq, and its rows
//                               i >= q_b are written as zeros, §7 item 7)
//   key            [num_pages, P, N2, D ]  dtype, any element strides: the paged raw keys
//   value          [num_pages, P, N2, Dv]  dtype, any element strides: the paged raw values
//   topk_indices   [T, N2, K]   int32 (or int64, index_int64), any element strides: block indices of each query
//                               row and KV head, -1 (empty) or in [0, ceil(S_b / l'))
//   block_table    [B, max_pages] int32, any element strides: raw position p of batch b is in page
//                               block_table[b][p / P], row p % P; only the entries a row needs are read
//   attention_out  [T, N1, Dv]  dtype, contiguous
// Lengths are per batch, not prefix sums (§ "Lengths are per batch"): actual_seq_kvlen[b] = S_b (this step's
// tokens included), actual_seq_qlen[b] = q_b (absent: Sq for every batch in the batch-major arrangement; required
// when packed).
#pragma once

#include <cstdint>

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

// A strided 4-D view of a paged cache: element [page][row][head][d] is at
// data + page*stride[0] + row*stride[1] + head*stride[2] + d*stride[3] (strides in elements, sizes >= 0).
struct PagedCacheView {
  const void* data = nullptr;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

struct SelectAttentionInferParams {
  DType dtype = DType::kBF16;  // dtype of query, key, value and attention_out

  Tensor3 query;           // [T, N1, D]
  int64_t batch_rows = 0;  // 0: packed rows (TND); Sq >= 1: batch-major rows (BSND / BSH), T = B Sq
  PagedCacheView key;      // [num_pages, P, N2, D]
  PagedCacheView value;    // [num_pages, P, N2, Dv]
  Tensor3 topk_indices;    // [T, N2, K]
  bool index_int64 = false;  // topk_indices holds int64 (else int32)
  Tensor2 block_table;     // [B, max_pages] int32; data == nullptr: not given (an error, §4)

  double scale_value = 1.0;        // multiplies the fp32 product q.k; used as float32 (§4 step 3)
  int64_t head_num = 0;            // must equal N1
  int64_t key_value_head_num = 0;  // must equal N2 (key.size[2])
  int64_t select_block_size = 0;   // l' >= 1
  int64_t select_block_count = 0;  // K >= 1, must equal topk_indices.size[2]
  int64_t page_block_size = 0;     // P, must equal key.size[1]

  IntList actual_seq_qlen;   // B per-batch q_b, or absent (batch-major only: Sq each)
  IntList actual_seq_kvlen;  // B per-batch S_b (required)

  void* attention_out = nullptr;  // [T, N1, Dv] dtype, contiguous (may be null when T == 0)
};

// Derived sizes of a validated call (filled by validate_select_attention_infer).
struct SelectAttentionInferShape {
  int64_t T = 0, N1 = 0, D = 0, N2 = 0, Dv = 0, G = 0, K = 0;
  int64_t block = 0;      // l'
  int64_t B = 0;
  int64_t num_pages = 0, page = 0, max_pages = 0;  // key.size[0], P, block_table.size[1]
  int64_t max_entries = 0;  // the most positions one (row, KV head) attends to: a bound of the tile sizes
};

// Checks every argument rule of docs/spec/decode.md §4 (plus non-null pointers), including every index and every
// page that a row needs. On success fills *shape (may be null); on failure leaves it untouched.
Status validate_select_attention_infer(const SelectAttentionInferParams& p, SelectAttentionInferShape* shape);

// Reference: plain loops, §4 line by line (single-threaded; slow). The tests' oracle. fp32 arithmetic for bf16 /
// fp16 / fp32 inputs, fp64 for fp64 inputs.
Status select_attention_infer_reference(const SelectAttentionInferParams& p);
// Optimized CPU backend: per (batch, KV head) unit, the needed pages' rows are gathered into a packed tile and the
// per-ISA GEMM kernels run on it; threads over units. Work proportional to the selected tokens; results do not
// depend on options.num_threads. fp64 inputs (a testing extension) run the reference.
Status select_attention_infer_cpu(const SelectAttentionInferParams& p, const CpuOptions& options = {});

}  // namespace nsa
