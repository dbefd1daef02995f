// nsa-ops public C++ API: sliding-window attention, the TND subset of torch_npu.npu_fusion_attention /
// npu_fusion_attention_grad (torch-free). The contract is docs/spec/window_attention.md (sections cited as §).
//
// Everything a backend needs is in WindowAttentionParams: raw pointers, sizes and element strides. Every entry
// point validates its params first (validate_window_attention) and writes nothing when validation fails; the
// returned Status names the offending argument (the Python names of §1, e.g. "pre_tockens").
//
// Tensor shapes and layouts (T1 = total query rows of all batches, packed "TND"):
//   query          [T1, N1, D ]  dtype, any element strides
//   key            [T2, N2, D ]  dtype, any element strides; rows >= max(actual_seq_kvlen) are not read
//   value          [T2, N2, Dv]  dtype, any element strides, Dv <= D
//   atten_mask     modes 0/1: [maxSq, maxSkv] uint8 (0 = visible), indexed by the local (i, j) of every batch;
//                  modes 2-4: the [2048, 2048] compressed mask (checked, §4); absent: every key visible (§4)
//   attention_out  [T1, N1, Dv]  dtype, contiguous
//   softmax_max    [T1, N1, 8]   float32, contiguous memory; layout §5: kPerBatch (softmax_layout ""): batch b
//   softmax_sum    [T1, N1, 8]   float32  at float 8*N1*q0_b, ordered [N1][Sq_b][8]; kTnd: (t*N1 + h)*8.
//                                         Each value is stored 8 times.
// Lengths are prefix sums without a leading zero (§3); a run of zeros after the last non-zero entry marks
// trailing empty batches ([2, 5, 9, 0, 0] = lengths 2, 3, 4, 0, 0).
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

// Layout of softmax_max / softmax_sum (§5): softmax_layout "" (per batch, as compress_attention) or "TND".
enum class StatsLayout : int { kPerBatch = 0, kTnd = 1 };

// Value of pre_tockens / next_tockens that torch_npu uses as its default (no restriction).
constexpr int64_t kWindowAttentionNoLimit = 2147483647;

struct WindowAttentionParams {
  DType dtype = DType::kBF16;  // dtype of query, key, value and attention_out

  Tensor3 query;  // [T1, N1, D]
  Tensor3 key;    // [T2, N2, D]
  Tensor3 value;  // [T2, N2, Dv]

  double scale = 1.0;    // multiplies q.k after the fp32 dot product; used as float32 (§5 step 1)
  int64_t head_num = 0;  // must equal N1

  // Visibility (§4).
  int64_t sparse_mode = 0;                         // 0..4
  int64_t pre_tockens = kWindowAttentionNoLimit;   // keys before the diagonal (modes 0 and 4; torch_npu spelling)
  int64_t next_tockens = kWindowAttentionNoLimit;  // keys after the diagonal (modes 0 and 4)
  Mask2 atten_mask;                                // see the layout comment above; data == nullptr: absent
  // Modes 2-4 only: act as if the compressed [2048, 2048] mask of §4 were given (atten_mask must then be
  // absent). Lets C++ callers and nsa_ops.sliding_window_attention ask for the mode's pattern without a tensor.
  bool compressed_mask_implied = false;

  // Rows without a visible key (§6): 0 and 1 the uniform average, 2 zeros ("invalid row").
  int64_t inner_precise = 0;

  IntList actual_seq_qlen;   // B prefix sums of Sq_b, max == T1
  IntList actual_seq_kvlen;  // B prefix sums of Skv_b, max <= T2

  StatsLayout softmax_layout = StatsLayout::kPerBatch;

  // Outputs (contiguous, see the layout comment at the top of this file).
  void* attention_out = nullptr;  // [T1, N1, Dv] dtype
  float* softmax_max = nullptr;   // [T1, N1, 8]
  float* softmax_sum = nullptr;   // [T1, N1, 8]
};

// Derived sizes of a validated call (filled by validate_window_attention).
struct WindowAttentionShape {
  int64_t T1 = 0, N1 = 0, D = 0, T2 = 0, N2 = 0, Dv = 0, G = 0;
  int64_t B = 0;
  int64_t max_sq = 0, max_skv = 0;
  bool has_mask = false;  // a mask applies (explicit, or the implied compressed mask); else all keys visible
};

// Checks every rule of §2, §3, §4 and §9 that concerns these params (plus non-null pointers). On success fills
// *shape (may be null); on failure leaves it untouched.
Status validate_window_attention(const WindowAttentionParams& p, WindowAttentionShape* shape);

// numels of §5 (torch_npu's formula on the lists exactly as given): N1 * (q[0]*kv[0] + sum_{b>=1} (q[b] -
// q[b-1]) * (kv[b] - kv[b-1])). Lists of different lengths use the shorter one.
int64_t window_attention_numels(int64_t head_num, const IntList& actual_seq_qlen, const IntList& actual_seq_kvlen);

// Forward entry points (§5, §6). Each validates first.
// Reference: plain loops over every (query, key) pair, the contract in code (single-threaded; slow). The tests'
// oracle. fp32 arithmetic for bf16/fp16/fp32 inputs, fp64 for fp64 inputs.
Status window_attention_reference(const WindowAttentionParams& p);
// Optimized CPU backend: work proportional to the visible band, GEMMs of the per-ISA kernel table, threads;
// results do not depend on options.num_threads. fp64 inputs (a testing extension) run the reference.
Status window_attention_cpu(const WindowAttentionParams& p, const CpuOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Backward (§7): gradients of attention_out with respect to query, key and value. The forward's description
// (inputs, scalars, visibility, lengths, softmax_layout) is reused from `fwd`; its output pointers are ignored.
// Inputs of the backward:
//   attention_in  [T1, N1, Dv] dtype, any strides: the forward's attention_out (O of §7)
//   dy            [T1, N1, Dv] dtype, any strides: the gradient of attention_out
//   softmax_max, softmax_sum: [T1, N1, 8] float32 in fwd.softmax_layout; element 0 of each row is read
// Outputs (contiguous, dtype): grad_query [T1, N1, D], grad_key [T2, N2, D], grad_value [T2, N2, Dv]; key/value
// rows that no query sees (rows past max(actual_seq_kvlen) included) receive zeros.
struct WindowAttentionGradParams {
  WindowAttentionParams fwd;
  Tensor3 attention_in;
  Tensor3 dy;
  const float* softmax_max = nullptr;
  const float* softmax_sum = nullptr;
  void* grad_query = nullptr;
  void* grad_key = nullptr;
  void* grad_value = nullptr;
};

Status validate_window_attention_backward(const WindowAttentionGradParams& p, WindowAttentionShape* shape);
// Reference: §7 line by line (P and dS unrounded, fp32 sums; fp64 for fp64 inputs).
Status window_attention_backward_reference(const WindowAttentionGradParams& p);
// Optimized CPU backward: deterministic (no atomics; dK/dV gathered per key tile, dQ per query tile), work
// proportional to the band, per-thread memory bounded by the tile sizes.
Status window_attention_backward_cpu(const WindowAttentionGradParams& p, const CpuOptions& options = {});

}  // namespace nsa
