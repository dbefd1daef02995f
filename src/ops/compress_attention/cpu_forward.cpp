// Optimized CPU forward of §3: a fused, tiled pass per (batch, KV head, query tile).
//
// Per task (b, n2, tokens [s0, s1) of batch b), with the G heads of the group stacked as the rows
// of the tile (row r = i*G + g for token i, head h = n2*G + g), R = (s1 - s0)*G rows:
//   1. window [lo, hi): the compressed tokens any non-fully-masked token of the tile sees (from
//      atten_mask; 16-aligned). Columns outside it are masked for every such row, so P = 0 there
//      exactly and their GEMM work is skipped (a causal mask removes about half the work).
//   2. S[R][lo:hi] = (Q_tile . K^T) * scale           (GEMM; fp32 accumulation, §3.1)
//   3. mask (-FLT_MAX replacement, §3.2); exact softmax per row over the whole row (§3.3) using the
//      score block kept in per-thread scratch (no online rescaling: P must be final before use).
//   4. O[R][D2] = round(P) . V                          (GEMM; P rounded to the dtype, §3.4)
//   5. selection scores: fp32 P rows of the G heads summed pairwise over g (§3.6, applied before the
//      linear §3.5 map: equal up to rounding), two box filters (width N, then M) picked every M
//      (§3.5), forced blocks (§3.7), top-K in the §3.8 order (KernelTable::select.top_k:
//      a threshold from lane maxima, then the candidates above it ranked by counting).
// Fully masked tokens (§5) take the closed form: P = 1/C_b, O = sum_c round(1/C_b) v[c].
// K and V of each (batch, KV head) are packed once per call into GEMM panels (kernels.h layouts):
// bf16 pairs for the vdpbf16ps path, fp32 otherwise. Scratch is per worker and bounded by
// R * C_max (no T x C buffer). Each output element has one writer: results do not depend on the
// number of threads.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/group_sum.h"
#include "common/mask_rows.h"
#include "common/numeric.h"
#include "common/row_helpers.h"
#include "common/status_guard.h"
#include "common/threads.h"
#include "common/topk_order.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/row_load.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/causal.h"
#include "ops/compress_attention/gemm_plan.h"
#include "ops/compress_attention/reference.h"
#include "ops/compress_attention/validate.h"

namespace nsa {
namespace cpu {
namespace {

using detail::BatchInfo;

constexpr int64_t kTargetRows = 64;         // rows (tokens x G heads) of a query tile
constexpr int64_t kMaxScoreBytes = 4 << 20;  // cap of the per-worker score block R x C
constexpr int64_t kPvChunk = 256;            // reduction chunk of the P.V GEMM (keeps a V chunk in L2)
constexpr int64_t kMargin = 16;              // zero margin (floats) around a score row for the stencil

using detail::AlignedBuffer;
using detail::round_up;
// A query row with respect to atten_mask within [0, C_b): its visible span and kind (fully masked: §5).
using RowInfo = detail::MaskRow;
constexpr detail::MaskRowKind kRange = detail::MaskRowKind::kRange;
constexpr detail::MaskRowKind kFullyMasked = detail::MaskRowKind::kFullyMasked;

inline uint16_t load_bits16(const void* base, int64_t i) { return static_cast<const uint16_t*>(base)[i]; }

struct Plan {
  const CompressAttentionParams* p = nullptr;
  CompressAttentionShape sh;
  std::vector<BatchInfo> batches;
  const KernelTable* kt = nullptr;
  bool bf16_dot = false;  // GEMMs on bf16 pairs (vdpbf16ps) instead of fp32
  PStore pstore = PStore::kF32;
  float scale = 1.0f;
  int64_t qk_red = 0;   // reduction length of Q.K^T: pairs (bf16) or elements (fp32)
  int64_t q_lda = 0;    // elements per packed query row (even for bf16)
  int64_t d2p = 0;      // D2 rounded up to the panel width
  int64_t cp_max = 0;   // max_b C_b rounded up to the panel width
  int64_t bq = 1;       // query tokens per tile
  bool stream_out = false;  // attention_out written with non-temporal stores (large outputs)
  std::vector<int64_t> cp;          // per batch: C_b rounded up to 64
  std::vector<int64_t> k_off, v_off;  // per (b, n2): element offset of the packed panels
  std::vector<RowInfo> rows;        // per query row t
  std::vector<std::array<int64_t, 4>> tasks;  // (b, n2, s0, s1)
};

// ------------------------------------------------------------------ packing of K and V
// Row c of KV head n2 of t (key or value, E elements) as `out`: bf16 bits (pairs) or fp32, then zeros up to `width`.
void stage_row(const Plan& pl, const Tensor3& t, const BatchInfo& bi, int64_t n2, int64_t c, int64_t E, int64_t width,
               void* out) {
  const int64_t base = (bi.c_begin + c) * t.stride[0] + n2 * t.stride[1];
  const DType dt = pl.p->dtype;
  if (pl.bf16_dot) {
    uint16_t* dst = static_cast<uint16_t*>(out);
    if (t.stride[2] == 1) std::memcpy(dst, static_cast<const uint16_t*>(t.data) + base, sizeof(uint16_t) * E);
    else
      for (int64_t e = 0; e < E; ++e) dst[e] = load_bits16(t.data, base + e * t.stride[2]);
    std::fill(dst + E, dst + width, uint16_t(0));
  } else {
    float* dst = static_cast<float*>(out);
    load_row_f32(pl.kt, t.data, base, t.stride[2], E, dt, dst);
    std::fill(dst + E, dst + width, 0.0f);
  }
}

// K of (b, n2) as the B operand of S = Q.K^T (kernels.h layouts): columns = compressed tokens (C_b rounded up to 64),
// reduction over D: qk_red words per column (bf16 pairs d = 2w, 2w + 1, or fp32 elements), word w of token c at
// dst[(c / 64) qk_red 64 + w 64 + c % 64]. Up to 64 token rows are staged as words (zero padded) and transposed into
// their panel; columns past C_b are zero.
void pack_k(const Plan& pl, const BatchInfo& bi, int64_t n2, void* dst, std::vector<uint32_t>& stage) {
  const int64_t words = pl.qk_red, cp = round_up(bi.c, kPanel);
  std::memset(dst, 0, static_cast<size_t>(cp * words) * 4);
  stage.resize(static_cast<size_t>(kPanel * words));
  const int64_t width = pl.bf16_dot ? 2 * words : words;  // staged elements per row
  for (int64_t c0 = 0; c0 < bi.c; c0 += kPanel) {
    const int64_t n = std::min(kPanel, bi.c - c0);
    for (int64_t r = 0; r < n; ++r) stage_row(pl, pl.p->key, bi, n2, c0 + r, pl.sh.D, width, stage.data() + r * words);
    transpose_rows_into_panels(*pl.kt, stage.data(), words, n, words, c0, words, static_cast<uint32_t*>(dst));
  }
}

// V of (b, n2) as the B operand of O = P.V: columns = D2 (panels of 64), reduction over the tokens (C_b rounded up
// to 64). bf16 pairs: word (token pair j, column e) = v[2j][e] | v[2j + 1][e] << 16 at dst[(e / 64) (cp / 2) 64 +
// j 64 + e % 64]; fp32: element (c, e) at dst[(e / 64) cp 64 + c 64 + e % 64]. Tokens past C_b are zero.
void pack_v(const Plan& pl, const BatchInfo& bi, int64_t n2, void* dst, std::vector<uint32_t>& stage) {
  const int64_t D2 = pl.sh.D2, d2p = pl.d2p, cp = round_up(bi.c, kPanel);
  std::memset(dst, 0, static_cast<size_t>(cp * d2p) * (pl.bf16_dot ? 2 : 4));
  stage.resize(static_cast<size_t>(d2p));
  if (pl.bf16_dot) {
    uint16_t* a = reinterpret_cast<uint16_t*>(stage.data());  // rows 2j and 2j + 1, d2p elements each
    uint16_t* b = a + d2p;
    uint32_t* out = static_cast<uint32_t*>(dst);
    const int64_t pairs = cp / 2;
    for (int64_t j = 0; 2 * j < bi.c; ++j) {
      stage_row(pl, pl.p->value, bi, n2, 2 * j, D2, d2p, a);
      if (2 * j + 1 < bi.c) stage_row(pl, pl.p->value, bi, n2, 2 * j + 1, D2, d2p, b);
      else std::fill(b, b + d2p, uint16_t(0));
      for (int64_t e0 = 0; e0 < d2p; e0 += kPanel) {
        uint32_t* w = out + (e0 / kPanel) * pairs * kPanel + j * kPanel;
        for (int64_t e = 0; e < kPanel; ++e)
          w[e] = static_cast<uint32_t>(a[e0 + e]) | static_cast<uint32_t>(b[e0 + e]) << 16;
      }
    }
  } else {
    float* row = reinterpret_cast<float*>(stage.data());
    float* out = static_cast<float*>(dst);
    for (int64_t c = 0; c < bi.c; ++c) {
      stage_row(pl, pl.p->value, bi, n2, c, D2, d2p, row);
      for (int64_t e0 = 0; e0 < d2p; e0 += kPanel)
        std::memcpy(out + (e0 / kPanel) * cp * kPanel + c * kPanel, row + e0, sizeof(float) * kPanel);
    }
  }
}

// ------------------------------------------------------------------ per-worker scratch
struct Scratch {
  AlignedBuffer<float> s;      // [R][ld_s] score block / fp32 P (with kMargin floats each side)
  AlignedBuffer<uint8_t> pa;   // [R][ld_p] rounded P, A operand of P.V (bf16 bits or fp32)
  AlignedBuffer<uint8_t> qa;   // [R][q_lda] packed query tile
  AlignedBuffer<float> o;      // [R][d2p] P.V result
  AlignedBuffer<float> box1, box2;  // [ld_s] stencil rows
  AlignedBuffer<float> heads;  // [ld_s] box-filtered group-summed P row of a token
  AlignedBuffer<float> score;  // [max_sel]
  AlignedBuffer<float> uniform;  // [D2] closed-form output of fully masked rows
  AlignedBuffer<float> value_row;  // [D2] a value row in fp32 (closed form)
  std::vector<float*> ptrs;
  std::vector<float> m, l;     // per row statistics
  std::vector<uint8_t> wide;   // per row: every visible score overflowed (see run_tile step 4)
  std::vector<int32_t> topk_work;  // [2 * max_sel] candidates of top_k
  std::vector<uint8_t> fused;  // per token: P normalized and group-summed in one pass (run_tile step 4)
  int64_t ld_s = 0, ld_p = 0;
};

void init_scratch(const Plan& pl, Scratch& sc) {
  const int64_t R = pl.bq * pl.sh.G;
  sc.ld_s = pl.cp_max + 2 * kMargin;
  sc.ld_p = pl.cp_max;
  const int64_t esz = pl.bf16_dot ? 2 : 4;
  sc.s.reset(R * sc.ld_s);
  sc.pa.reset(R * sc.ld_p * esz);
  sc.qa.reset(R * pl.q_lda * esz);
  sc.o.reset(R * pl.d2p);
  sc.box1.reset(sc.ld_s);
  sc.box2.reset(sc.ld_s);
  sc.heads.reset(sc.ld_s);
  sc.score.reset(pl.sh.max_sel);
  sc.uniform.reset(pl.sh.D2);
  sc.value_row.reset(pl.sh.D2);
  sc.ptrs.resize(static_cast<size_t>(pl.sh.G));
  sc.m.resize(static_cast<size_t>(R));
  sc.l.resize(static_cast<size_t>(R));
  sc.wide.resize(static_cast<size_t>(R));
  sc.fused.resize(static_cast<size_t>(pl.bq));
  sc.topk_work.resize(static_cast<size_t>(2 * pl.sh.max_sel));
}

// ------------------------------------------------------------------ selection and top-k
// Box-filtered fp32 P row for the selection scores (§3.5): out[x] = sum_{m<M} sum_{n<N} P[x-m-n] for
// x in [lo, hi + kMargin), so that score_h[k] = out[M(k+1)] (weights w_i of §3.5 as two boxes).
// prow must be zero on [lo - kMargin, lo) and [hi, hi + kMargin).
void row_box(const Plan& pl, Scratch& sc, const float* prow, int64_t lo, int64_t hi, float* out) {
  const int64_t n = hi - lo + kMargin;
  float* q = sc.box1.get() + kMargin;
  std::memset(q + lo - kMargin, 0, sizeof(float) * kMargin);
  pl.kt->rows.box_sum(prow + lo, q + lo, n, static_cast<int>(pl.sh.N));
  pl.kt->rows.box_sum(q + lo, out + lo, n, static_cast<int>(pl.sh.M));
}

// ------------------------------------------------------------------ query prefetch
// The query rows of the next tile, loaded into L2 while this tile computes (they come from memory once
// per call, and packing them would otherwise wait on DRAM). The cache lines are issued a few at a time
// from step 4's row loop, not in one burst that would fill the load queue. Rows with unit element stride
// only; a span is the G rows of a token when its heads are contiguous, else one row.
struct QueryPrefetch {
  const char* base = nullptr;  // query data
  int64_t first_row = 0;       // element offset of the first span of the first token
  int64_t token_stride = 0, head_stride = 0;  // elements
  int64_t spans_per_token = 0, lines_per_span = 0, tokens = 0, esz = 0;
  int64_t next = 0, total = 0;  // lines issued, lines in all
  int64_t tok = 0, g = 0, line = 0;  // the next line's token, span within the token and line within the span

  void plan(const Plan& pl, const BatchInfo& bi, int64_t n2, int64_t s0, int64_t s1) {
    const Tensor3& q = pl.p->query;
    next = total = tok = g = line = 0;
    if (q.stride[2] != 1) return;
    const int64_t G = pl.sh.G;
    esz = static_cast<int64_t>(dtype_size(pl.p->dtype));
    const bool heads_contiguous = q.stride[1] == pl.sh.D;
    base = static_cast<const char*>(q.data);
    first_row = (bi.q_begin + s0) * q.stride[0] + n2 * G * q.stride[1];
    token_stride = q.stride[0];
    head_stride = q.stride[1];
    spans_per_token = heads_contiguous ? 1 : G;
    lines_per_span = ((heads_contiguous ? G : 1) * pl.sh.D * esz + 63) / 64;
    tokens = s1 - s0;
    total = tokens * spans_per_token * lines_per_span;
  }
  // issue the next `count` lines (in the order line, span, token; counters rather than divisions)
  void issue(int64_t count) {
    const int64_t end = std::min(total, next + count);
    for (; next < end; ++next) {
      __builtin_prefetch(base + (first_row + tok * token_stride + g * head_stride) * esz + line * 64, 0, 2);
      if (++line == lines_per_span) {
        line = 0;
        if (++g == spans_per_token) {
          g = 0;
          ++tok;
        }
      }
    }
  }
};

// ------------------------------------------------------------------ one tile
void run_tile(const Plan& pl, Scratch& sc, const void* kpack, const void* vpack, const BatchInfo& bi, int64_t n2,
              int64_t s0, int64_t s1, QueryPrefetch& next_query) {
  const CompressAttentionParams& p = *pl.p;
  const CompressAttentionShape& sh = pl.sh;
  const DType dt = p.dtype;
  const int64_t G = sh.G, C = bi.c, cp = round_up(C, kPanel), ntok = s1 - s0, R = ntok * G;
  const size_t esz = pl.bf16_dot ? 2 : 4;

  // 1. window of the tile
  int64_t wlo = cp, whi = 0;
  bool any_full = false;
  for (int64_t i = 0; i < ntok; ++i) {
    const RowInfo& ri = pl.rows[bi.q_begin + s0 + i];
    if (ri.kind == kFullyMasked) {
      any_full = true;
      continue;
    }
    wlo = std::min(wlo, ri.lo);
    whi = std::max(whi, ri.hi);
  }
  const bool any_visible = whi > 0;
  int64_t lo = 0, hi = 0;
  if (any_visible) {
    lo = wlo / 16 * 16;
    hi = std::min(round_up(whi, 16), cp);
  }

  float* S = sc.s.get() + kMargin;  // row r at S + r * ld_s
  if (any_visible) {
    // 2. pack the query tile: row r = i*G + g, head h = n2*G + g
    const Tensor3& q = p.query;
    for (int64_t i = 0; i < ntok; ++i) {
      const int64_t t = bi.q_begin + s0 + i;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = i * G + g, base = t * q.stride[0] + (n2 * G + g) * q.stride[1];
        if (pl.bf16_dot) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(sc.qa.get()) + r * pl.q_lda;
          if (q.stride[2] == 1) std::memcpy(dst, static_cast<const uint16_t*>(q.data) + base, 2 * sh.D);
          else
            for (int64_t d = 0; d < sh.D; ++d) dst[d] = load_bits16(q.data, base + d * q.stride[2]);
          for (int64_t d = sh.D; d < pl.q_lda; ++d) dst[d] = 0;
        } else {
          load_row_f32(pl.kt, q.data, base, q.stride[2], sh.D, dt, reinterpret_cast<float*>(sc.qa.get()) + r * pl.q_lda);
        }
      }
    }
    // 3. S = Q.K^T * scale over the window's panels
    if (pl.bf16_dot) {
      pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.qa.get()), pl.q_lda, R,
                       static_cast<const uint16_t*>(kpack), pl.qk_red * kPanel * 2, lo, hi - lo, pl.qk_red,
                       pl.qk_red, S + lo, sc.ld_s, pl.scale, false);
    } else {
      pl.kt->gemm.f32(reinterpret_cast<const float*>(sc.qa.get()), pl.q_lda, R, static_cast<const float*>(kpack),
                      pl.qk_red * kPanel, lo, hi - lo, pl.qk_red, pl.qk_red, S + lo, sc.ld_s, pl.scale, false);
    }
  }

  // 4. mask + softmax per row; rounded P into the A operand of P.V. A token whose G rows are all ordinary
  //    (no wide row, not fully masked) is normalized in one fused pass that also forms the §3.6 group sum
  //    of its fp32 P rows into its first score row (sc.fused[i]); otherwise each row keeps its fp32 P in S
  //    and step 6 sums them.
  const int64_t cmax = std::min(hi, C);  // columns [cmax, hi) are padding past C_b
  const int64_t n_out = C - (cmax - lo);  // columns of [0, C) outside the window (masked)
  // 4a. masks of the visible tokens' rows; statistics of the fully masked ones (§5)
  for (int64_t i = 0; i < ntok; ++i) {
    const int64_t s = s0 + i;
    const RowInfo& ri = pl.rows[bi.q_begin + s];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      float* srow = S + r * sc.ld_s;
      if (ri.kind == kFullyMasked) {
        sc.m[r] = -FLT_MAX;
        sc.l[r] = static_cast<float>(C);
        if (any_visible) std::memset(sc.pa.get() + (r * sc.ld_p + lo) * esz, 0, static_cast<size_t>(hi - lo) * esz);
        continue;
      }
      if (ri.kind == kRange) {
        for (int64_t c = lo; c < ri.lo; ++c) srow[c] = -FLT_MAX;
        for (int64_t c = ri.hi; c < cmax; ++c) srow[c] = -FLT_MAX;
      } else {
        const uint8_t* mrow = p.atten_mask.data + s * p.atten_mask.stride[0];
        for (int64_t c = lo; c < cmax; ++c)
          if (mrow[c * p.atten_mask.stride[1]] != 0) srow[c] = -FLT_MAX;
      }
      for (int64_t c = cmax; c < hi; ++c) srow[c] = -INFINITY;
    }
  }
  // 4b. row maxima and exp sums of each run of visible tokens' rows, several rows at a time
  detail::for_each_run(
      ntok, [&](int64_t i) { return pl.rows[bi.q_begin + s0 + i].kind != kFullyMasked; },
      [&](int64_t i0, int64_t i1) {
        pl.kt->rows.softmax_rows(S + i0 * G * sc.ld_s + lo, sc.ld_s, (i1 - i0) * G, hi - lo,
                                 n_out > 0 ? -FLT_MAX : -INFINITY, &sc.m[i0 * G], &sc.l[i0 * G]);
      });
  // 4c. normalization
  for (int64_t i = 0; i < ntok; ++i) {
    const RowInfo& ri = pl.rows[bi.q_begin + s0 + i];
    bool token_wide = false;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      next_query.issue((next_query.total + R - 1) / R);
      // Every visible score at or below -FLT_MAX (fp32 overflow of q.k*scale): then m = -FLT_MAX and the
      // masked columns outside the window get exp(-FLT_MAX - m) / l = 1/l (§3.3), not 0. Such "wide"
      // rows are finished over all C columns below (rare; exact, slow).
      const bool wide = ri.kind != kFullyMasked && n_out > 0 && sc.m[r] == -FLT_MAX;
      if (wide) sc.l[r] += static_cast<float>(n_out);
      sc.wide[r] = wide;
      token_wide |= wide;
    }
    sc.fused[i] = ri.kind != kFullyMasked && !token_wide && G <= kMaxFusedGroup;
    if (sc.fused[i]) {
      float* row0 = S + i * G * sc.ld_s + lo;
      pl.kt->rows.normalize_group(row0, sc.ld_s, static_cast<int>(G), &sc.l[i * G], hi - lo,
                             sc.pa.get() + (i * G * sc.ld_p + lo) * esz, sc.ld_p, pl.pstore, row0);
    } else if (ri.kind != kFullyMasked) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = i * G + g;
        pl.kt->rows.normalize_row(S + r * sc.ld_s + lo, hi - lo, sc.l[r], sc.pa.get() + (r * sc.ld_p + lo) * esz,
                             pl.pstore);
      }
    }
  }

  // 5. O = round(P).V over the window
  if (any_visible) {
    if (pl.bf16_dot) {
      const uint16_t* vp = static_cast<const uint16_t*>(vpack);
      const int64_t pstride = (cp / 2) * kPanel * 2;
      pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.pa.get()) + lo, sc.ld_p, R, vp + (lo / 2) * kPanel * 2,
                       pstride, 0, pl.d2p, (hi - lo) / 2, kPvChunk, sc.o.get(), pl.d2p, 1.0f, false);
    } else {
      const float* vp = static_cast<const float*>(vpack);
      const int64_t pstride = cp * kPanel;
      pl.kt->gemm.f32(reinterpret_cast<const float*>(sc.pa.get()) + lo, sc.ld_p, R, vp + lo * kPanel, pstride, 0,
                      pl.d2p, hi - lo, kPvChunk, sc.o.get(), pl.d2p, 1.0f, false);
    }
  }
  // wide rows (see step 4): fp32 P over all of [0, C) and O = sum_c round(P[c]) v[c] in c order
  for (int64_t r = 0; r < R; ++r) {
    if (!sc.wide[r]) continue;
    float* srow = S + r * sc.ld_s;
    const float pout = 1.0f / sc.l[r];
    for (int64_t c = 0; c < lo; ++c) srow[c] = pout;
    for (int64_t c = cmax; c < C; ++c) srow[c] = pout;
    for (int64_t c = std::max(hi, C); c < cp; ++c) srow[c] = 0.0f;
    float* orow = sc.o.get() + r * pl.d2p;
    std::fill(orow, orow + sh.D2, 0.0f);
    const Tensor3& v = p.value;
    for (int64_t c = 0; c < C; ++c) {
      const float pc = detail::round_to_dtype(srow[c], dt);
      const int64_t base = (bi.c_begin + c) * v.stride[0] + n2 * v.stride[1];
      for (int64_t j = 0; j < sh.D2; ++j) orow[j] += pc * detail::load_f32(v.data, base + j * v.stride[2], dt);
    }
  }
  if (any_full) {
    // closed form of fully masked rows: sum_c round(1/C) v[c], accumulated in fp32 in c order
    // (each value row widened to fp32 first, then u[j] += pc * v[j] over j: the same roundings, vectorized)
    const float pc = detail::round_to_dtype(1.0f / static_cast<float>(C), dt);
    float* u = sc.uniform.get();
    float* vrow = sc.value_row.get();
    std::fill(u, u + sh.D2, 0.0f);
    const Tensor3& v = p.value;
    for (int64_t c = 0; c < C; ++c) {
      load_row_f32(pl.kt, v.data, (bi.c_begin + c) * v.stride[0] + n2 * v.stride[1], v.stride[2], sh.D2, dt, vrow);
      for (int64_t j = 0; j < sh.D2; ++j) u[j] += pc * vrow[j];
    }
  }

  // 6. outputs, statistics, selection scores and top-k per token
  const int64_t M = sh.M, K = sh.K, Sel = bi.sel;
  for (int64_t i = 0; i < ntok; ++i) {
    const int64_t s = s0 + i, t = bi.q_begin + s;
    const bool full = pl.rows[t].kind == kFullyMasked;
    bool token_wide = false;  // a wide row makes the token's selection range all of [0, cp)
    for (int64_t g = 0; g < G; ++g) token_wide |= static_cast<bool>(sc.wide[i * G + g]);
    int64_t rlo = lo, rhi = hi;
    if (token_wide) {
      rlo = 0;
      rhi = cp;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g, h = n2 * G + g;
      const float* orow = full ? sc.uniform.get() : sc.o.get() + r * pl.d2p;
      uint8_t* dst = static_cast<uint8_t*>(p.attention_out) + (t * sh.N1 + h) * sh.D2 * static_cast<int64_t>(dtype_size(dt));
      (pl.stream_out ? pl.kt->rows.store_row_stream : pl.kt->rows.store_row)(orow, dst, sh.D2, dt);
      const int64_t so = detail::stat_offset(bi, h, s);
      std::fill(p.softmax_max + so, p.softmax_max + so + 8, sc.m[r]);
      std::fill(p.softmax_sum + so, p.softmax_sum + so + 8, sc.l[r]);
    }
    // the token's fp32 P rows with zero margins (or, fused, their group sum in its first row)
    for (int64_t g = 0; g < (sc.fused[i] ? 1 : G); ++g) {
      const int64_t r = i * G + g;
      float* srow = S + r * sc.ld_s;
      if (full) {  // uniform P = 1/C over [0, C)
        rlo = 0;
        rhi = cp;
        const float pu = 1.0f / static_cast<float>(C);
        for (int64_t c = 0; c < C; ++c) srow[c] = pu;
        for (int64_t c = C; c < cp; ++c) srow[c] = 0.0f;
      } else if (token_wide && !sc.wide[r]) {  // P = 0 outside the window for the token's other rows
        std::fill(srow, srow + lo, 0.0f);
        std::fill(srow + hi, srow + cp, 0.0f);
      }
      std::memset(srow + rlo - kMargin, 0, sizeof(float) * kMargin);
      std::memset(srow + rhi, 0, sizeof(float) * kMargin);
    }
    // blocks whose taps touch [rlo, rhi + kMargin): M(k+1) in [rlo, rhi + kMargin)
    const int64_t k0 = std::max<int64_t>(0, (rlo + M - 1) / M - 1);
    const int64_t k1 = std::min<int64_t>(Sel, (rhi + kMargin - 1) / M);
    float* score = sc.score.get();
    std::fill(score, score + std::min(k0, Sel), 0.0f);  // [k0, k1) is written below
    std::fill(score + std::max(k0, std::min(k1, Sel)), score + Sel, 0.0f);
    if (rhi > rlo && k1 > k0) {
      // §3.6 pairwise group sum over g (odd last element carried up), applied elementwise to the
      // fp32 P rows of the G heads (the §3.5 map is linear, so this equals summing score_h up to
      // rounding), then the §3.5 box filters once, then the picks score[k] = box[M(k+1)].
      for (int64_t g = 0; g < G; ++g) sc.ptrs[g] = S + (i * G + g) * sc.ld_s;
      const int64_t x0 = rlo - kMargin, x1 = rhi + kMargin;  // margins included (zeros)
      // fused: the sum is already in the first row
      float* sum = detail::pairwise_reduce(sc.ptrs.data(), sc.fused[i] ? 1 : G, [&](float* x, float* y) {
        pl.kt->rows.add_row(x + x0, y + x0, x1 - x0);
        return x;
      });
      // (reads sum[M k0 - N + 2 .. M k1], inside [rlo - kMargin, rhi + kMargin): M + N - 2 <= 14 < kMargin)
      if (!pl.kt->select.block_scores(sum, k0, k1, static_cast<int>(M), static_cast<int>(sh.N), score)) {
        float* boxed = sc.heads.get() + kMargin;
        row_box(pl, sc, sum, rlo, rhi, boxed);
        for (int64_t k = k0; k < k1; ++k) score[k] = boxed[M * (k + 1)];
      }
    } else if (k1 > k0) {
      std::fill(score + k0, score + k1, 0.0f);
    }
    // k_end: past the last block whose score may be nonzero (the window's blocks, then any forced block)
    int64_t k_end = rhi > rlo && k1 > k0 ? std::min(k1, Sel) : 0;
    if (p.topk_mask.data != nullptr) {  // §3.7
      // selects rather than branches: the forced blocks move with the row, so a branch per block mispredicts
      const uint8_t* trow = p.topk_mask.data + s * p.topk_mask.stride[0];
      const int64_t ts = p.topk_mask.stride[1];
      if (ts == 1) {
        pl.kt->select.force(score, trow, Sel);
      } else {
        for (int64_t k = 0; k < Sel; ++k) score[k] = trow[k * ts] != 0 ? FLT_MAX : score[k];
      }
      k_end = detail::last_nonzero_byte(trow, ts, k_end, Sel) + 1;
    } else if (p.causal) {  // §10 causal: the three forced blocks of §9 that lie in [0, Sel)
      for (const int64_t k : detail::causal_forced_blocks(s, p.select_block_size))
        if (k >= 0 && k < Sel) {
          score[k] = FLT_MAX;
          k_end = std::max(k_end, k + 1);
        }
    }
    // §3.8 order (descending, ties to the smaller index) over score[0, Sel), where score[k_end, Sel) is zero and no
    // score is negative (box sums of P >= 0, forced FLT_MAX; a NaN lies in the window): the top-K is that of the
    // prefix score[0, k_end), then k_end, k_end + 1, ... (zeros after every score of the prefix: all of them are
    // >= 0, and a zero in the prefix has the smaller index)
    int32_t* idx = p.topk_indices + (t * sh.N2 + n2) * K;
    const int64_t Kb = std::min(K, Sel);  // §10 short_batches: Sel_b < K leaves slots Sel_b..K-1 at -1
    const int64_t Kp = std::min(Kb, k_end);  // slots filled from the prefix
    if (Kp == 0 || pl.kt->select.top_k(score, k_end, static_cast<int>(Kp), idx, sc.topk_work.data())) {
      for (int64_t i = Kp; i < Kb; ++i) idx[i] = static_cast<int32_t>(k_end + (i - Kp));
    } else {
      detail::top_k_ordered(score, Sel, Kb, idx);  // a NaN score (§3.8 order of NaN)
    }
    for (int64_t i = Kb; i < K; ++i) idx[i] = -1;
  }
}

}  // namespace

Status forward_impl(const CompressAttentionParams& params, const CpuOptions& options) {
  Plan pl;
  Status st = validate_compress_attention(params, &pl.sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  st = resolve_isa(options.isa, &isa);
  if (!st.ok()) return st;
  if (params.dtype == DType::kF64) return reference::forward_fp64(params);  // testing extension: no fast path
  detail::CausalMask causal_mask;  // §10 causal: atten_mask is the view of causal.h (topk forcing in run_tile)
  const CompressAttentionParams p = detail::with_causal_view(params, pl.sh, &causal_mask);

  const CompressAttentionShape& sh = pl.sh;
  // Workspace sizes below are products of C_b, D, D2 and G: refuse sizes whose byte counts could
  // overflow 64-bit arithmetic (only reachable with stride-0 views of a small buffer).
  st = check_cpu_workspace_sizes(sh, "compress_attention_cpu");
  if (!st.ok()) return st;
  pl.p = &p;
  pl.batches = detail::make_batches(p, sh);
  pl.kt = kernels_for(isa);
  detail::set_gemm_plan(pl, p.dtype, p.scale_value, sh.D, sh.D2, sh.max_c);
  const int64_t G = sh.G;
  int64_t bq = std::max<int64_t>(1, (kTargetRows + G / 2) / G);
  bq = std::min(bq, std::max<int64_t>(1, kMaxScoreBytes / (4 * G * (pl.cp_max + 2 * kMargin))));
  pl.bq = std::max<int64_t>(1, std::min(bq, sh.max_sq));
  const int threads = resolve_num_threads(options.num_threads);
  // an output well beyond the caches is written once and not read back here: stream it
  constexpr int64_t kStreamBytes = int64_t(16) << 20;
  pl.stream_out = sh.T * sh.N1 * sh.D2 * static_cast<int64_t>(dtype_size(p.dtype)) >= kStreamBytes;

  // packed K/V panels of every (batch, KV head)
  const size_t esz = pl.bf16_dot ? 2 : 4;
  pl.cp.resize(pl.batches.size());
  pl.k_off.resize(pl.batches.size() * sh.N2);
  pl.v_off.resize(pl.batches.size() * sh.N2);
  int64_t k_total = 0, v_total = 0;
  for (size_t b = 0; b < pl.batches.size(); ++b) {
    pl.cp[b] = round_up(pl.batches[b].c, kPanel);
    for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
      pl.k_off[b * sh.N2 + n2] = k_total;
      pl.v_off[b * sh.N2 + n2] = v_total;
      k_total += pl.cp[b] * pl.q_lda;
      v_total += pl.cp[b] * pl.d2p;
    }
  }
  AlignedBuffer<uint8_t> kbuf, vbuf;
  kbuf.reset(k_total * esz);
  vbuf.reset(v_total * esz);

  // row analysis of atten_mask, per query row (depends on the batch's C_b)
  pl.rows.resize(static_cast<size_t>(sh.T));
  std::vector<int64_t> row_batch(static_cast<size_t>(sh.T));
  for (size_t b = 0; b < pl.batches.size(); ++b)
    for (int64_t s = 0; s < pl.batches[b].sq; ++s) row_batch[pl.batches[b].q_begin + s] = static_cast<int64_t>(b);
  constexpr int64_t kRowChunk = 256;
  const int64_t n_row_chunks = (sh.T + kRowChunk - 1) / kRowChunk;
  const int64_t n_pack = static_cast<int64_t>(pl.batches.size()) * sh.N2;
  parallel_for(n_pack + n_row_chunks, threads, [&](int64_t task, int) {
    if (task < n_pack) {
      const int64_t b = task / sh.N2, n2 = task % sh.N2;
      const BatchInfo& bi = pl.batches[b];
      std::vector<uint32_t> stage;
      pack_k(pl, bi, n2, kbuf.get() + pl.k_off[task] * esz, stage);
      pack_v(pl, bi, n2, vbuf.get() + pl.v_off[task] * esz, stage);
      return;
    }
    const int64_t c0 = (task - n_pack) * kRowChunk, c1 = std::min(sh.T, c0 + kRowChunk);
    for (int64_t t = c0; t < c1; ++t) {
      const BatchInfo& bi = pl.batches[row_batch[t]];
      pl.rows[t] = detail::analyse_mask_row(p.atten_mask, t - bi.q_begin, bi.c);
    }
  });

  // tiles: (b, n2, query tokens [s0, s1))
  for (size_t b = 0; b < pl.batches.size(); ++b)
    for (int64_t n2 = 0; n2 < sh.N2; ++n2)
      for (int64_t s0 = 0; s0 < pl.batches[b].sq; s0 += pl.bq)
        pl.tasks.push_back({static_cast<int64_t>(b), n2, s0, std::min(pl.batches[b].sq, s0 + pl.bq)});
  // per-worker scratch, allocated here (before any output is written) so that a failed allocation
  // is an error, not a crash in a worker thread
  const int workers = static_cast<int>(std::min<int64_t>(std::max(1, threads), std::max<size_t>(1, pl.tasks.size())));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  for (Scratch& sc : scratch) init_scratch(pl, sc);
  // runs of consecutive tiles per worker: each tile prefetches the next one's query rows
  parallel_for_runs(static_cast<int64_t>(pl.tasks.size()), workers, 8, [&](int64_t begin, int64_t end, int worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    QueryPrefetch next_query;
    for (int64_t task = begin; task < end; ++task) {
      next_query = QueryPrefetch();
      if (task + 1 < end) {
        const auto& nx = pl.tasks[static_cast<size_t>(task + 1)];
        next_query.plan(pl, pl.batches[nx[0]], nx[1], nx[2], nx[3]);
      }
      const auto& tk = pl.tasks[static_cast<size_t>(task)];
      const int64_t kv = tk[0] * sh.N2 + tk[1];
      run_tile(pl, sc, kbuf.get() + pl.k_off[kv] * esz, vbuf.get() + pl.v_off[kv] * esz, pl.batches[tk[0]], tk[1],
               tk[2], tk[3], next_query);
    }
    if (pl.stream_out) pl.kt->rows.stream_fence();  // this worker's streaming stores, before the join
  });
  return Status::Ok();
}

}  // namespace cpu

// Entry point: validation first (nothing written on error), then the tiled pass. Workspace that cannot be
// allocated is reported as an error, never as a crash: all of it (packed K/V, per-worker scratch) is allocated
// before the first output is written.
Status compress_attention_cpu(const CompressAttentionParams& p, const CpuOptions& options) {
  return detail::guarded("compress_attention_cpu", "packed K/V and per-thread score blocks grow with C_b x G",
                         [&] { return cpu::forward_impl(p, options); });
}

}  // namespace nsa
