// nsa-ops public C++ API: NSA selected attention (torch-free).
//
// Reproduces torch_npu.npu_nsa_select_attention and npu_nsa_select_attention_grad; the contract is
// docs/spec/select_attention.md (sections cited as §). Every query row attends to the raw key/value blocks listed
// in topk_indices (normally compressed attention's output). Everything a backend needs is in
// SelectAttentionParams: raw pointers, sizes and element strides. Every entry point validates its params first
// (validate_select_attention: every rule of §7, including the range of every index) and writes nothing when
// validation fails; the returned Status names the offending argument.
//
// Tensor shapes and layouts (T1 = query rows of all batches, packed "TND"; G = N1 / N2; l' = select_block_size;
// K = select_block_count):
//   query          [T1, N1, D ]  dtype, any element strides
//   key            [T2, N2, D ]  dtype, any element strides; rows >= actual_seq_kvlen[B-1] are never read
//   value          [T2, N2, Dv]  dtype, any element strides, Dv <= D; same rule
//   topk_indices   [T1, N2, K ]  int32 or int64 (index_dtype), any element strides: per query row and KV head, K
//                                batch-local block indices in [0, ceil(Skv_b / l')) or -1 (an empty slot); block x
//                                covers the batch's key positions [x l', (x+1) l')
//   attention_out  [T1, N1, Dv]  dtype,   contiguous
//   softmax_max    [T1, N1, 8 ]  float32, contiguous, true TND layout (§5): the value of (row t, head h) at float
//   softmax_sum    [T1, N1, 8 ]  float32  offset (t N1 + h) 8, repeated 8 times
// Lengths are prefix sums without the leading zero (§2): actual_seq_qlen[b] = Sq_0 + .. + Sq_b (the last equals
// T1), actual_seq_kvlen[b] = Skv_0 + .. + Skv_b (the last <= T2). Query head h reads key/value head h / G, and the
// G query heads of a KV head share its indices.
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

// Element type of topk_indices.
enum class IndexDType : int { kInt32 = 0, kInt64 = 1 };

struct SelectAttentionParams {
  DType dtype = DType::kBF16;  // dtype of query, key, value and attention_out

  Tensor3 query;         // [T1, N1, D]
  Tensor3 key;           // [T2, N2, D]
  Tensor3 value;         // [T2, N2, Dv]
  Tensor3 topk_indices;  // [T1, N2, K], elements of index_dtype
  IndexDType index_dtype = IndexDType::kInt32;

  double scale_value = 1.0;        // multiplies the fp32 product q.k; used as float32 (§4 step 1)
  int64_t head_num = 0;            // must equal N1
  int64_t select_block_size = 0;   // l' >= 1
  int64_t select_block_count = 0;  // K >= 1, must equal topk_indices.size[2]
  // Key position p is visible to local query position s only if p <= s (§3). The drop-in sets it to
  // (atten_mask is not None), the Pythonic API to its `causal` argument.
  bool causal = true;

  IntList actual_seq_qlen;   // B prefix sums of Sq_b, last == T1
  IntList actual_seq_kvlen;  // B prefix sums of Skv_b, last <= T2

  // Outputs (contiguous, see the layout comment at the top of this file). May be null when T1 == 0.
  void* attention_out = nullptr;  // [T1, N1, Dv] dtype
  float* softmax_max = nullptr;   // [T1, N1, 8]
  float* softmax_sum = nullptr;   // [T1, N1, 8]
};

// Derived sizes of a validated call (filled by validate_select_attention).
struct SelectAttentionShape {
  int64_t T1 = 0, N1 = 0, D = 0, T2 = 0, N2 = 0, Dv = 0, G = 0;
  int64_t K = 0;           // select_block_count
  int64_t block = 0;       // l' (select_block_size)
  int64_t B = 0;           // batches
  int64_t max_sq = 0;      // max_b Sq_b
  int64_t max_skv = 0;     // max_b Skv_b
  int64_t max_blocks = 0;  // max_b ceil(Skv_b / l'): the exclusive upper bound of an index
  int64_t kv_end = 0;      // actual_seq_kvlen[B-1]: key/value rows at or beyond it are never read
};

// Checks every rule of docs/spec/select_attention.md §7 (plus non-null pointers), including the range of every
// index. On success fills *shape (may be null); on failure *shape is untouched.
Status validate_select_attention(const SelectAttentionParams& p, SelectAttentionShape* shape);

// Forward entry points (§3-§6). Each validates first.
// Reference: plain loops, the contract line by line (single-threaded; slow). The tests' oracle.
Status select_attention_reference(const SelectAttentionParams& p);
// Optimized CPU backend: per-ISA GEMM kernels, multithreaded; results do not depend on options.num_threads.
Status select_attention_cpu(const SelectAttentionParams& p, const CpuOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Backward (§8): gradients of attention_out with respect to query, key and value.
// The forward's description (inputs, scalars, causal switch, lengths) is reused from `fwd`; its output pointers
// are ignored. Inputs of the backward:
//   grad           [T1, N1, Dv] dtype,   any strides: dO
//   attention_out  [T1, N1, Dv] dtype,   any strides: O as the forward returned it (enters Dlt = dO . O)
//   softmax_max    [T1, N1, 8]  float32, any strides: m; only element [t][h][0] is read
//   softmax_sum    [T1, N1, 8]  float32, any strides: l_sum; likewise
// Outputs (contiguous, dtype, rounded half away from zero, §8): grad_query [T1, N1, D], grad_key [T2, N2, D],
// grad_value [T2, N2, Dv]. Key/value rows that no visible entry reaches (never selected, beyond a batch's Skv_b,
// at or beyond actual_seq_kvlen[B-1]) receive zeros; so do query rows without any visible entry (§6).
struct SelectAttentionGradParams {
  SelectAttentionParams fwd;
  Tensor3 grad;
  Tensor3 attention_out;
  Tensor3 softmax_max;  // float32 elements
  Tensor3 softmax_sum;  // float32 elements
  void* grad_query = nullptr;
  void* grad_key = nullptr;
  void* grad_value = nullptr;
};

Status validate_select_attention_backward(const SelectAttentionGradParams& p, SelectAttentionShape* shape);
Status select_attention_backward_reference(const SelectAttentionGradParams& p);
Status select_attention_backward_cpu(const SelectAttentionGradParams& p, const CpuOptions& options = {});

}  // namespace nsa
