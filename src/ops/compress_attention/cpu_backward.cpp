// CPU backward (§7): fused tiles in FlashAttention-2 order, multithreaded, deterministic.
//
// Decomposition. The rows of a tile are (query token, head of the group) pairs: a query tile holds
// Bq tokens x G heads = R rows (R ~ 128, token-major, so the G heads of a token are adjacent as in
// memory); a key tile holds Bc = 64 compressed tokens. For a tile pair (i, j) the work is
//   S  = Q_i K_j^T * scale (fp32 dot products), P = exp(S - m) / l_sum from the saved statistics,
//        P = 0 where atten_mask removes the entry (or the column is past C_b);
//   dP = dO_i V_j^T,  dS = P (dP - Dlt),  Dlt = rowsum(dO * O) with O = attention_out as returned;
//   dV_j^T += dO_i^T P,  dK_j^T += Q_i^T dS,  dQ_i += dS K_j   (dK and dQ times scale at the end).
// dK and dV are accumulated transposed ([D][64]) so that P and dS serve as B operands as they are
// (no per-pair transposes); Q^T and dO^T are built once per query tile load.
// Each output element has exactly one writer and one fixed summation order, whatever the thread count:
//   the query tiles of a (batch, KV head) are cut into chunks of ct tiles (ct from the shape and the mask
//   only: kChunkRows rows, doubled while the dK/dV partials would exceed kPartialBudget). A chunk task runs
//   for i in its chunk (ascending): for j (ascending): all five products, no recomputation. dQ_i is complete
//   in its task (sum over j ascending); the chunk's dK_j^T / dV_j^T partial sums over its i ascending.
//   Then one task per (batch, KV head, key tile j) adds the partials of the chunks in chunk order, adds the
//   fully masked rows' share (below) and writes dK_j, dV_j.
// Tasks are handed out largest first (LPT) to the workers; which worker runs a task never changes a result.
// Many chunks keep both cores busy when another process takes one for a while, and parallelise a single
// (batch, KV head).
//
// Masks. A plan per batch records, for every tile pair, whether anything is visible (else it is
// skipped) and the 16-column window [w0, w1) of the key tile that holds every visible entry of its
// rows: all five products run on the window only (a causal mask leaves on average half of the last
// tile of a row visible). Inside tiles a masked entry has P = 0 and dS = 0, so it never reaches dQ or dK
// (§7 rule 1). Its dV share, P dO with P = exp(-FLT_MAX - m) / l_sum the P of the forward (§7 rule 2), is
// zero except where m = -FLT_MAX, and is added after the tile contributions:
//   - a fully masked row (§5) has P = 1/C_b on every column: its share u = sum over such rows of
//     dO / l_sum goes to every dV row of the batch; its dQ is zero and it adds nothing to dK;
//   - a partially masked row whose every visible score overflowed to -inf has P = 1/l_sum on each masked
//     column (and P = 0 on the visible ones): dO / l_sum goes to the dV rows of its masked columns
//     (BatchPlan::masked_share, found from the saved m; empty in ordinary inputs).
//
// Products. Every product is one GEMM call of the per-ISA KernelTable (src/cpu/kernels.h) with the B
// operand in its packed panel layout and a (col0, ncols) column range. Two paths, chosen once per call:
//   bf16 pairs (bf16 inputs on an ISA with gemm_bf16, i.e. vdpbf16ps): P and dS are rounded to bf16 before
//     the products that use them (§7 allows it; every sum stays fp32). Operands: Q and dO rows (pairs along
//     D / D2), Q^T and dO^T (pairs along the tile's rows), P and dS as B panels with pairs along rows
//     (pack_rows_bf16), dS rows (pairs along key columns), and per key tile K with pairs along D (for S),
//     K with pairs along key tokens (for dQ) and V with pairs along D2 (for dP).
//   fp32 (fp16, fp32, and bf16 without vdpbf16ps, on every ISA including the scalar one): gemm_f32 on fp32
//     operands; P and dS unrounded. Its results are the same on every ISA (the table kernels share one
//     operation order), so the scalar path computes exactly what AVX2 and AVX-512 compute.
// exp is the KernelTable's (about 1 ulp, identical on every ISA). Dlt sums in a fixed order. fp64 inputs (a
// testing extension) take the fp64 reference, as the forward does.
//
// Workspace: K and V of every (batch, KV head) packed once per call (O(T2 (2D + D2)), the size of the
// inputs); Dlt (T N1 floats); the chunks' dK/dV partials (at most kPartialBudget = 64 MB unless a single
// chunk per (batch, KV head) needs more: O(N2 maxC (D + D2)) then); per-worker tiles (O(R (D + D2) + R Bc)).
// Nothing grows with T x C except the plan (3 bytes per tile pair).
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/mask_rows.h"
#include "common/numeric.h"
#include "common/row_helpers.h"
#include "common/status_guard.h"
#include "common/threads.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/causal.h"
#include "ops/compress_attention/reference.h"
#include "ops/compress_attention/validate.h"

namespace nsa::cpu {
namespace {

using detail::BatchInfo;

constexpr int64_t kBc = 64;          // compressed tokens of a key tile (= one B panel)
constexpr int64_t kPan = kPanel;     // width of a packed B panel (64)
constexpr int64_t kRowsTarget = 128; // rows (token x head) of a query tile
constexpr int64_t kWin = 16;         // column granularity of the windows

static_assert(kBc == kPan, "a key tile is one panel");

using detail::AlignedBuffer;
using detail::Carver;
using detail::round_up;
using detail::dot_fixed;
using detail::load_bits_row;

// ---------------------------------------------------------------- plan
enum TileState : uint8_t { kSkip = 0, kPartial = 1, kFull = 2 };

// What a tile pair computes: nothing (kSkip), or the columns [w0, w1) of its key tile (16-column
// windows holding every visible entry of its rows; multiples of 16, w1 <= 64), with atten_mask applied
// inside (kPartial) or not needed (kFull: every entry of the window below C_b is visible).
struct PairInfo {
  uint8_t state = kSkip, w0 = 0, w1 = 0;
};

struct BatchPlan {
  BatchInfo bi;
  int64_t nq = 0, nk = 0;           // query tiles (of Bq tokens) and key tiles (of Bc tokens)
  int64_t tile0 = 0;                // index of the batch's first key tile over all batches
  std::vector<PairInfo> tile;       // [nq][nk]
  std::vector<int64_t> fm_rows;     // fully masked rows (local s), ascending
  // (row s, head h) pairs whose masked entries have P != 0 in a partially masked row: the forward's m was
  // -FLT_MAX because every visible score overflowed to -inf (§7, the general rule); p = exp(-FLT_MAX - m) / l_sum,
  // the P of each of its masked entries. Ascending in (s, h); empty in ordinary inputs.
  struct MaskedShare {
    int64_t s, h;
    float p;
  };
  std::vector<MaskedShare> masked_share;
  std::vector<int64_t> pairs_q;     // [nq] computed rows x window columns of the query tile's pairs (cost)
  // Chunks of query tiles: chunk q holds tiles [q ct, (q+1) ct); jlo/jhi [nch]: the key tiles its pairs reach;
  // part_off [nch][N2]: offset of its dK^T/dV^T partial in Backward::parts_.
  int64_t ct = 1, nch = 0;
  std::vector<int64_t> jlo, jhi, part_off;
};

// Sizes of the call (the shape) and of its tiles.
struct Geo : CompressAttentionShape {
  int64_t Dp = 0, nDp = 0;          // D padded to panels, number of panels
  int64_t Bq = 0, R = 0, Rp = 0;    // tokens and rows of a query tile; R rounded up to even
  int64_t Dh = 0, D2h = 0;          // bf16 path: pairs along D and D2 (ceil(D/2), ceil(D2/2))
  int64_t ktile = 0;                // elements of one packed key tile
};

constexpr int64_t kChunkRows = 8192;                   // rows (token x head) of a chunk of query tiles
constexpr int64_t kPartialBudget = int64_t(64) << 20;  // bytes of dK/dV partials above which chunks grow

// Per-worker workspace (allocated once per call, zeroed: padding rows and columns are read as zeros).
//   Query tile, fp32/fp64 paths: Q rows qa [R][D], Q^T qT [D][R], dO rows oa [R][D2], dO^T oT [D2][R].
//   Query tile, bf16 path: Q rows qb [Rp][2Dh], Q^T qTb [D][Rp], dO rows ob [Rp][2D2h], dO^T oTb [D2][Rp]
//     (rows past the tile and the odd last column are zero).
//   Per row: m (rm), 1/l_sum (ril), Dlt (rdlt).
//   Pair: S/P s [Rp][64], dP/dS dp [Rp][64], keep [Rp][64] (1 = visible); bf16 path: P and dS as B panels
//     pB, dsB [Rp/2][64][2], dS rows dsA [R][64].
//   dQ accumulator dq [R][Dp]; u [D2]: the fully masked rows' dV share; ra: a row being converted; zero_tile:
//   the dK^T/dV^T of a key tile no query sees; wide [64][D2]: the masked entries' dV share of a key tile
//   (BatchPlan::masked_share).
struct Scratch {
  AlignedBuffer<char> buf;
  float *qa = nullptr, *qT = nullptr, *oa = nullptr, *oT = nullptr;
  uint16_t *qb = nullptr, *qTb = nullptr, *ob = nullptr, *oTb = nullptr, *pB = nullptr, *dsB = nullptr,
           *dsA = nullptr;
  float *ra = nullptr, *s = nullptr, *dp = nullptr, *rm = nullptr, *ril = nullptr, *rdlt = nullptr;
  float *dq = nullptr, *u = nullptr, *zero_tile = nullptr, *wide = nullptr;
  uint8_t* keep = nullptr;

  void carve(Carver& c, const Geo& g, bool dot) {
    const int64_t R = g.R, Rp = g.Rp;
    if (dot) {
      c.take(&qb, Rp * 2 * g.Dh);
      c.take(&qTb, g.D * Rp);
      c.take(&ob, Rp * 2 * g.D2h);
      c.take(&oTb, g.D2 * Rp);
      c.take(&pB, Rp * kBc);
      c.take(&dsB, Rp * kBc);
      c.take(&dsA, R * kBc);
    } else {
      c.take(&qa, R * g.D);
      c.take(&qT, g.D * R);
      c.take(&oa, R * g.D2);
      c.take(&oT, g.D2 * R);
    }
    c.take(&ra, std::max(g.D, g.D2));
    c.take(&s, Rp * kBc);
    c.take(&dp, Rp * kBc);
    c.take(&rm, R);
    c.take(&ril, R);
    c.take(&rdlt, R);
    c.take(&dq, R * g.Dp);
    c.take(&u, g.D2);
    c.take(&zero_tile, (g.D + g.D2) * kBc);
    c.take(&wide, kBc * g.D2);
    c.take(&keep, Rp * kBc);
  }
  void init(const Geo& g, bool dot) {
    Carver count;
    carve(count, g, dot);
    buf.reset(count.used, /*zero=*/true);
    Carver assign;
    assign.base = buf.get();
    carve(assign, g, dot);
  }
};

// out[k] = element (base + off + k*stride), k < n, converted to float.
template <class E>
inline void load_row(const void* base, int64_t off, int64_t stride, int64_t n, float* out) {
  const typename E::Raw* src = static_cast<const typename E::Raw*>(base) + off;
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) out[k] = E::get(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = E::get(src[k * stride]);
  }
}

// How a call multiplies (chosen once per call, see the header comment).
enum class Path : int {
  kF32 = 1,    // KernelTable::gemm.f32 on fp32 operands
  kPairs = 2,  // KernelTable::gemm.bf16 on bf16 pairs, P and dS rounded to bf16
};

// The backward of one call on inputs of dtype kDt (bf16, fp16 or fp32).
template <DType kDt, Path kPath>
class Backward {
 public:
  using E = detail::Element<kDt>;
  using Raw = typename E::Raw;
  static constexpr bool kDot = kPath == Path::kPairs;
  static_assert(!kDot || kDt == DType::kBF16, "the pair path is for bf16 inputs");
  static_assert(kDt != DType::kF64, "fp64 inputs take the fp64 reference");

  Backward(const CompressAttentionGradParams& p, const CompressAttentionShape& sh, const KernelTable* kt,
           int threads)
      : p_(p), f_(p.fwd), kt_(kt), threads_(threads), g_{sh} {
    g_.nDp = (sh.D + kPan - 1) / kPan;
    g_.Dp = g_.nDp * kPan;
    g_.Bq = std::max<int64_t>(1, kRowsTarget / sh.G);
    g_.R = g_.Bq * sh.G;
    g_.Rp = round_up(g_.R, 2);
    g_.Dh = (sh.D + 1) / 2;
    g_.D2h = (sh.D2 + 1) / 2;
    // K^T [D][64] + K panels [nDp][64][64] + V^T [D2][64]; bf16 path: K pairs along D [Dh][64][2] + K pairs
    // along tokens [nDp][32][64][2] + V pairs along D2 [D2h][64][2].
    g_.ktile = kDot ? (g_.Dh + g_.D2h) * 2 * kBc + g_.nDp * kBc * kPan
                    : (g_.D + g_.D2) * kBc + g_.nDp * kBc * kPan;
    scale_ = static_cast<float>(static_cast<float>(f_.scale_value));  // §1: used as float32
    const std::vector<BatchInfo> bis = detail::make_batches(f_, sh);
    plans_.resize(bis.size());
    int64_t tiles = 0;
    for (size_t b = 0; b < bis.size(); ++b) {
      BatchPlan& pl = plans_[b];
      pl.bi = bis[b];
      pl.nq = (pl.bi.sq + g_.Bq - 1) / g_.Bq;
      pl.nk = (pl.bi.c + kBc - 1) / kBc;
      pl.tile0 = tiles;
      tiles += pl.nk;
    }
    n_ktiles_ = tiles;
  }

  void run() {
    build_plans();
    plan_chunks();
    pack_keys();
    compute_dlt();
    parts_.reset(parts_total_, /*zero=*/false);  // each chunk zeroes its own partial

    // 1. chunk tasks (batch, KV head, chunk of query tiles), largest first (LPT; the order in which tasks run
    //    never changes a result): dQ of the chunk's rows, its dK^T/dV^T partial.
    struct Task {
      int64_t b, n2, q;
      double cost;
    };
    std::vector<Task> tasks;
    const double w_one = 3.0 * g_.D + 2.0 * g_.D2;  // multiply-adds per computed (row, column) of a tile pair
    for (int64_t b = 0; b < static_cast<int64_t>(plans_.size()); ++b) {
      const BatchPlan& pl = plans_[static_cast<size_t>(b)];
      for (int64_t q = 0; q < pl.nch; ++q) {
        double work = 0;
        for (int64_t i = q * pl.ct; i < std::min(pl.nq, (q + 1) * pl.ct); ++i)
          work += w_one * static_cast<double>(pl.pairs_q[static_cast<size_t>(i)]) + g_.R * (g_.D + g_.D2);
        for (int64_t n2 = 0; n2 < g_.N2; ++n2) tasks.push_back({b, n2, q, work});
      }
    }
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
    // 2. (below) per (batch, KV head, key tile): dK_j, dV_j = the chunks' partials summed in chunk order (+ the
    //    fully masked rows' dV share), written in the dtype.
    std::vector<std::array<int64_t, 3>> kv;
    for (int64_t b = 0; b < static_cast<int64_t>(plans_.size()); ++b)
      for (int64_t n2 = 0; n2 < g_.N2; ++n2)
        for (int64_t j = 0; j < plans_[static_cast<size_t>(b)].nk; ++j) kv.push_back({b, n2, j});
    // per-worker tiles, allocated before the first output is written (a failed allocation is an error Status,
    // not a partial result)
    const int64_t most_tasks = std::max<int64_t>({1, static_cast<int64_t>(tasks.size()), static_cast<int64_t>(kv.size())});
    const int workers = static_cast<int>(std::min<int64_t>(std::max(1, threads_), most_tasks));
    std::vector<Scratch> scratch(static_cast<size_t>(workers));
    for (Scratch& sc : scratch) sc.init(g_, kDot);
    parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int w) {
      const Task& task = tasks[static_cast<size_t>(t)];
      run_chunk(task.b, task.n2, task.q, scratch[static_cast<size_t>(w)]);
    });
    parallel_for(static_cast<int64_t>(kv.size()), workers, [&](int64_t t, int w) {
      Scratch& sc = scratch[static_cast<size_t>(w)];
      const auto& task = kv[static_cast<size_t>(t)];
      reduce_kv(task[0], task[1], task[2], sc);
    });

    // Key/value rows past cmp_seq_kvlen[B-1] get zero gradient (§7).
    const int64_t c_end = plans_.back().bi.c_begin + plans_.back().bi.c;
    Raw* gk = static_cast<Raw*>(p_.grad_key);
    Raw* gv = static_cast<Raw*>(p_.grad_value);
    std::fill(gk + c_end * g_.N2 * g_.D, gk + g_.T2 * g_.N2 * g_.D, E::put(0.0f));
    std::fill(gv + c_end * g_.N2 * g_.D2, gv + g_.T2 * g_.N2 * g_.D2, E::put(0.0f));
  }

 private:
  using KElem = typename std::conditional<kDot, uint16_t, float>::type;  // element of the packed key tiles

  // ---------------------------------------------------------------- GEMM of the fp32 path
  void gemm(const float* A, int64_t lda, int64_t M, const float* B, int64_t panel_stride, int64_t col0,
            int64_t ncols, int64_t K, float* C, int64_t ldc, float alpha, bool accumulate) const {
    kt_->gemm.f32(A, lda, M, B, panel_stride, col0, ncols, K, K, C, ldc, alpha, accumulate);
  }
  // bf16 pairs: K pairs of reduction, one chunk.
  void gemm_pairs(const uint16_t* A, int64_t lda, int64_t M, const uint16_t* B, int64_t panel_stride, int64_t col0,
                  int64_t ncols, int64_t K, float* C, int64_t ldc, float alpha, bool accumulate) const {
    kt_->gemm.bf16(A, lda, M, B, panel_stride, col0, ncols, K, K, C, ldc, alpha, accumulate);
  }

  // Row n of a tensor (dtype E) as float.
  void load_acc_row(const Tensor3& t, int64_t row, int64_t head, int64_t n, float* out) const {
    const int64_t off = row * t.stride[0] + head * t.stride[1];
    if (t.stride[2] == 1) {
      kt_->rows.load_row(static_cast<const Raw*>(t.data) + off, out, n, E::kType);
      return;
    }
    load_row<E>(t.data, off, t.stride[2], n, out);
  }
  void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) const {
    kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(src), ld_src, rows, cols, reinterpret_cast<uint32_t*>(dst),
                            ld_dst);
  }

  // ---------------------------------------------------------------- plan
  // Tile visibility map, fully masked rows and tile costs of every batch (parallel over chunks of query tiles).
  void build_plans() {
    constexpr int64_t kChunk = 16;  // query tiles per work item
    // per batch and row: 1 fully masked, 2 partially masked (some entries masked, some visible), 0 no entry masked
    std::vector<std::vector<uint8_t>> fm(plans_.size());
    std::vector<std::pair<int64_t, int64_t>> items;       // (batch, first query tile)
    for (size_t b = 0; b < plans_.size(); ++b) {
      BatchPlan& pl = plans_[b];
      pl.tile.assign(static_cast<size_t>(pl.nq * pl.nk), PairInfo{});
      pl.pairs_q.assign(static_cast<size_t>(pl.nq), 0);
      pl.fm_rows.clear();
      pl.masked_share.clear();
      fm[b].assign(static_cast<size_t>(pl.bi.sq), 0);
      for (int64_t i = 0; i < pl.nq; i += kChunk) items.emplace_back(static_cast<int64_t>(b), i);
    }
    parallel_for(static_cast<int64_t>(items.size()), threads_, [&](int64_t item, int) {
      const auto [b, i0] = items[static_cast<size_t>(item)];
      BatchPlan& pl = plans_[static_cast<size_t>(b)];
      const int64_t Bq = g_.Bq, C = pl.bi.c, Sq = pl.bi.sq;
      // Per key tile of the current query tile: first and last visible column (relative), whether every entry
      // of the rows is visible.
      std::vector<int64_t> lo(static_cast<size_t>(pl.nk)), hi(static_cast<size_t>(pl.nk));
      std::vector<uint8_t> all(static_cast<size_t>(pl.nk));
      for (int64_t i = i0; i < std::min(pl.nq, i0 + kChunk); ++i) {
        const int64_t s0 = i * Bq, s1 = std::min(Sq, s0 + Bq);
        std::fill(lo.begin(), lo.end(), kBc);
        std::fill(hi.begin(), hi.end(), -1);
        std::fill(all.begin(), all.end(), 1);
        for (int64_t s = s0; s < s1; ++s) {
          const detail::MaskRow mr = detail::analyse_mask_row(f_.atten_mask, s, C);
          if (mr.kind == detail::MaskRowKind::kFullyMasked) {  // every tile of the row has masked entries
            fm[static_cast<size_t>(b)][static_cast<size_t>(s)] = 1;
            std::fill(all.begin(), all.end(), 0);
            continue;
          }
          if (mr.kind == detail::MaskRowKind::kScattered || mr.lo > 0 || mr.hi < C)
            fm[static_cast<size_t>(b)][static_cast<size_t>(s)] = 2;
          for (int64_t j = 0; j < pl.nk; ++j) {
            const int64_t c0 = j * kBc, nc = std::min(C, c0 + kBc) - c0;
            int64_t f = -1, l = -1;
            if (mr.kind == detail::MaskRowKind::kRange) {  // the run [mr.lo, mr.hi) clipped to the tile
              const int64_t a = std::max(mr.lo, c0), e = std::min(mr.hi, c0 + nc);
              if (a < e) {
                f = a - c0;
                l = e - 1 - c0;
              }
              if (!(mr.lo <= c0 && mr.hi >= c0 + nc)) all[static_cast<size_t>(j)] = 0;
            } else {
              for (int64_t c = 0; c < nc; ++c)
                if (!detail::mask_at(f_.atten_mask, s, c0 + c)) {
                  if (f < 0) f = c;
                  l = c;
                } else {
                  all[static_cast<size_t>(j)] = 0;
                }
            }
            if (f >= 0) {
              lo[static_cast<size_t>(j)] = std::min(lo[static_cast<size_t>(j)], f);
              hi[static_cast<size_t>(j)] = std::max(hi[static_cast<size_t>(j)], l);
            }
          }
        }
        for (int64_t j = 0; j < pl.nk; ++j) {
          PairInfo& pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
          if (hi[static_cast<size_t>(j)] < 0) continue;  // kSkip: nothing visible
          pi.state = all[static_cast<size_t>(j)] ? kFull : kPartial;
          pi.w0 = static_cast<uint8_t>(lo[static_cast<size_t>(j)] / kWin * kWin);
          pi.w1 = static_cast<uint8_t>((hi[static_cast<size_t>(j)] / kWin + 1) * kWin);
          pl.pairs_q[static_cast<size_t>(i)] += (s1 - s0) * g_.G * (pi.w1 - pi.w0);
        }
      }
    });
    for (size_t b = 0; b < plans_.size(); ++b) {
      BatchPlan& pl = plans_[b];
      for (int64_t s = 0; s < pl.bi.sq; ++s) {
        const uint8_t kind = fm[b][static_cast<size_t>(s)];
        if (kind == 1) pl.fm_rows.push_back(s);
        if (kind != 2) continue;
        // a masked entry's P, exp(-FLT_MAX - m) / l_sum, is 0 unless m <= -FLT_MAX (or NaN): for any larger m the
        // difference is at most -2^104
        for (int64_t h = 0; h < g_.N1; ++h) {
          const int64_t so = detail::stat_offset(pl.bi, h, s);
          const float m = p_.softmax_max[so];
          if (m > -FLT_MAX) continue;
          const float e = std::exp(-FLT_MAX - m);
          if (e != 0.0f) pl.masked_share.push_back({s, h, e * (1.0f / p_.softmax_sum[so])});
        }
      }
    }
  }

  // Chunks of query tiles (the same ct for every batch): ct = kChunkRows / R tiles, doubled while the partials
  // would exceed kPartialBudget. A function of the shape and the mask only, never of the thread count.
  void plan_chunks() {
    const int64_t tile_bytes = (g_.D + g_.D2) * kBc * static_cast<int64_t>(sizeof(float));
    int64_t max_nq = 1;
    for (const BatchPlan& pl : plans_) max_nq = std::max(max_nq, pl.nq);
    int64_t ct = std::max<int64_t>(1, kChunkRows / g_.R);
    for (;;) {
      int64_t total = 0;
      for (BatchPlan& pl : plans_) {
        pl.ct = ct;
        pl.nch = (pl.nq + ct - 1) / ct;
        pl.jlo.assign(static_cast<size_t>(pl.nch), 0);
        pl.jhi.assign(static_cast<size_t>(pl.nch), 0);
        for (int64_t q = 0; q < pl.nch; ++q) {
          int64_t lo = pl.nk, hi = 0;
          for (int64_t i = q * ct; i < std::min(pl.nq, (q + 1) * ct); ++i)
            for (int64_t j = 0; j < pl.nk; ++j)
              if (pl.tile[static_cast<size_t>(i * pl.nk + j)].state != kSkip) {
                lo = std::min(lo, j);
                hi = std::max(hi, j + 1);
              }
          if (hi > lo) {
            pl.jlo[static_cast<size_t>(q)] = lo;
            pl.jhi[static_cast<size_t>(q)] = hi;
            total += (hi - lo) * g_.N2;
          }
        }
      }
      if (static_cast<double>(total) * static_cast<double>(tile_bytes) <= kPartialBudget || ct >= max_nq) break;
      ct *= 2;
    }
    parts_total_ = 0;
    for (BatchPlan& pl : plans_) {
      pl.part_off.assign(static_cast<size_t>(pl.nch * g_.N2), 0);
      for (int64_t q = 0; q < pl.nch; ++q)
        for (int64_t n2 = 0; n2 < g_.N2; ++n2) {
          pl.part_off[static_cast<size_t>(q * g_.N2 + n2)] = parts_total_;
          parts_total_ += (pl.jhi[static_cast<size_t>(q)] - pl.jlo[static_cast<size_t>(q)]) * (g_.D + g_.D2) * kBc;
        }
    }
  }

  // ---------------------------------------------------------------- packed keys
  const KElem* slot(const BatchPlan& pl, int64_t n2, int64_t j) const {
    return keys_.get() + ((pl.tile0 + j) * g_.N2 + n2) * g_.ktile;
  }

  // Every key tile of every (batch, KV head), once per call (parallel over tiles). Columns past C_b are zero.
  //   fp32/fp64: K^T [D][64] (B of S), K panels [nDp][64 tokens][64] (B of dQ), V^T [D2][64] (B of dP);
  //   bf16 pairs: K [Dh][64][2] (pairs along D), K [nDp][32][64][2] (pairs along tokens), V [D2h][64][2].
  void pack_keys() {
    keys_.reset(n_ktiles_ * g_.N2 * g_.ktile, /*zero=*/true);
    std::vector<std::pair<int64_t, int64_t>> list;  // (batch, key tile)
    for (int64_t b = 0; b < static_cast<int64_t>(plans_.size()); ++b)
      if (plans_[static_cast<size_t>(b)].nq > 0)
        for (int64_t j = 0; j < plans_[static_cast<size_t>(b)].nk; ++j) list.emplace_back(b, j);
    const int64_t n = static_cast<int64_t>(list.size()) * g_.N2;
    parallel_for(n, threads_, [&](int64_t task, int) {
      const auto [b, j] = list[static_cast<size_t>(task / g_.N2)];
      const int64_t n2 = task % g_.N2;
      const BatchPlan& pl = plans_[static_cast<size_t>(b)];
      pack_key_tile(pl, n2, j, const_cast<KElem*>(slot(pl, n2, j)));
    });
  }

  void pack_key_tile(const BatchPlan& pl, int64_t n2, int64_t j, KElem* dst) const {
    const int64_t D = g_.D, D2 = g_.D2, c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    const Tensor3 &k = f_.key, &v = f_.value;
    if constexpr (kDot) {
      uint16_t* kpd = dst;
      uint16_t* kpt = kpd + g_.Dh * 2 * kBc;
      uint16_t* vpd = kpt + g_.nDp * kBc * kPan;
      std::vector<uint16_t> row(static_cast<size_t>(std::max(D, D2)));
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t tk = pl.bi.c_begin + c0 + c;
        load_bits_row(k, tk, n2, D, row.data());
        for (int64_t d = 0; d < D; ++d) {
          kpd[(d / 2) * 2 * kBc + c * 2 + d % 2] = row[static_cast<size_t>(d)];
          kpt[(d / kPan) * kBc * kPan + (c / 2) * 2 * kPan + (d % kPan) * 2 + c % 2] = row[static_cast<size_t>(d)];
        }
        load_bits_row(v, tk, n2, D2, row.data());
        for (int64_t e = 0; e < D2; ++e) vpd[(e / 2) * 2 * kBc + c * 2 + e % 2] = row[static_cast<size_t>(e)];
      }
    } else {
      float* kt = dst;
      float* kp = kt + D * kBc;
      float* vt = kp + g_.nDp * kBc * kPan;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t tk = pl.bi.c_begin + c0 + c;
        for (int64_t pn = 0; pn < g_.nDp; ++pn) {
          const int64_t d0 = pn * kPan, w = std::min(kPan, D - d0);
          load_row<E>(k.data, tk * k.stride[0] + n2 * k.stride[1] + d0 * k.stride[2], k.stride[2], w,
                      kp + (pn * kBc + c) * kPan);
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        const float* src = kp + (d / kPan) * kBc * kPan + d % kPan;
        for (int64_t c = 0; c < nc; ++c) kt[d * kBc + c] = src[c * kPan];
      }
      for (int64_t c = 0; c < nc; ++c) {
        const Raw* vr = static_cast<const Raw*>(v.data) + (pl.bi.c_begin + c0 + c) * v.stride[0] + n2 * v.stride[1];
        for (int64_t e = 0; e < D2; ++e) vt[e * kBc + c] = E::get(vr[e * v.stride[2]]);
      }
    }
  }

  // Dlt = sum_j dO[t, h, j] * O[t, h, j] of every (query row, head), fp32 (fp64) in a fixed order (dot_fixed),
  // O = attention_out as returned; once per call, parallel over chunks of query rows.
  void compute_dlt() {
    const int64_t T = f_.query.size[0], N1 = g_.N1, D2 = g_.D2;
    constexpr int64_t kChunk = 64;
    dlt_.assign(static_cast<size_t>(T * N1), 0.0f);
    std::vector<std::vector<float>> rows(static_cast<size_t>(std::max(threads_, 1)));
    parallel_for((T + kChunk - 1) / kChunk, threads_, [&](int64_t chunk, int w) {
      std::vector<float>& buf = rows[static_cast<size_t>(w)];
      buf.resize(static_cast<size_t>(2 * D2));
      for (int64_t t = chunk * kChunk; t < std::min(T, (chunk + 1) * kChunk); ++t)
        for (int64_t h = 0; h < N1; ++h) {
          load_acc_row(p_.grad_out, t, h, D2, buf.data());
          load_acc_row(p_.attention_out, t, h, D2, buf.data() + D2);
          dlt_[static_cast<size_t>(t * N1 + h)] = dot_fixed(buf.data(), buf.data() + D2, D2);
        }
    });
  }

  // ---------------------------------------------------------------- tiles
  int64_t tile_rows(const BatchPlan& pl, int64_t i) const {
    return (std::min(pl.bi.sq, (i + 1) * g_.Bq) - i * g_.Bq) * g_.G;
  }

  // Query tile i of (batch, n2): Q and dO as rows and transposed, the statistics m and 1/l_sum and Dlt of every
  // row.
  void load_q(const BatchPlan& pl, int64_t n2, int64_t i, Scratch& sc) const {
    const int64_t G = g_.G, D = g_.D, D2 = g_.D2, R = g_.R, Rp = g_.Rp, rows = tile_rows(pl, i);
    const Tensor3 &q = f_.query, &go = p_.grad_out;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = i * g_.Bq + r / G, h = n2 * G + r % G, t = pl.bi.q_begin + s;
      sc.rdlt[r] = dlt_[static_cast<size_t>(t * g_.N1 + h)];
      const int64_t so = detail::stat_offset(pl.bi, h, s);
      sc.rm[r] = static_cast<float>(p_.softmax_max[so]);
      sc.ril[r] = 1.0f / static_cast<float>(p_.softmax_sum[so]);
      if constexpr (kDot) {
        load_bits_row(q, t, h, D, sc.qb + r * 2 * g_.Dh);
        load_bits_row(go, t, h, D2, sc.ob + r * 2 * g_.D2h);
      } else {
        load_acc_row(q, t, h, D, sc.qa + r * D);
        load_acc_row(go, t, h, D2, sc.oa + r * D2);
      }
    }
    if constexpr (kDot) {
      // rows past the tile (R odd, or a short last tile) are zero: they are read as pair partners
      for (int64_t r = rows; r < Rp; ++r) {
        std::memset(sc.qb + r * 2 * g_.Dh, 0, sizeof(uint16_t) * static_cast<size_t>(2 * g_.Dh));
        std::memset(sc.ob + r * 2 * g_.D2h, 0, sizeof(uint16_t) * static_cast<size_t>(2 * g_.D2h));
      }
      const int64_t tr = round_up(rows, 2);
      kt_->grad.transpose_u16(sc.qb, 2 * g_.Dh, tr, D, sc.qTb, Rp);
      kt_->grad.transpose_u16(sc.ob, 2 * g_.D2h, tr, D2, sc.oTb, Rp);
    } else {
      transpose(sc.qa, D, rows, D, sc.qT, R);
      transpose(sc.oa, D2, rows, D2, sc.oT, R);
    }
  }

  // The tile pair (i, j) on a loaded query tile and the packed key tile `key`, on the columns [w0, w1) of its window:
  // S, P, dP, dS; then dV_j^T += dO^T P and dK_j^T += Q^T dS (into dkT [D][64], dvT [D2][64]) and
  // dQ_i += dS K_j (into sc.dq).
  void pair(const BatchPlan& pl, int64_t i, int64_t j, PairInfo pi, const KElem* key, float* dkT, float* dvT,
            Scratch& sc) const {
    const int64_t R = g_.R, rows = tile_rows(pl, i), c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    const int64_t w0 = pi.w0, w1 = pi.w1, wn = w1 - w0;
    const int64_t wv = std::min(w1, nc);  // window columns below C_b
    // S (scaled) and dP
    if constexpr (kDot) {
      const uint16_t* kpd = key;
      const uint16_t* vpd = key + g_.Dh * 2 * kBc + g_.nDp * kBc * kPan;
      gemm_pairs(sc.qb, 2 * g_.Dh, rows, kpd, 0, w0, wn, g_.Dh, sc.s + w0, kBc, scale_, false);
      gemm_pairs(sc.ob, 2 * g_.D2h, rows, vpd, 0, w0, wn, g_.D2h, sc.dp + w0, kBc, 1.0f, false);
    } else {
      const float* ktr = key;
      const float* vt = key + g_.D * kBc + g_.nDp * kBc * kPan;
      gemm(sc.qa, g_.D, rows, ktr, 0, w0, wn, g_.D, sc.s + w0, kBc, scale_, false);
      gemm(sc.oa, g_.D2, rows, vt, 0, w0, wn, g_.D2, sc.dp + w0, kBc, 1.0f, false);
    }
    // Visible entries of the window: columns < nc, and not removed by atten_mask in a partial pair.
    uint8_t* keep = sc.keep;
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* kr = keep + r * kBc;
      if (pi.state == kFull) {
        std::memset(kr + w0, 1, static_cast<size_t>(wv - w0));
      } else {
        const int64_t s = i * g_.Bq + r / g_.G, ms = f_.atten_mask.stride[1];
        const uint8_t* mr = f_.atten_mask.data + s * f_.atten_mask.stride[0] + c0 * ms;
        for (int64_t c = w0; c < wv; ++c) kr[c] = mr[c * ms] == 0;
      }
      if (wv < w1) std::memset(kr + wv, 0, static_cast<size_t>(w1 - wv));
    }
    // P and dS
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = sc.s + r * kBc;
      float* dpr = sc.dp + r * kBc;
      const uint8_t* kr = keep + r * kBc;
      kt_->grad.softmax_grad_row(sr + w0, dpr + w0, kr + w0, wn, sc.rm[r], sc.ril[r], sc.rdlt[r]);
    }
    if constexpr (kDot) {
      if (rows % 2 != 0) {  // the zero partner of the last row in the pair layouts
        std::memset(sc.s + rows * kBc + w0, 0, sizeof(float) * static_cast<size_t>(wn));
        std::memset(sc.dp + rows * kBc + w0, 0, sizeof(float) * static_cast<size_t>(wn));
      }
      // P and dS rounded to bf16: P as B panel pB and dS as B panel dsB (pairs along rows) for dV^T and dK^T,
      // dS as plain rows dsA (pairs along key columns) for dQ
      const int64_t half = (rows + 1) / 2;
      for (int64_t p = 0; p < half; ++p) {
        const int64_t r0 = 2 * p, r1 = 2 * p + 1;
        kt_->grad.pack_rows_bf16(sc.s + r0 * kBc + w0, sc.s + r1 * kBc + w0, wn, sc.pB + p * 2 * kBc + 2 * w0, nullptr,
                            nullptr);
        kt_->grad.pack_rows_bf16(sc.dp + r0 * kBc + w0, sc.dp + r1 * kBc + w0, wn, sc.dsB + p * 2 * kBc + 2 * w0,
                            sc.dsA + r0 * kBc + w0, r1 < rows ? sc.dsA + r1 * kBc + w0 : nullptr);
      }
      gemm_pairs(sc.oTb, g_.Rp, g_.D2, sc.pB, 0, w0, wn, half, dvT + w0, kBc, 1.0f, true);  // dV^T += dO^T P
      gemm_pairs(sc.qTb, g_.Rp, g_.D, sc.dsB, 0, w0, wn, half, dkT + w0, kBc, 1.0f, true);  // dK^T += Q^T dS
      // dQ += dS K over the window (dS = 0 past C_b, K pairs zero there)
      const uint16_t* kpt = key + g_.Dh * 2 * kBc;
      gemm_pairs(sc.dsA + w0, kBc, rows, kpt + (w0 / 2) * 2 * kPan, kBc * kPan, 0, g_.Dp, wn / 2, sc.dq, g_.Dp, 1.0f,
                 true);
    } else {
      gemm(sc.oT, R, g_.D2, sc.s, 0, w0, wn, rows, dvT + w0, kBc, 1.0f, true);  // dV^T += dO^T P
      gemm(sc.qT, R, g_.D, sc.dp, 0, w0, wn, rows, dkT + w0, kBc, 1.0f, true);  // dK^T += Q^T dS
      // dQ += dS K over the window's key rows below C_b
      const float* kp = key + g_.D * kBc;
      gemm(sc.dp + w0, kBc, rows, kp + w0 * kPan, kBc * kPan, 0, g_.Dp, wv - w0, sc.dq, g_.Dp, 1.0f, true);
    }
  }

  // u = sum over fully masked rows s (ascending) and heads g of dO[s, h] / l_sum[s, h]: their dV share.
  void fully_masked_share(const BatchPlan& pl, int64_t n2, Scratch& sc) const {
    const int64_t D2 = g_.D2;
    std::fill(sc.u, sc.u + D2, 0.0f);
    for (int64_t s : pl.fm_rows)
      for (int64_t g = 0; g < g_.G; ++g) {
        const int64_t h = n2 * g_.G + g, t = pl.bi.q_begin + s;
        load_acc_row(p_.grad_out, t, h, D2, sc.ra);
        const float il = 1.0f / static_cast<float>(p_.softmax_sum[detail::stat_offset(pl.bi, h, s)]);
        for (int64_t e = 0; e < D2; ++e) sc.u[e] += il * sc.ra[e];
      }
  }

  // wide[c][e] = sum over the (s, h) of pl.masked_share in group n2 (ascending) whose row s masks column c0 + c of
  // key tile j of p * dO[s, h, e]: the dV share of masked entries with P != 0 in partially masked rows. Returns
  // false (wide untouched) when there is none.
  bool masked_entries_share(const BatchPlan& pl, int64_t n2, int64_t j, Scratch& sc) const {
    const int64_t D2 = g_.D2, c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    bool any = false;
    for (const BatchPlan::MaskedShare& ms : pl.masked_share) {
      if (ms.h / g_.G != n2) continue;
      bool loaded = false;
      for (int64_t c = 0; c < nc; ++c) {
        if (!detail::mask_at(f_.atten_mask, ms.s, c0 + c)) continue;
        if (!any) std::fill(sc.wide, sc.wide + kBc * D2, 0.0f);
        if (!loaded) load_acc_row(p_.grad_out, pl.bi.q_begin + ms.s, ms.h, D2, sc.ra);
        any = loaded = true;
        for (int64_t e = 0; e < D2; ++e) sc.wide[c * D2 + e] += ms.p * sc.ra[e];
      }
    }
    return any;
  }

  // Stores the fp32 row x[0..n) in the dtype at dst.
  void store_acc_row(const float* x, int64_t n, Raw* dst) const { kt_->rows.store_row(x, dst, n, E::kType); }

  // Writes dK_j (times scale) and dV_j (plus u, plus sc.wide where has_wide) of key tile j in the dtype, from
  // dK^T / dV^T.
  void finish_kv(const BatchPlan& pl, int64_t n2, int64_t j, const float* dkT, const float* dvT, bool has_wide,
                 Scratch& sc) const {
    const int64_t D = g_.D, D2 = g_.D2, c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    const bool has_fm = !pl.fm_rows.empty();
    Raw* gk = static_cast<Raw*>(p_.grad_key);
    Raw* gv = static_cast<Raw*>(p_.grad_value);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t row = (pl.bi.c_begin + c0 + c) * g_.N2 + n2;
      for (int64_t d = 0; d < D; ++d) sc.ra[d] = scale_ * dkT[d * kBc + c];
      store_acc_row(sc.ra, D, gk + row * D);
      for (int64_t e = 0; e < D2; ++e) sc.ra[e] = has_fm ? dvT[e * kBc + c] + sc.u[e] : dvT[e * kBc + c];
      if (has_wide)
        for (int64_t e = 0; e < D2; ++e) sc.ra[e] += sc.wide[c * D2 + e];
      store_acc_row(sc.ra, D2, gv + row * D2);
    }
  }

  void write_dq(const BatchPlan& pl, int64_t n2, int64_t i, Scratch& sc) const {
    const int64_t G = g_.G, D = g_.D, rows = tile_rows(pl, i);
    Raw* gq = static_cast<Raw*>(p_.grad_query);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = pl.bi.q_begin + i * g_.Bq + r / G, h = n2 * G + r % G;
      float* dqr = sc.dq + r * g_.Dp;
      for (int64_t d = 0; d < D; ++d) dqr[d] *= scale_;
      store_acc_row(dqr, D, gq + (t * g_.N1 + h) * D);
    }
  }

  // Partial of chunk q of (batch, n2): dK^T [D][64] then dV^T [D2][64] for each key tile in [jlo, jhi).
  float* partial(const BatchPlan& pl, int64_t n2, int64_t q) const {
    return parts_.get() + pl.part_off[static_cast<size_t>(q * g_.N2 + n2)];
  }

  // Chunk task: query tiles [q ct, (q+1) ct) of (batch, n2) ascending, each with every key tile ascending
  // (all five products, no recomputation): dQ of these rows, complete; dK^T/dV^T summed over the chunk's tiles.
  void run_chunk(int64_t b, int64_t n2, int64_t q, Scratch& sc) const {
    const BatchPlan& pl = plans_[static_cast<size_t>(b)];
    const int64_t jlo = pl.jlo[static_cast<size_t>(q)], jhi = pl.jhi[static_cast<size_t>(q)];
    const int64_t tile = (g_.D + g_.D2) * kBc;
    float* part = partial(pl, n2, q);
    std::fill(part, part + (jhi - jlo) * tile, 0.0f);
    for (int64_t i = q * pl.ct; i < std::min(pl.nq, (q + 1) * pl.ct); ++i) {
      std::fill(sc.dq, sc.dq + g_.R * g_.Dp, 0.0f);
      load_q(pl, n2, i, sc);
      for (int64_t j = jlo; j < jhi; ++j) {
        const PairInfo pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
        if (pi.state == kSkip) continue;
        float* dkT = part + (j - jlo) * tile;
        pair(pl, i, j, pi, slot(pl, n2, j), dkT, dkT + g_.D * kBc, sc);
      }
      write_dq(pl, n2, i, sc);
    }
  }

  // dK_j and dV_j of (batch, n2): the partials of the chunks that reach key tile j, summed in chunk order into
  // the first one, plus for dV the fully masked rows' share and the masked entries' share of the rows whose
  // visible scores all overflowed; written in the dtype.
  void reduce_kv(int64_t b, int64_t n2, int64_t j, Scratch& sc) const {
    const BatchPlan& pl = plans_[static_cast<size_t>(b)];
    const int64_t tile = (g_.D + g_.D2) * kBc;
    float* acc = nullptr;
    for (int64_t q = 0; q < pl.nch; ++q) {
      const int64_t jlo = pl.jlo[static_cast<size_t>(q)], jhi = pl.jhi[static_cast<size_t>(q)];
      if (j < jlo || j >= jhi) continue;
      float* part = partial(pl, n2, q) + (j - jlo) * tile;
      if (acc == nullptr) {
        acc = part;
      } else {
        for (int64_t e = 0; e < tile; ++e) acc[e] += part[e];
      }
    }
    if (acc == nullptr) {  // no query row sees key tile j
      std::fill(sc.zero_tile, sc.zero_tile + tile, 0.0f);
      acc = sc.zero_tile;
    }
    fully_masked_share(pl, n2, sc);
    const bool has_wide = !pl.masked_share.empty() && masked_entries_share(pl, n2, j, sc);
    finish_kv(pl, n2, j, acc, acc + g_.D * kBc, has_wide, sc);
  }

  const CompressAttentionGradParams& p_;
  const CompressAttentionParams& f_;
  const KernelTable* kt_;
  int threads_;
  Geo g_;
  float scale_;
  std::vector<BatchPlan> plans_;
  int64_t n_ktiles_ = 0;
  AlignedBuffer<KElem> keys_;
  AlignedBuffer<float> parts_;    // dK^T/dV^T partials of every chunk (BatchPlan::part_off)
  int64_t parts_total_ = 0;  // their total size (elements)
  std::vector<float> dlt_;  // [T][N1] Dlt of every (query row, head)
};

template <DType kDt, Path kPath>
void run_backward(const CompressAttentionGradParams& p, const CompressAttentionShape& sh, const KernelTable* kt,
                  int threads) {
  Backward<kDt, kPath> bw(p, sh, kt, threads);
  bw.run();
}

Status backward_impl(const CompressAttentionGradParams& p, const CpuOptions& options) {
  CompressAttentionShape sh;
  Status st = validate_compress_attention_backward(p, &sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  st = resolve_isa(options.isa, &isa);
  if (!st.ok()) return st;
  if (p.fwd.dtype == DType::kF64) return reference::backward_fp64(p);  // testing extension: no fast path
  st = check_cpu_workspace_sizes(sh, "compress_attention_backward_cpu");
  if (!st.ok()) return st;
  detail::CausalMask causal_mask;  // §10 causal: atten_mask is the view of causal.h
  CompressAttentionGradParams q = p;
  q.fwd = detail::with_causal_view(p.fwd, sh, &causal_mask);
  const KernelTable* kt = kernels_for(isa);
  const int threads = resolve_num_threads(options.num_threads);
  // The path, once per call: bf16 pairs where the ISA has a bf16 dot product, KernelTable::gemm.f32 otherwise.
  switch (p.fwd.dtype) {
    case DType::kBF16:
      if (kt->gemm.bf16 != nullptr && kt->grad.pack_rows_bf16 != nullptr)
        run_backward<DType::kBF16, Path::kPairs>(q, sh, kt, threads);
      else
        run_backward<DType::kBF16, Path::kF32>(q, sh, kt, threads);
      break;
    case DType::kF16: run_backward<DType::kF16, Path::kF32>(q, sh, kt, threads); break;
    case DType::kF32: run_backward<DType::kF32, Path::kF32>(q, sh, kt, threads); break;
    case DType::kF64: break;
  }
  return Status::Ok();
}

}  // namespace
}  // namespace nsa::cpu

namespace nsa {

// Workspace that cannot be allocated (packed keys, chunk partials, per-worker tiles) is reported as an error,
// never as a crash.
Status compress_attention_backward_cpu(const CompressAttentionGradParams& p, const CpuOptions& options) {
  return detail::guarded("compress_attention_backward_cpu", "dK/dV chunk partials and per-thread tiles",
                         [&] { return cpu::backward_impl(p, options); });
}

}  // namespace nsa
