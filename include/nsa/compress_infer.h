// nsa-ops public C++ API: the decode-time compressed-cache update (torch-free).
//
// Reproduces torch_npu.npu_nsa_compress_infer (overload .cache); the contract is docs/spec/decode.md §2 (sections
// cited as §). Every entry point validates its params first (validate_compress_infer) and writes nothing when
// validation fails; the returned Status names the offending argument.
//
// With l = compress_block_size, d = compress_stride, P = page_block_size and S_b = actual_seq_len[b] (per-batch
// lengths, NOT prefix sums), raw token p of batch b is input[block_table[b, p / P], p % P] (an [N, D] slice).
// Batch b is eligible when S_b >= l and (S_b - l) % d == 0; for every eligible batch
//   cache[slot_mapping[b], n, j] = rne_T( sum_{w<l} f32(weight[w, n]) * f32(token S_b - l + w of batch b)[n, j] )
// accumulated in fp32 in the order w = 0, 1, ..., l-1 (fp64 for fp64 inputs; no rounding for fp32 / fp64). Every
// other cache row is left as it is; the slots of ineligible batches are not read.
//
// Tensor shapes and layouts (element strides, any values including 0 or negative, for the float tensors):
//   input         [num_pages, P, N, D]  dtype   the paged raw key (or value) cache
//   weight        [l, N]                dtype
//   cache         [num_slots, N, D]     dtype   updated in place
//   slot_mapping  [B]                   int32, contiguous
//   block_table   [B, max_pages]        int32, row b at block_table + b * block_table_row_stride
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

struct CompressInferParams {
  DType dtype = DType::kBF16;  // dtype of input, weight and cache

  const void* input = nullptr;  // [num_pages, P, N, D]
  int64_t input_size[4] = {0, 0, 0, 0};
  int64_t input_stride[4] = {0, 0, 0, 0};

  Tensor2 weight;  // [l, N]

  void* cache = nullptr;  // [num_slots, N, D], written in place
  int64_t cache_size[3] = {0, 0, 0};
  int64_t cache_stride[3] = {0, 0, 0};

  const int32_t* slot_mapping = nullptr;  // [B]; null: not given
  int64_t slot_mapping_size = 0;

  const int32_t* block_table = nullptr;  // [B, max_pages]; null: not given (an error, §2)
  int64_t block_table_rows = 0, block_table_cols = 0, block_table_row_stride = 0;

  int64_t compress_block_size = 0;  // l >= 1
  int64_t compress_stride = 0;      // d, 1 <= d <= l
  int64_t page_block_size = 0;      // P == input_size[1] >= 1

  IntList actual_seq_len;  // B per-batch lengths S_b >= 0 (required)
};

// Derived sizes of a validated call.
struct CompressInferShape {
  int64_t num_pages = 0, P = 0, N = 0, D = 0;
  int64_t l = 0, d = 0;
  int64_t B = 0, max_pages = 0, num_slots = 0;
  int64_t eligible = 0;  // batches that write a compressed token this call
};

// Whether a batch of S raw tokens completes a window this step (§2): S >= l and (S - l) % d == 0.
inline bool compress_infer_eligible(int64_t S, int64_t l, int64_t d) { return S >= l && (S - l) % d == 0; }

// Checks every argument rule of §2 (plus non-null pointers): shapes, l >= d >= 1, P, the lengths, the pages of
// every eligible batch's window, the eligible batches' slots (in range and distinct). On success fills *shape
// (may be null).
Status validate_compress_infer(const CompressInferParams& p, CompressInferShape* shape);

// Reference: plain loops, the contract in code (single-threaded): the tests' oracle.
Status compress_infer_reference(const CompressInferParams& p);
// Optimized CPU backend: threads over (eligible batch, head) units; the window's l rows are located through the
// block table (read in place, or gathered into a packed tile when the last dimension is strided) and summed by the
// compression operator's per-ISA row kernels in the reference's order, so the cache rows written equal the
// reference's bit for bit on every ISA path and thread count.
Status compress_infer_cpu(const CompressInferParams& p, const CpuOptions& options = {});

}  // namespace nsa
