// Optimized CPU backend of npu_nsa_compress_attention_infer (docs/spec/decode.md §3).
//
// Units: batch b with all its KV heads where the batches alone keep every thread busy (B a multiple of the threads,
// or large), else (batch b, KV head n2); handed to the threads in order; each writes only its own output rows. A
// unit of several heads goes over the keys run by run and over the values chunk by chunk for all its heads, so that
// each page's rows (the heads of a token lie side by side) come from memory once and whole (128k-b8 of
// bench_decode.py, 2 threads of a Zen 5: 4.3-4.4 -> 3.7-4.1 ms); per head, the steps below are unchanged. Per
// head, with R = q_b * G query rows stacked as row r = i * G + g (token i, head h = n2 * G + g) and C = C_b. The
// compressed keys and values are read where they lie in their pages (token c at page block_table[b, c / P], row
// c % P): the unit's bytes of K and V cross the memory bus once each, and its working set is O(R * C) floats.
//   1. the R query rows as the B operand of the shared GEMM (src/cpu/kernels.h layouts, columns = query rows,
//      zero padded to rp = R rounded up to 16): bf16 pairs on the vdpbf16ps path, fp32 otherwise.
//   2. S = (Q . K^T) * scale (§3 step 2), computed transposed over runs of at most 64 tokens of one page: the run's
//      key rows are the A operand in place (lda = the page's row stride; bf16 pairs need an even D, fp32 GEMMs fp32
//      keys), else copied into a small A tile (bf16 rows zero padded to an even length, or widened to fp32); the
//      tile S^T[c][r] is transposed into the score rows S[r][c]. Each score is one fp32 chain over D (pairs), the
//      chain of the untransposed product, so the scores are those of Q . K^T. MTP causality replaces the scores of
//      compressed tokens whose window ends after the query token by -FLT_MAX (step 3); padding columns -inf.
//   3. exact softmax per row (row_max, exp_sum, normalize_row: fp32 P kept in S, P rounded to nearest even for
//      P.V, step 4); a fully masked row gets the uniform 1/C from the same formulas.
//   4. O[R][Dv] = rne(P) . V (fp32 accumulation, step 5) in reduction chunks of kPvChunk pairs (bf16) or tokens
//      (fp32), each chunk's sum added to O: on the avx512bf16 path with contiguous value rows the value rows are
//      read in place by KernelTable::gemm.pv_bf16 (src/cpu/kernels.h); otherwise each chunk's values are packed
//      into the GEMM's pair or fp32 panels (a buffer of one chunk) and multiplied by the shared GEMM. Both give the
//      same bits.
//      O is stored rounded to nearest even.
//   5. selection (step 6): per token, the fp32 P rows of its G heads added in sequence g = 0, 1, ... (the §6 map is
//      linear: equal to summing score_h up to rounding), two box filters (widths N, then M) picked at M(k+1),
//      forced blocks +inf (step 7), top-K in the §3 step 8 order with -1 past Sel'_b.
// Every unit's arithmetic depends only on its data and the ISA path: results are bitwise the same for every thread
// count. fp64 inputs (a testing extension) run the reference.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/numeric.h"
#include "common/status_guard.h"
#include "common/threads.h"
#include "common/topk_order.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "nsa/compress_attention_infer.h"
#include "ops/compress_attention/gemm_plan.h"
#include "ops/compress_attention_infer/rows.h"

namespace nsa {

namespace {

using cpu::kPanel;
using cpu::KernelTable;
using cpu::PStore;
using detail::AlignedBuffer;
using detail::round_up;

constexpr int64_t kPvChunk = 256;  // reduction chunk of P.V: pairs (bf16) or tokens (fp32)
constexpr int64_t kRun = 64;       // tokens per transposed score tile
constexpr int64_t kSlice = 16;     // key rows per score GEMM call (the next run's rows are prefetched in between)
constexpr int64_t kValueAhead = 64;  // tokens between a packed value row and the row prefetched meanwhile

struct Plan {
  const CompressAttentionInferParams* p = nullptr;
  CompressAttentionInferShape sh;
  DecodeRows rows;
  const KernelTable* kt = nullptr;
  // set_gemm_plan (ops/compress_attention/gemm_plan.h)
  bool bf16_dot = false;
  PStore pstore = PStore::kF32;
  float scale = 1.0f;
  int64_t qk_red = 0;  // reduction length of Q.K^T: pairs (bf16) or elements (fp32)
  int64_t q_lda = 0;   // elements per copied key row of the A tile: D, or 2 * qk_red for pairs
  int64_t d2p = 0;     // Dv rounded up to the panel width
  int64_t cp_max = 0;  // max C_b rounded up to the panel width
  int64_t rp = 0;      // max R rounded up to 16: columns of the query operand and of the score tile
  bool k_in_place = false;  // key rows are the score GEMM's A operand as they lie in the pages
  bool v_in_place = false;  // value rows read in place by KernelTable::gemm.pv_bf16
  int64_t pv_tokens = 0;    // tokens per P.V reduction chunk: 2 * kPvChunk (pairs) or kPvChunk
  int64_t key_row_bytes = 0;  // bytes from a key row's first element to past its last (prefetched)
  int64_t margin = 0;  // zero floats before a selection row (box filter reads), a multiple of 16
  int64_t sel_len = 0;  // floats of a selection row after the margin: covers [0, M * max Sel' + 1)
  int64_t ld_s = 0;     // floats per score row: margin + max(cp_max, sel_len)
  int64_t heads_per_unit = 1;  // KV heads of a unit: 1, or all N2 (each page's rows of every head read together)
};

// The rows of one KV head of a unit: its queries (B operand), scores and fp32 P (S), rounded P (pa), output (o) and
// (in-place P.V) its value row pointers.
struct HeadState {
  AlignedBuffer<uint8_t> qb, pa;
  AlignedBuffer<float> s, o;
  std::vector<const uint16_t*> vrow;
};

struct Scratch {
  std::vector<HeadState> heads;  // the unit's KV heads
  AlignedBuffer<uint8_t> atile, vpack;
  AlignedBuffer<float> tile, pv_work, box1, box2, score;
  std::vector<int32_t> topk_work;
  std::vector<int64_t> order;
  std::vector<float> vrow32;  // two widened value rows of d2p floats (zero past Dv)
};

void init_scratch(const Plan& pl, Scratch& sc) {
  const CompressAttentionInferShape& sh = pl.sh;
  const int64_t R = sh.max_q * sh.G, esz = pl.bf16_dot ? 2 : 4;
  sc.heads.resize(static_cast<size_t>(pl.heads_per_unit));
  for (HeadState& hs : sc.heads) {
    hs.qb.reset(round_up(pl.rp, kPanel) * pl.q_lda * esz);
    hs.pa.reset(R * pl.cp_max * esz);
    hs.s.reset(R * pl.ld_s);
    hs.o.reset(R * pl.d2p);
    if (pl.v_in_place) hs.vrow.resize(static_cast<size_t>(pl.cp_max));
  }
  if (!pl.k_in_place) sc.atile.reset(kRun * pl.q_lda * esz);
  sc.tile.reset(kRun * pl.rp);
  if (pl.v_in_place) {
    sc.pv_work.reset(R * pl.d2p);
  } else {
    sc.vpack.reset(pl.pv_tokens * pl.d2p * esz);
    sc.vrow32.assign(static_cast<size_t>(2 * pl.d2p), 0.0f);
  }
  sc.box1.reset(pl.ld_s);
  sc.box2.reset(pl.ld_s);
  sc.score.reset(sh.max_sel);
  sc.topk_work.resize(static_cast<size_t>(2 * sh.max_sel));
  sc.order.resize(static_cast<size_t>(sh.max_sel));
}

// Offset of element (reduction index r < red, column n) of a B operand in its panels (kernels.h layouts).
inline int64_t panel_offset(bool pairs, int64_t red, int64_t r, int64_t n) {
  const int64_t panel = (n / kPanel) * red * kPanel;
  return pairs ? panel + (r / 2) * kPanel * 2 + (n % kPanel) * 2 + r % 2 : panel + r * kPanel + n % kPanel;
}

// Element offset of compressed token c of KV head n2 of batch b in key (E = D) or value (E = Dv).
inline int64_t token_offset(const Tensor3& t, const int32_t* table, int64_t P, int64_t c, int64_t n2, int64_t E) {
  return table[c / P] * t.stride[0] + (c % P) * t.stride[1] + n2 * E * t.stride[2];
}

// Step 1: query rows (b, i < q_b), heads n2 * G + g, as the B operand Q^T: reduction index e < D, column r = i * G + g,
// zero padded (columns up to a whole panel, the odd element of D for pairs).
void pack_queries(const Plan& pl, HeadState& hs, int64_t b, int64_t n2, int64_t q_b) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const int64_t G = sh.G, rows = round_up(q_b * G, kPanel);
  std::memset(hs.qb.get(), 0, static_cast<size_t>(rows * pl.q_lda * (pl.bf16_dot ? 2 : 4)));
  // 32-bit words (a bf16 pair or an fp32 value) of contiguous, aligned rows: a token's G rows transposed into the
  // panels as columns i * G .. (cpu::transpose_rows_into_panels)
  const int64_t words = pl.bf16_dot ? sh.D / 2 : sh.D;
  const bool word_rows = p.query_stride[3] == 1 && (pl.bf16_dot ? sh.D % 2 == 0 && p.query_stride[2] % 2 == 0
                                                                 : p.dtype == DType::kF32);
  for (int64_t i = 0; i < q_b; ++i) {
    const int64_t base = pl.rows.query_offset(p, b, i);
    const uint8_t* row0 = static_cast<const uint8_t*>(p.query) + (base + n2 * G * p.query_stride[2]) *
                                                                      static_cast<int64_t>(dtype_size(p.dtype));
    if (word_rows && reinterpret_cast<uintptr_t>(row0) % 4 == 0) {
      const int64_t ld = p.query_stride[2] * static_cast<int64_t>(dtype_size(p.dtype)) / 4;  // words per head row
      cpu::transpose_rows_into_panels(*pl.kt, reinterpret_cast<const uint32_t*>(row0), ld, G, words, i * G, pl.qk_red,
                                      reinterpret_cast<uint32_t*>(hs.qb.get()));
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g, hb = base + (n2 * G + g) * p.query_stride[2];
      for (int64_t e = 0; e < sh.D; ++e) {
        const int64_t off = panel_offset(pl.bf16_dot, pl.q_lda, e, r), src = hb + e * p.query_stride[3];
        if (pl.bf16_dot) reinterpret_cast<uint16_t*>(hs.qb.get())[off] = static_cast<const uint16_t*>(p.query)[src];
        else reinterpret_cast<float*>(hs.qb.get())[off] = detail::load_f32(p.query, src, p.dtype);
      }
    }
  }
}

// Step 2: scores S_h[r][c] = (q_r . k_c) * scale of the unit's KV heads n0 + h (h < nh), rows r < R, tokens c < C,
// into each head's S (row stride pl.ld_s, after the margin). Run by run (a run lies in one page): every head's key
// rows of a run are multiplied before the next run, so that a page's rows of all the unit's heads (interleaved in
// memory, token by token) come from memory together.
void scores(const Plan& pl, Scratch& sc, int64_t b, int64_t n0, int64_t nh, int64_t C, int64_t R) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const int32_t* table = p.block_table + b * p.block_table_row_stride;
  const DType dt = p.dtype;
  const int64_t D = sh.D, dsz = static_cast<int64_t>(dtype_size(dt)), rp = round_up(R, 16);
  // bytes of a token's key rows of heads n0 .. n0 + nh - 1, from the first one's start
  const int64_t unit_row_bytes = (nh - 1) * D * p.key.stride[2] * dsz + pl.key_row_bytes;
  for (int64_t c = 0; c < C;) {
    const int64_t run = std::min({sh.P - c % sh.P, kRun, C - c});
    const int64_t next = c + run, next_run = next < C ? std::min({sh.P - next % sh.P, kRun, C - next}) : 0;
    const int64_t next_base0 = next < C ? token_offset(p.key, table, sh.P, next, n0, D) : 0;  // head n0's row
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t n2 = n0 + h;
      const int64_t kb = token_offset(p.key, table, sh.P, c, n2, D);
      const void* A = static_cast<const uint8_t*>(p.key.data) + kb * dsz;
      int64_t lda = p.key.stride[1];
      if (!pl.k_in_place) {  // the run's key rows into the A tile: rows of q_lda elements (bf16 bits or fp32)
        A = sc.atile.get();
        lda = pl.q_lda;
        for (int64_t j = 0; j < run; ++j) {
          const int64_t src = token_offset(p.key, table, sh.P, c + j, n2, D);
          if (pl.bf16_dot) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(sc.atile.get()) + j * lda;
            for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<const uint16_t*>(p.key.data)[src + e * p.key.stride[2]];
            for (int64_t e = D; e < lda; ++e) dst[e] = 0;
          } else if (p.key.stride[2] == 1) {
            pl.kt->rows.load_row(static_cast<const uint8_t*>(p.key.data) + src * dsz,
                                 reinterpret_cast<float*>(sc.atile.get()) + j * lda, D, dt);
          } else {
            float* dst = reinterpret_cast<float*>(sc.atile.get()) + j * lda;
            for (int64_t e = 0; e < D; ++e) dst[e] = detail::load_f32(p.key.data, src + e * p.key.stride[2], dt);
          }
        }
      }
      HeadState& hs = sc.heads[static_cast<size_t>(h)];
      float* T = sc.tile.get();  // S^T[j][r] = (k_{c+j} . q_r) * scale, in slices of kSlice key rows
      const int64_t next_base = next < C ? token_offset(p.key, table, sh.P, next, n2, D) : 0;
      for (int64_t j0 = 0; j0 < run; j0 += kSlice) {
        const int64_t rows = std::min(kSlice, run - j0);
        // the next run's key rows (pages lie anywhere: no hardware prefetcher follows them)
        if (nh > 1) {
          // a unit of several heads: the next run's whole token rows (the unit's heads side by side), in address
          // order, spread evenly over the run's nh x ceil(run / kSlice) slices, so that the prefetches walk the page
          // sequentially (128k-b8, 2 threads of a Zen 5: 3.8-4.0 -> 3.6-3.7 ms against each head's rows in bursts)
          const int64_t per_head = (run + kSlice - 1) / kSlice, total = nh * per_head, k = h * per_head + j0 / kSlice;
          for (int64_t j = next_run * k / total; j < next_run * (k + 1) / total; ++j) {
            const char* row = static_cast<const char*>(p.key.data) + (next_base0 + j * p.key.stride[1]) * dsz;
            for (int64_t i = 0; i < unit_row_bytes; i += 64) __builtin_prefetch(row + i);
          }
        } else {
          for (int64_t j = j0; j < std::min(j0 + kSlice, next_run); ++j) {
            const char* row = static_cast<const char*>(p.key.data) + (next_base + j * p.key.stride[1]) * dsz;
            for (int64_t i = 0; i < pl.key_row_bytes; i += 64) __builtin_prefetch(row + i);
          }
        }
        const uint8_t* As = static_cast<const uint8_t*>(A) + j0 * lda * (pl.bf16_dot ? 2 : 4);
        if (pl.bf16_dot)
          pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(As), lda, rows,
                           reinterpret_cast<const uint16_t*>(hs.qb.get()), pl.q_lda * kPanel, 0, rp, pl.qk_red,
                           pl.qk_red, T + j0 * rp, rp, pl.scale, false);
        else
          pl.kt->gemm.f32(reinterpret_cast<const float*>(As), lda, rows, reinterpret_cast<const float*>(hs.qb.get()),
                          pl.q_lda * kPanel, 0, rp, pl.qk_red, pl.qk_red, T + j0 * rp, rp, pl.scale, false);
      }
      pl.kt->grad.transpose_u32(reinterpret_cast<const uint32_t*>(T), rp, run, R,
                                reinterpret_cast<uint32_t*>(hs.s.get() + pl.margin + c), pl.ld_s);
    }
    c += run;
  }
}

// Step 4 without the in-place kernel: tokens [c0, c0 + n) of KV head n2 of batch b (of C) as the B operand of one P.V
// chunk, (token j, value e) at reduction index j and column e: bf16 pairs (tokens 2j', 2j' + 1 of a pair, the odd
// last one paired with zeros) or fp32, columns [Dv, d2p) zero.
void pack_values(const Plan& pl, Scratch& sc, int64_t b, int64_t n2, int64_t c0, int64_t n, int64_t C) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const int32_t* table = p.block_table + b * p.block_table_row_stride;
  const bool pairs = pl.bf16_dot;
  const DType dt = p.dtype;
  const int64_t Dv = sh.Dv, red = pairs ? round_up(n, 2) : n;
  uint8_t* vp = sc.vpack.get();
  std::memset(vp, 0, static_cast<size_t>(red * pl.d2p * (pairs ? 2 : 4)));
  const int64_t esz = static_cast<int64_t>(dtype_size(dt)), row_bytes = ((Dv - 1) * p.value.stride[2] + 1) * esz;
  for (int64_t j = 0; j < n; ++j) {
    if (c0 + j + kValueAhead < C) {  // the value row kValueAhead tokens on (pages lie anywhere)
      const char* ahead = static_cast<const char*>(p.value.data) +
                          token_offset(p.value, table, sh.P, c0 + j + kValueAhead, n2, Dv) * esz;
      for (int64_t i = 0; i < row_bytes; i += 64) __builtin_prefetch(ahead + i);
    }
    const int64_t vb = token_offset(p.value, table, sh.P, c0 + j, n2, Dv);
    if (p.value.stride[2] == 1 && pairs) {
      // tokens j and j + 1 widened (exactly) into zero-padded fp32 rows and interleaved per panel by the ISA's pair
      // packer (bf16 -> fp32 -> bf16 is exact)
      if (j % 2 == 0) {
        float* a = sc.vrow32.data();
        float* bb = a + pl.d2p;
        pl.kt->rows.load_row(static_cast<const uint16_t*>(p.value.data) + vb, a, Dv, dt);
        if (j + 1 < n)
          pl.kt->rows.load_row(static_cast<const uint16_t*>(p.value.data) +
                                   token_offset(p.value, table, sh.P, c0 + j + 1, n2, Dv),
                               bb, Dv, dt);
        else
          std::fill(bb, bb + Dv, 0.0f);
        uint16_t* dst = reinterpret_cast<uint16_t*>(vp) + (j / 2) * kPanel * 2;
        for (int64_t pn = 0; pn < pl.d2p / kPanel; ++pn)
          pl.kt->grad.pack_rows_bf16(a + pn * kPanel, bb + pn * kPanel, kPanel, dst + pn * red * kPanel, nullptr,
                                     nullptr);
      }
    } else if (p.value.stride[2] == 1) {  // (j, e) at (e / 64) * n * 64 + j * 64 + e % 64: contiguous runs of 64
      const uint8_t* src = static_cast<const uint8_t*>(p.value.data) + vb * static_cast<int64_t>(dtype_size(dt));
      for (int64_t pn = 0; pn * kPanel < Dv; ++pn)
        pl.kt->rows.load_row(src + pn * kPanel * static_cast<int64_t>(dtype_size(dt)),
                             reinterpret_cast<float*>(vp) + pn * red * kPanel + j * kPanel,
                             std::min(kPanel, Dv - pn * kPanel), dt);
    } else {
      for (int64_t e = 0; e < Dv; ++e) {
        const int64_t off = panel_offset(pairs, red, j, e), src = vb + e * p.value.stride[2];
        if (pairs) reinterpret_cast<uint16_t*>(vp)[off] = static_cast<const uint16_t*>(p.value.data)[src];
        else reinterpret_cast<float*>(vp)[off] = detail::load_f32(p.value.data, src, dt);
      }
    }
  }
}

// Step 4: O_h[r][0, Dv) = sum_c P_h[r][c] v_c of the unit's KV heads n0 + h, rows r < R, into each head's o (row
// stride d2p), P rows in its pa (stride cp); chunk by chunk, every head's values of a chunk before the next chunk.
void values(const Plan& pl, Scratch& sc, int64_t b, int64_t n0, int64_t nh, int64_t C, int64_t cp, int64_t R) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const int32_t* table = p.block_table + b * p.block_table_row_stride;
  if (pl.v_in_place)  // page by page: token c at row c % P of page block_table[c / P]
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t c = 0; c < C; c += sh.P) {
        const uint16_t* row =
            static_cast<const uint16_t*>(p.value.data) + token_offset(p.value, table, sh.P, c, n0 + h, sh.Dv);
        for (int64_t j = 0; j < std::min(sh.P, C - c); ++j, row += p.value.stride[1])
          sc.heads[static_cast<size_t>(h)].vrow[static_cast<size_t>(c + j)] = row;
      }
  for (int64_t c0 = 0; c0 < C; c0 += pl.pv_tokens) {
    const int64_t n = std::min(pl.pv_tokens, C - c0);
    for (int64_t h = 0; h < nh; ++h) {
      HeadState& hs = sc.heads[static_cast<size_t>(h)];
      if (pl.v_in_place) {
        pl.kt->gemm.pv_bf16(hs.vrow.data() + c0, n, C - c0, sh.Dv, reinterpret_cast<const uint16_t*>(hs.pa.get()) + c0,
                            cp, R, hs.o.get(), pl.d2p, c0 > 0, sc.pv_work.get());
        continue;
      }
      pack_values(pl, sc, b, n0 + h, c0, n, C);
      if (pl.bf16_dot) {
        const int64_t pairs = round_up(n, 2) / 2;
        pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(hs.pa.get()) + c0, cp, R,
                         reinterpret_cast<const uint16_t*>(sc.vpack.get()), 2 * pairs * kPanel, 0, pl.d2p, pairs,
                         pairs, hs.o.get(), pl.d2p, 1.0f, c0 > 0);
      } else {
        pl.kt->gemm.f32(reinterpret_cast<const float*>(hs.pa.get()) + c0, cp, R,
                        reinterpret_cast<const float*>(sc.vpack.get()), n * kPanel, 0, pl.d2p, n, n, hs.o.get(),
                        pl.d2p, 1.0f, c0 > 0);
      }
    }
  }
}

// The K best of score[0, sel) in the §3 step 8 order into idx[0, Kb).
void top_k(const Plan& pl, Scratch& sc, const float* score, int64_t sel, int64_t Kb, int32_t* idx) {
  if (Kb <= 32) {
    if (!pl.kt->select.top_k(score, sel, static_cast<int>(Kb), idx, sc.topk_work.data()))
      detail::top_k_ordered(score, sel, Kb, idx);  // a NaN score
    return;
  }
  std::iota(sc.order.begin(), sc.order.begin() + sel, int64_t(0));
  std::partial_sort(sc.order.begin(), sc.order.begin() + Kb, sc.order.begin() + sel,
                    [&](int64_t a, int64_t c) { return detail::topk_before(score[a], a, score[c], c); });
  for (int64_t k = 0; k < Kb; ++k) idx[k] = static_cast<int32_t>(sc.order[static_cast<size_t>(k)]);
}

// The unit (batch b, KV heads [n0, n0 + nh)): each head's steps are those of a unit of one head, in the same
// order; only the memory passes over the keys and the values go run by run / chunk by chunk across the heads.
void run_unit(const Plan& pl, Scratch& sc, int64_t b, int64_t n0, int64_t nh) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const DType dt = p.dtype;
  const int64_t C = p.actual_cmp_seq_kvlen.data[b], cp = round_up(C, kPanel), G = sh.G;
  const int64_t q_b = pl.rows.q[static_cast<size_t>(b)], R = q_b * G;
  const size_t esz = pl.bf16_dot ? 2 : 4;
  // 1-2. S = Q.K^T * scale
  for (int64_t h = 0; h < nh; ++h) pack_queries(pl, sc.heads[static_cast<size_t>(h)], b, n0 + h, q_b);
  scores(pl, sc, b, n0, nh, C, R);
  // 2-3. mask (MTP causality), softmax, rounded P
  const int64_t S_b = sh.mtp ? p.actual_sel_seq_kvlen.data[b] : 0;
  for (int64_t h = 0; h < nh; ++h) {
    HeadState& hs = sc.heads[static_cast<size_t>(h)];
    float* S = hs.s.get() + pl.margin;  // row r at S + r * ld_s, columns [-margin, ld_s - margin)
    for (int64_t i = 0; i < q_b; ++i) {
      // §3 step 3: c is masked iff c*d + l - 1 > S_b - q_b + i, i.e. c >= first_masked
      int64_t first_masked = C;
      if (sh.mtp) {
        const int64_t pos = S_b - q_b + i;  // >= l - 1 - (q_b - 1 - i) ... any value: clamp below
        const int64_t lim = pos - sh.l + 1;  // c*d <= lim keeps c
        first_masked = lim < 0 ? 0 : std::min(C, lim / sh.d + 1);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* srow = S + (i * G + g) * pl.ld_s;
        for (int64_t c = first_masked; c < C; ++c) srow[c] = -FLT_MAX;
        for (int64_t c = C; c < cp; ++c) srow[c] = -INFINITY;
        const float m = pl.kt->rows.row_max(srow, cp, -INFINITY);
        const float lsum = pl.kt->rows.exp_sum(srow, cp, m);
        pl.kt->rows.normalize_row(srow, cp, lsum, hs.pa.get() + (i * G + g) * cp * esz, pl.pstore);
      }
    }
  }
  // 4. O = rne(P).V
  values(pl, sc, b, n0, nh, C, cp, R);
  // 5. outputs and selection per token
  const int64_t M = sh.M, sel = decode_selection_blocks(C, sh.l, sh.d, sh.lp), K = sh.K;
  const int64_t n_sel = round_up(M * sel + 1, 16);  // box outputs [0, n_sel) cover every pick M(k+1), k < sel
  for (int64_t h = 0; h < nh; ++h) {
    HeadState& hs = sc.heads[static_cast<size_t>(h)];
    const int64_t n2 = n0 + h;
    float* S = hs.s.get() + pl.margin;
    for (int64_t i = 0; i < q_b; ++i) {
      const int64_t orow = pl.rows.out_row(b, i);
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* dst = static_cast<uint8_t*>(p.attention_out) +
                       (orow * sh.N1 + n2 * G + g) * sh.Dv * static_cast<int64_t>(dtype_size(dt));
        pl.kt->rows.store_row(hs.o.get() + (i * G + g) * pl.d2p, dst, sh.Dv, dt);
      }
      // the group sum of the fp32 P rows, in sequence g = 0, 1, ..., into the token's first row; zero margins
      float* sum = S + i * G * pl.ld_s;
      for (int64_t g = 1; g < G; ++g) pl.kt->rows.add_row(sum, S + (i * G + g) * pl.ld_s, cp);
      std::memset(sum - pl.margin, 0, sizeof(float) * static_cast<size_t>(pl.margin));
      if (n_sel > cp) std::memset(sum + cp, 0, sizeof(float) * static_cast<size_t>(n_sel - cp));
      float* score = sc.score.get();
      // the scores straight from the row where the ISA has a kernel for M (it reads sum[2 - N .. M sel]), else the
      // two box filters and the picks
      if (!pl.kt->select.block_scores(sum, 0, sel, static_cast<int>(M), static_cast<int>(sh.N), score)) {
        float* q1 = sc.box1.get() + pl.margin;
        float* q2 = sc.box2.get() + pl.margin;
        std::memset(sc.box1.get(), 0, sizeof(float) * static_cast<size_t>(pl.margin));
        pl.kt->rows.box_sum(sum, q1, n_sel, static_cast<int>(sh.N));  // sum_{n<N} P[x - n]
        pl.kt->rows.box_sum(q1, q2, n_sel, static_cast<int>(M));      // then sum_{m<M}: the weights w_i of step 6
        for (int64_t k = 0; k < sel; ++k) score[k] = q2[M * (k + 1)];
      }
      // step 7: forced blocks
      score[0] = INFINITY;
      if (sel >= 2) score[sel - 2] = INFINITY;
      score[sel - 1] = INFINITY;
      // step 8
      int32_t* idx = p.topk_indices + (orow * sh.N2 + n2) * K;
      const int64_t Kb = std::min(K, sel);
      top_k(pl, sc, score, sel, Kb, idx);
      for (int64_t k = Kb; k < K; ++k) idx[k] = -1;
    }
  }
}

Status forward(const CompressAttentionInferParams& p, const CpuOptions& options) {
  Plan pl;
  Status st = validate_compress_attention_infer(p, &pl.sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  if (!(st = cpu::resolve_isa(options.isa, &isa)).ok()) return st;
  if (p.dtype == DType::kF64) return compress_attention_infer_reference(p);  // testing extension: no fast path
  const CompressAttentionInferShape& sh = pl.sh;
  pl.p = &p;
  pl.rows = decode_rows(p, sh);
  pl.kt = cpu::kernels_for(isa);
  detail::set_gemm_plan(pl, p.dtype, p.scale_value, sh.D, sh.Dv, sh.max_c);
  pl.rp = round_up(sh.max_q * sh.G, 16);
  pl.k_in_place = p.key.stride[2] == 1 && (pl.bf16_dot ? sh.D % 2 == 0 : p.dtype == DType::kF32);
  pl.v_in_place = pl.bf16_dot && pl.kt->gemm.pv_bf16 != nullptr && p.value.stride[2] == 1;
  pl.pv_tokens = pl.bf16_dot ? 2 * kPvChunk : kPvChunk;
  pl.key_row_bytes = ((sh.D - 1) * p.key.stride[2] + 1) * static_cast<int64_t>(dtype_size(p.dtype));
  pl.margin = round_up(std::max(sh.M, sh.N), 16);
  pl.sel_len = round_up(sh.M * sh.max_sel + 1, 16);
  pl.ld_s = pl.margin + std::max(pl.cp_max, pl.sel_len);

  // units: whole batches (all KV heads: a page's rows of every head are read together) where the batches alone keep
  // every thread as busy as single heads would; else (batch, KV head)
  const int64_t threads = cpu::resolve_num_threads(options.num_threads);
  const bool by_batch = sh.N2 > 1 && (sh.B + threads - 1) / threads * sh.N2 == (sh.B * sh.N2 + threads - 1) / threads;
  pl.heads_per_unit = by_batch ? sh.N2 : 1;
  const int64_t units = sh.B * sh.N2 / pl.heads_per_unit;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));  // allocated before any output is written
  for (Scratch& sc : scratch) init_scratch(pl, sc);
  cpu::parallel_for(units, workers, [&](int64_t u, int worker) {
    const int64_t per_batch = sh.N2 / pl.heads_per_unit;
    run_unit(pl, scratch[static_cast<size_t>(worker)], u / per_batch, (u % per_batch) * pl.heads_per_unit,
             pl.heads_per_unit);
  });
  pl.rows.clear_padding(p, sh);
  return Status::Ok();
}

}  // namespace

Status compress_attention_infer_cpu(const CompressAttentionInferParams& p, const CpuOptions& options) {
  return detail::guarded("compress_attention_infer_cpu", "score and probability rows grow with C_b x q_b x G",
                         [&] { return forward(p, options); });
}

}  // namespace nsa
