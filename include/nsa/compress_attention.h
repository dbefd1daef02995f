// nsa-ops public C++ API: NSA compressed attention (torch-free).
//
// Reproduces torch_npu.npu_nsa_compress_attention; the contract is docs/spec/compress_attention.md (sections cited as §).
// Everything a backend needs is in CompressAttentionParams: raw pointers, sizes and element strides.
// Every entry point validates its params first (validate_compress_attention) and writes nothing
// when validation fails; the returned Status names the offending argument.
//
// Tensor shapes and layouts (T = total query tokens of all batches, packed "TND"):
//   query          [T,  N1, D ]  dtype,  any element strides (q_stride)
//   key            [T2, N2, D ]  dtype,  any element strides (k_stride); rows >= cmp_len[B-1] ignored
//   value          [T2, N2, D2]  dtype,  any element strides (v_stride); rows >= cmp_len[B-1] ignored
//   atten_mask     [maxSq, maxC]   uint8 (0 = keep, non-zero = remove), optional, any strides
//   topk_mask      [maxSq, maxSel] uint8 (non-zero = force the block), optional, any strides
//   attention_out  [T, N1, D2]  dtype,   contiguous
//   topk_indices   [T, N2, K]   int32,   contiguous, indices local to the batch in [0, Sel_b) (-1: empty slot, only
//                                        with short_batches)
//   softmax_max    [T, N1, 8]   float32, contiguous memory in the per-batch layout of §4:
//   softmax_sum    [T, N1, 8]   float32  batch b starts at float 8*N1*(sum of Sq before b) and is
//                                        laid out [N1][Sq_b][8], each value repeated 8 times.
// Lengths are prefix sums (§2): seq_qlen[b] = Sq_0+..+Sq_b, cmp_seq_kvlen[b] = C_0+..+C_b,
// sel_seq_kvlen[b] = Sel_0+..+Sel_b with Sel_b = ceil(C_b / M), M = select_block_size / compress_stride.
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

struct CompressAttentionParams {
  DType dtype = DType::kBF16;  // dtype of query, key, value and attention_out

  Tensor3 query;  // [T, N1, D]
  Tensor3 key;    // [T2, N2, D]
  Tensor3 value;  // [T2, N2, D2]

  double scale_value = 1.0;       // multiplies q.k; used as float32 (§3.1)
  int64_t head_num = 0;           // must equal N1
  int64_t compress_block_size = 0;  // l
  int64_t compress_stride = 0;      // d
  int64_t select_block_size = 0;    // l'
  int64_t select_block_count = 0;   // K

  Mask2 topk_mask;   // [maxSq, maxSel] or absent
  Mask2 atten_mask;  // [maxSq, maxC] or absent

  IntList actual_seq_qlen;       // B prefix sums of Sq_b, last == T
  IntList actual_cmp_seq_kvlen;  // B prefix sums of C_b, last <= T2, every C_b >= 1
  IntList actual_sel_seq_kvlen;  // optional; when given must equal prefix sums of ceil(C_b / M)

  // Extensions of the Pythonic API (§10). All false: the NPU's rules (§6), which the drop-in keeps.
  //   causal: the masks of §9 from the lengths alone: query row s loses compressed token c when c·d + l - 1 > s,
  //     and blocks 0, s/l' - 1 and s/l' (those below Sel_b) are forced. atten_mask and topk_mask must be absent;
  //     no [maxSq, maxC] mask is materialised (a strided view of max_sq + (max_c - 1)·d bytes stands for it).
  //     Results equal those of the call with make_atten_mask / make_topk_mask's masks, bitwise.
  //   larger_masks: atten_mask / topk_mask may have more rows and columns than [maxSq, maxC] / [maxSq, maxSel];
  //     their top-left part is used.
  //   short_batches: a batch with Sel_b < K is accepted; slots Sel_b..K-1 of its rows hold -1 (the family's
  //     empty-slot marker) and slots 0..Sel_b-1 follow §3.8.
  bool causal = false;
  bool larger_masks = false;
  bool short_batches = false;

  // Outputs (contiguous, see the layout comment at the top of this file).
  void* attention_out = nullptr;   // [T, N1, D2] dtype
  int32_t* topk_indices = nullptr;  // [T, N2, K]
  float* softmax_max = nullptr;     // [T, N1, 8]
  float* softmax_sum = nullptr;     // [T, N1, 8]
};

// Derived sizes of a validated call (filled by validate_compress_attention).
struct CompressAttentionShape {
  int64_t T = 0, N1 = 0, D = 0, T2 = 0, N2 = 0, D2 = 0, G = 0;
  int64_t B = 0;
  int64_t M = 0;  // l' / d: compressed tokens per selection block
  int64_t N = 0;  // l / d: selection blocks a compressed token overlaps
  int64_t K = 0;
  int64_t max_sq = 0, max_c = 0, max_sel = 0;
};

// Checks every rule of docs/spec/compress_attention.md §6 (plus non-null pointers). On success fills *shape (may be null).
Status validate_compress_attention(const CompressAttentionParams& p, CompressAttentionShape* shape);

// Forward entry points (§3). Each validates first.
// Reference: plain loops, the spec in code (single-threaded; slow). The tests' oracle.
Status compress_attention_reference(const CompressAttentionParams& p);
// Optimized CPU backend: SIMD with runtime ISA dispatch, multithreaded.
Status compress_attention_cpu(const CompressAttentionParams& p, const CpuOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Backward (§7): gradients of attention_out with respect to query, key and value.
// The forward's description (inputs, scalars, masks, lengths) is reused from `fwd`; its output
// pointers are ignored. Inputs of the backward:
//   attention_out [T, N1, D2] dtype, any strides: the forward's output as returned
//   grad_out      [T, N1, D2] dtype, any strides: dO
//   softmax_max, softmax_sum: the forward's statistics, [T, N1, 8] float32 in §4's per-batch layout
// Outputs (contiguous, dtype): grad_query [T, N1, D], grad_key [T2, N2, D], grad_value [T2, N2, D2];
// key/value rows past cmp_seq_kvlen[B-1] receive zeros.
struct CompressAttentionGradParams {
  CompressAttentionParams fwd;
  Tensor3 attention_out;
  Tensor3 grad_out;
  const float* softmax_max = nullptr;
  const float* softmax_sum = nullptr;
  void* grad_query = nullptr;
  void* grad_key = nullptr;
  void* grad_value = nullptr;
};

Status validate_compress_attention_backward(const CompressAttentionGradParams& p, CompressAttentionShape* shape);
Status compress_attention_backward_reference(const CompressAttentionGradParams& p);
Status compress_attention_backward_cpu(const CompressAttentionGradParams& p, const CpuOptions& options = {});

}  // namespace nsa
