// Per-ISA kernels of the CPU backend (internal). Each kernels_<isa>.cpp compiles
// kernels_impl.h with its own flags into its own namespace and exports one KernelTable;
// forward.cpp (baseline flags) picks the table once per call and drives the tiles.
//
// Packed operand layouts (panel width kPanel = 64 columns, zero padded):
//   fp32 B panels:  [n_panels][P][64] floats           (P = reduction length)
//   bf16 B panels:  [n_panels][P][64][2] bf16 bits       (P = reduction length in pairs)
//   fp32 A rows:    A[r * lda + p]                       (lda in floats)
//   bf16 A rows:    A[r * lda + 2p], A[r * lda + 2p + 1] (lda in bf16 elements, even)
//   C (fp32):       C[r * ldc + n], n < n_panels * 64
#pragma once

#include <algorithm>
#include <cstdint>

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa::cpu {

constexpr int64_t kPanel = 64;  // columns of one packed B panel

// How normalize_row stores the rounded P it produces for the P.V product.
enum class PStore : int {
  kBf16Bits = 0,  // bf16 bits (uint16), for the bf16 dot-product GEMM
  kF32AsBf16 = 1,  // float32 holding P rounded to bf16
  kF32AsF16 = 2,   // float32 holding P rounded to fp16
  kF32 = 3,        // float32, unrounded (fp32 inputs)
};

// GEMM on packed panels (layouts at the top of this file).
struct GemmKernels {
  // C[r][j] = alpha * sum_p A[r][p] B[p][col0 + j] (+ C[r][j] if accumulate), r < R, j < ncols;
  // col0 and ncols are multiples of 16 (any panel boundaries may be crossed).
  // The reduction is split in chunks of kc (the result of each chunk is added to C); pass
  // kc >= P for a single chunk (then C = alpha * full dot product, rounded once).
  void (*f32)(const float* A, int64_t lda, int64_t R, const float* B, int64_t panel_stride, int64_t col0,
              int64_t ncols, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha, bool accumulate);
  // f32 with gathered rows: A row r at a_rows[r] (element p at a_rows[r][p]), C row r at c_rows[r] (column col0 + j
  // at c_rows[r][j]); the same products, sums and roundings as f32 on those rows. A rows may repeat; C rows must be
  // distinct.
  void (*f32_gather)(const float* const* a_rows, int64_t R, const float* B, int64_t panel_stride, int64_t col0,
                     int64_t ncols, int64_t P, int64_t kc, float* const* c_rows, float alpha, bool accumulate);
  // Same as f32 with bf16 pairs (vdpbf16ps); null when the ISA has no bf16 dot product.
  void (*bf16)(const uint16_t* A, int64_t lda, int64_t R, const uint16_t* B, int64_t panel_stride,
               int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha,
               bool accumulate);
  // bf16 with gathered rows as f32_gather (pair p of A row r at a_rows[r] + 2p); null where bf16 is null.
  void (*bf16_gather)(const uint16_t* const* a_rows, int64_t R, const uint16_t* B, int64_t panel_stride,
                      int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* const* c_rows, float alpha,
                      bool accumulate);
  // The products of one reduction chunk of O = rne(P).V on bf16 pairs (vdpbf16ps), tokens read in place:
  //   T[r][e] = sum over token pairs (2j, 2j + 1), j = 0, 1, ... in order, of one vdpbf16ps step
  //             P[r][2j] * V_2j[e] + P[r][2j + 1] * V_2j+1[e]          (fp32 accumulator per (r, e), starting at +0)
  //   O[r][e] = accumulate ? O[r][e] + T[r][e] : T[r][e]               for r < R, e < round_up(Dv, 32)
  // with V_c = vrow[c] (Dv contiguous bf16 values of token c, c < ntok; an odd last token is paired with zeros) and
  // P[r][c] = P[r * ldp + c] (bf16 bits, c < round_up(ntok, 2)), i.e. exactly the chunk of the shared GEMM
  // gemm.bf16 (A = P rows, B = V as pair panels, one reduction chunk) without packing V. work: R * round_up(Dv, 64)
  // floats of scratch. O row r at O + r * ldo. vrow lists nvalid >= ntok rows: those past ntok (the next chunk's) are
  // only prefetched.
  // Null except on the avx512bf16 path.
  void (*pv_bf16)(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t Dv, const uint16_t* P,
                  int64_t ldp, int64_t R, float* O, int64_t ldo, bool accumulate, float* work);
};

// Row-wise softmax steps, conversions and stores of the forward.
struct RowKernels {
  // max(x[0..n)), NaN entries ignored, start value `init`. n % 16 == 0.
  float (*row_max)(const float* x, int64_t n, float init);
  // x[i] = exp(x[i] - m) in place; returns the sum in the canonical order (16 interleaved
  // partial sums by i % 16, then a fixed halving tree), identical on every ISA. n % 16 == 0.
  // m is at least every non-NaN x[i] (a row maximum, as row_max returns): x[i] - m <= 0 or NaN.
  float (*exp_sum)(float* x, int64_t n, float m);
  // Both of the above for `rows` rows, row r at x + r * ld (n columns, n % 16 == 0): m[r] = row_max(row, n, init),
  // then the row = exp(row - m[r]) with l[r] the exp_sum; exactly the bits of the two calls row by row, with the
  // rows' dependency chains (lane reductions, exp, sums) overlapped.
  void (*softmax_rows)(float* x, int64_t ld, int64_t rows, int64_t n, float init, float* m, float* l);
  // x[i] /= l_sum (x keeps fp32 P) and out[i] = P rounded as `store` says. n % 16 == 0.
  void (*normalize_row)(float* x, int64_t n, float l_sum, void* out, PStore store);
  // The G rows of one token (1 <= G <= kMaxFusedGroup): x row g at x + g * ldx holds exp values, l[g] their
  // sum. For each row, P = x / l[g] rounded as `store` says into out + g * ld_out (elements of the store's
  // type), exactly as normalize_row; and sum_out[i] = the §3.6 pairwise group sum of the fp32 P_g[i] (level
  // by level, sum[a] = v[2a] + v[2a+1], an odd last element carried up), the same sums as add_row over
  // rows. x itself is not updated; sum_out may be x (row 0). n % 16 == 0.
  void (*normalize_group)(const float* x, int64_t ldx, int G, const float* l, int64_t n, void* out,
                          int64_t ld_out, PStore store, float* sum_out);
  // out[i] = sum_{j < width} in[i - j] for i in [0, n), summed in order j = 0, 1, ...;
  // in[-width+1 .. -1] must be readable. n % 16 == 0.
  void (*box_sum)(const float* in, float* out, int64_t n, int width);
  // x[i] += y[i], n % 16 == 0.
  void (*add_row)(float* x, const float* y, int64_t n);
  // dst[i] = src[i] rounded to dtype (bf16 / fp16 nearest even, fp32 copy), any n.
  void (*store_row)(const float* src, void* dst, int64_t n, DType dtype);
  // store_row with non-temporal (streaming) stores where dst is 64-byte aligned and the row a whole number
  // of 64-byte lines, else store_row: for large outputs written once, no read-for-ownership and no cache
  // pollution. The caller runs stream_fence() before its results are read by another thread.
  void (*store_row_stream)(const float* src, void* dst, int64_t n, DType dtype);
  void (*stream_fence)();
  // dst[i] = float(src[i]) for a contiguous bf16 / fp16 / fp32 row, any n.
  void (*load_row)(const void* src, float* dst, int64_t n, DType dtype);
};

// Selection (docs/spec/compress_attention.md §3.8 order).
struct SelectKernels {
  // Top-K of score[0..sel) in §3.8 order (descending, ties by smaller index) into idx[0..K), for
  // 1 <= K <= 32, K <= sel; work: 2 * sel ints of scratch. Returns false, writing nothing, when a score
  // is NaN (the caller then orders NaN by detail::topk_before, common/topk_order.h).
  bool (*top_k)(const float* score, int64_t sel, int K, int32_t* idx, int32_t* work);
  // The selection-block scores of one fp32 row p (§3.5): for k in [k0, k1),
  //   score[k] = sum_{m<M} b[M(k+1) - m],   b[x] = sum_{n<N} p[x - n],
  // each sum in order (m = 0, 1, ...; n = 0, 1, ...): the same values as box_sum(N), box_sum(M) and the picks
  // out[M(k+1)]. p[M k0 - N + 2 .. M k1] must be readable; 1 <= N <= 8. Returns false, writing nothing, where this
  // ISA has no kernel for M (the caller then box-filters): the AVX-512 paths have one for M = 2, 4 and 8.
  bool (*block_scores)(const float* p, int64_t k0, int64_t k1, int M, int N, float* score);
  // score[k] = FLT_MAX where forced[k] != 0, for k < n (§3.7; any n).
  void (*force)(float* score, const uint8_t* forced, int64_t n);
};

// Backward (docs/spec/compress_attention.md §7).
struct GradKernels {
  // Softmax gradient of one row of a tile pair, in place, n % 16 == 0. On entry s holds the scaled
  // scores and dp the products dO.v; with e = exp(s[i] - m) * il (the exp of exp_sum):
  //   s[i] = P = (keep[i] != 0 ? e : 0),   dp[i] = dS = P * (dp[i] - dlt).
  void (*softmax_grad_row)(float* s, float* dp, const uint8_t* keep, int64_t n, float m, float il, float dlt);
  // Two fp32 rows rounded to bf16 (nearest even), as pairs: pairs[2i] = a[i], pairs[2i + 1] = b[i] (a panel
  // row of gemm_bf16's B layout whose pairs run over rows: a = row 2p, b = row 2p + 1), and, where row_a /
  // row_b are not null, as plain rows row_a[i] = a[i], row_b[i] = b[i]. n % 16 == 0. Null where gemm_bf16 is
  // null.
  void (*pack_rows_bf16)(const float* a, const float* b, int64_t n, uint16_t* pairs, uint16_t* row_a,
                         uint16_t* row_b);
  // dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols (16-bit elements), any sizes. With
  // rows even and dst rows of gemm_bf16's A layout, this makes an A operand whose pairs run over src rows.
  void (*transpose_u16)(const uint16_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint16_t* dst,
                        int64_t ld_dst);
  // The same for 32-bit elements (fp32 A operands).
  void (*transpose_u32)(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst,
                        int64_t ld_dst);
};

// One table per ISA path, filled with designated initializers by make_table (src/cpu/kernels_impl.h) in
// src/cpu/arch/<arch>/kernels_<isa>.cpp. A null entry means the path has no such kernel (gemm.bf16 and
// grad.pack_rows_bf16 without a bf16 dot product).
struct KernelTable {
  CpuIsa isa;
  GemmKernels gemm;
  RowKernels rows;
  SelectKernels select;
  GradKernels grad;
};

// n rows of `words` 32-bit words (a bf16 pair or an fp32 value each; row r at src + r * ld_src) as the columns
// first_col + r of packed B panels of `red` words each per column: word e of column c at
// panels[(c / kPanel) * red * kPanel + e * kPanel + c % kPanel]. One transpose per panel the columns touch.
inline void transpose_rows_into_panels(const KernelTable& kt, const uint32_t* src, int64_t ld_src, int64_t n,
                                       int64_t words, int64_t first_col, int64_t red, uint32_t* panels) {
  for (int64_t r0 = 0; r0 < n;) {
    const int64_t c = first_col + r0, cols = std::min(n - r0, kPanel - c % kPanel);
    kt.grad.transpose_u32(src + r0 * ld_src, ld_src, cols, words, panels + (c / kPanel) * red * kPanel + c % kPanel,
                          kPanel);
    r0 += cols;
  }
}
constexpr int kMaxFusedGroup = 64;

const KernelTable* kernels_scalar();
#if NSA_HAVE_X86_KERNELS
const KernelTable* kernels_scalar_fma();  // the scalar table built with FMA (same results); needs FMA + AVX state
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512bf16();
#endif

// The table of a runnable path (resolve_isa's result); the scalar table where no SIMD table is compiled in. For
// CpuIsa::kScalar on an x86 CPU with FMA it is kernels_scalar_fma() (same results, faster).
const KernelTable* kernels_for(CpuIsa isa);

}  // namespace nsa::cpu
