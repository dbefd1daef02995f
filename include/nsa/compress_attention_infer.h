// nsa-ops public C++ API: decode-time compressed attention with block selection over a paged compressed cache
// (torch-free).
//
// Reproduces torch_npu.npu_nsa_compress_attention_infer; the contract is docs/spec/decode.md §3 (sections cited as
// §). Every entry point validates its params first (validate_compress_attention_infer) and writes nothing when
// validation fails; the returned Status names the offending argument.
//
// Names: l = compress_block_size, d = compress_stride, l' = select_block_size, K = select_block_count,
// P = page_block_size, G = N1 / N2, M = l' / d, N = l / d. Lengths are per batch (not prefix sums): C_b =
// actual_cmp_seq_kvlen[b], q_b = actual_seq_qlen[b] (1 when not given), S_b = actual_sel_seq_kvlen[b].
// For batch b, query token i < q_b, head h, KV head n2 = h / G (§3 steps 1-8):
//   k_c, v_c = key/value[block_table[b, c / P], c % P, n2 * D ...]                     c < C_b
//   S_c = f32(q . k_c) * f32(scale); MTP (atten_mask given): S_c = -FLT_MAX where c*d + l - 1 > S_b - q_b + i
//   P = softmax(S) in fp32;  attention_out = rne_T( sum_c rne_T(P_c) * f32(v_c) )
//   Sel'_b = ceil(((C_b - 1)*d + l) / l');  score[k] = sum_g sum_i w_i P_g[M(k+1) - i]  (k < Sel'_b)
//   score[0] = score[Sel'_b - 2] = score[Sel'_b - 1] = +inf (those that exist)
//   topk_indices = the K best of score (descending, ties to the smaller index); slots past Sel'_b hold -1.
//
// Layouts. Query rows are addressed as a 4-D view [B', Sq', N1, D]: TND is [1, T, N1, D] (token i of batch b is
// row (0, sum_{b'<b} q_b' + i)), BSND is [B, Sq, N1, D] (row (b, i)). The outputs are contiguous:
//   attention_out  TND [T, N1, Dv] / BSND [B, Sq, N1, Dv]   dtype
//   topk_indices   TND [T, N2, K]  / BSND [B, Sq, N2, K]    int32
// BSND rows i >= q_b (when actual_seq_qlen gives q_b < Sq) get a zero attention_out and -1 indices (our decision,
// as decode.md §7 item 7 for the selected attention).
//   key    [num_pages, P, N2 * D]    dtype, any element strides
//   value  [num_pages, P, N2 * Dv]   dtype, any element strides
//   block_table [B, max_pages] int32, row b at block_table + b * block_table_row_stride
#pragma once

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa {

enum class DecodeLayout : int { kTND = 0, kBSND = 1 };

struct CompressAttentionInferParams {
  DType dtype = DType::kBF16;  // dtype of query, key, value and attention_out
  DecodeLayout layout = DecodeLayout::kTND;

  const void* query = nullptr;  // 4-D view [B', Sq', N1, D] (TND: B' = 1)
  int64_t query_size[4] = {0, 0, 0, 0};
  int64_t query_stride[4] = {0, 0, 0, 0};
  Tensor3 key;    // [num_pages, P, N2 * D]
  Tensor3 value;  // [num_pages, P, N2 * Dv]

  double scale_value = 1.0;
  int64_t head_num = 0;            // N1
  int64_t key_value_head_num = 0;  // N2
  int64_t select_block_size = 0;   // l'
  int64_t select_block_count = 0;  // K
  int64_t page_block_size = 0;     // P
  int64_t compress_block_size = 0;  // l
  int64_t compress_stride = 0;      // d

  bool has_atten_mask = false;  // §3 step 3: presence of atten_mask switches MTP causality on (contents not read)

  const int32_t* block_table = nullptr;  // [B, max_pages]; null: not given (an error)
  int64_t block_table_rows = 0, block_table_cols = 0, block_table_row_stride = 0;

  IntList actual_seq_qlen;       // q_b per batch, or not given (1 each)
  IntList actual_cmp_seq_kvlen;  // C_b per batch (required)
  IntList actual_sel_seq_kvlen;  // S_b per batch (read only for MTP causality: atten_mask given and some q_b > 1)

  void* attention_out = nullptr;    // contiguous, dtype
  int32_t* topk_indices = nullptr;  // contiguous
};

// Derived sizes of a validated call.
struct CompressAttentionInferShape {
  int64_t B = 0, rows = 0;  // batches; query rows of the layout (TND: T; BSND: B * Sq)
  int64_t Sq = 1;           // BSND: query.shape[1]; TND: 1
  int64_t N1 = 0, N2 = 0, G = 0, D = 0, Dv = 0;
  int64_t num_pages = 0, P = 0, max_pages = 0;
  int64_t l = 0, d = 0, lp = 0, K = 0, M = 0, N = 0;
  int64_t max_c = 0, max_sel = 0, max_q = 0;
  bool mtp = false;  // causality applied: atten_mask given and some q_b > 1
};

// Sel'_b of §3 step 6 for C >= 1 compressed tokens: ceil(((C - 1) d + l) / l').
inline int64_t decode_selection_blocks(int64_t C, int64_t l, int64_t d, int64_t lp) {
  return ((C - 1) * d + l + lp - 1) / lp;
}

// Checks every argument rule of §3 (plus non-null pointers). On success fills *shape (may be null).
Status validate_compress_attention_infer(const CompressAttentionInferParams& p, CompressAttentionInferShape* shape);

// Reference: plain loops, the contract in code (single-threaded; float32 arithmetic, float64 for fp64 inputs).
Status compress_attention_infer_reference(const CompressAttentionInferParams& p);
// Optimized CPU backend: threads over (batch, KV head) units. A unit gathers its C_b compressed keys and values
// from their pages into packed GEMM panels, stacks its q_b x G query rows, and runs the CPU kernel tables (GEMMs,
// row softmax, box filters of the selection scores, top-k); work per unit is proportional to q_b * G * C_b.
// Results are bitwise the same for every thread count; against the reference they agree within the attention
// tolerance (the GEMMs and exp add in their own orders; decode.md §6).
Status compress_attention_infer_cpu(const CompressAttentionInferParams& p, const CpuOptions& options = {});

}  // namespace nsa
