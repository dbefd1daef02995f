// nsa-ops public C++ API: NSA key/value compression (torch-free).
//
// Reproduces torch_npu.npu_nsa_compress and its backward npu_nsa_compress_grad; the contract is
// docs/spec/compress.md (sections cited as §). Every entry point validates its params first
// (validate_compress / validate_compress_backward) and writes nothing when validation fails; the
// returned Status names the offending argument.
//
// With l = compress_block_size, d = compress_stride and batch b owning input rows
// [start_b, start_b + S_b) (start_b = actual_seq_len[b-1], 0 for b = 0), batch b has
//   C_b = (S_b - l) / d + 1  if S_b >= l, else 0                      compressed rows (§3)
// and compressed row c < C_b of batch b is output row R_b + c (R_b = C_0 + ... + C_{b-1}):
//   output[R_b + c, n, j] = rha_T( sum_{w<l} weight[w, n] * input[start_b + c*d + w, n, j] )   (§4)
//
// Tensor shapes and layouts (T = total tokens of all batches, packed "TND"):
//   input        [T, N, D]   dtype, any element strides (may be 0 or negative)
//   weight       [l, N]      dtype, any element strides
//   output       [R, N, D]   dtype, contiguous (R = sum_b C_b, may be 0)
//   grad         [R, N, D]   dtype, any element strides                (backward)
//   input_grad   [T, N, D]   dtype, contiguous                         (backward)
//   weight_grad  [l, N]      dtype, contiguous                         (backward)
// actual_seq_len: B >= 1 prefix sums S_0, S_0+S_1, ..., T (torch_npu's convention: no leading zero; a leading 0
// simply describes an empty first batch, §2).
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

struct CompressParams {
  DType dtype = DType::kBF16;  // dtype of input, weight and output

  Tensor3 input;   // [T, N, D]
  Tensor2 weight;  // [l, N]

  int64_t compress_block_size = 0;  // l >= 1
  int64_t compress_stride = 0;      // d, 1 <= d <= l

  IntList actual_seq_len;  // B >= 1 prefix sums, non-decreasing, >= 0, last == T

  void* output = nullptr;  // [R, N, D] dtype, contiguous; may be null when R == 0
};

// Derived sizes of a validated call (filled by validate_compress / validate_compress_backward).
struct CompressShape {
  int64_t T = 0, N = 0, D = 0;  // input sizes
  int64_t l = 0, d = 0;         // compress_block_size, compress_stride
  int64_t B = 0;                // number of batches (entries of actual_seq_len)
  int64_t R = 0;                // output rows: sum_b C_b
};

// C_b of §3 for a batch of S tokens: (S - l) / d + 1 when S >= l, else 0. Requires l >= 1, d >= 1, S >= 0.
inline int64_t compress_count(int64_t S, int64_t l, int64_t d) { return S >= l ? (S - l) / d + 1 : 0; }

// The output rows of a list of lengths (§3), checking l, d and the list as the entry points do (the last
// entry is not compared with T here). On success sets *total_rows = R (may be null) and, when cu_rows is
// not null, writes the B+1 offsets cu_rows[0] = 0, cu_rows[b+1] = R_{b+1} = C_0 + ... + C_b (cu_seqlens_cmp
// of the Pythonic API). Writes nothing on error.
Status compress_output_rows(const IntList& actual_seq_len, int64_t compress_block_size, int64_t compress_stride,
                            int64_t* total_rows, int64_t* cu_rows = nullptr);

// Checks every rule of §7 (plus non-null pointers). On success fills *shape (may be null).
Status validate_compress(const CompressParams& p, CompressShape* shape);

// Forward entry points (§4). Each validates first.
// Reference: plain loops, the contract in code (single-threaded; slow): the tests' oracle. fp32 accumulation
// in the order w = 0, 1, ..., l-1 (fp64 for fp64 inputs), final rounding half away from zero.
Status compress_reference(const CompressParams& p);
// Optimized CPU backend: multithreaded, vectorized over D with run-time ISA dispatch. It adds in the same
// order as the reference, so its output equals the reference's bit for bit on every ISA and thread count.
Status compress_cpu(const CompressParams& p, const CpuOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Backward (§6): gradients of output with respect to input and weight. The forward's description (input,
// weight, l, d, lengths) is reused from `fwd`; its output pointer is ignored.
//   input_grad[start_b + p, n, j] = rne_T( sum_{c : 0 <= p - c*d < l, c < C_b} weight[p - c*d, n] * grad[R_b + c, n, j] )
//                                   (0 for input rows that no window covers)
//   weight_grad[w, n] = rne_T( sum_b sum_{c < C_b} sum_j grad[R_b + c, n, j] * input[start_b + c*d + w, n, j] )
struct CompressGradParams {
  CompressParams fwd;
  Tensor3 grad;                 // [R, N, D] dtype, any strides
  void* input_grad = nullptr;   // [T, N, D] dtype, contiguous; may be null when T == 0
  void* weight_grad = nullptr;  // [l, N] dtype, contiguous
};

Status validate_compress_backward(const CompressGradParams& p, CompressShape* shape);
// Reference: plain loops in fp32 (fp64 for fp64 inputs); input_grad adds its terms by increasing c,
// weight_grad by increasing (b, c, j).
Status compress_backward_reference(const CompressGradParams& p);
// Optimized CPU backend. input_grad equals the reference's bit for bit (same order); weight_grad is summed in
// a fixed order of its own (16 interleaved partial sums over the rows of a chunk and j, a fixed tree, then the
// chunks in order; the chunks depend on R only), the same on every ISA and thread count.
Status compress_backward_cpu(const CompressGradParams& p, const CpuOptions& options = {});

}  // namespace nsa
