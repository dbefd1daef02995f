// Optimized CPU backward of selected attention (docs/spec/select_attention.md §8), deterministic.
//
// Per visible entry e of (query row t, head h) with key row p: S = (q . k_p) scale, P = exp(S - m) / l_sum from the
// saved statistics, dP = dO . v_p, dS = P (dP - Dlt) with Dlt = dO . O; then dQ_t += scale dS k_p,
// dK_p += scale dS q_t, dV_p += P dO_t. dQ gathers over the entries of a query row, dK and dV scatter into the
// key rows that many query rows selected. Both are computed without atomics and without O(T1 K l') buffers, in two
// independent kinds of tasks that recompute S and dP (cpu_common.h describes the packed operands and the tile
// entries):
//   A. query tiles (batch, KV head n2, Bq rows), exactly as the forward's: for each block the tile reaches, S and
//      dP by GEMM of its entries' Q and dO rows (read in place through row pointers) against the packed KQ and VD,
//      P and dS, then
//      dQ += dS K by GEMM against the packed KT; each query row's dQ is complete in its tile and written once
//      (rha_T after the final multiplication by scale).
//   B. key blocks (batch, KV head n2, block x): the index map inverted once per call, so that each block lists the
//      entries (query row, slot) that reach it, rows ascending; chunks of them gathered (G rows per entry),
//      S, dP, P, dS as in A, then dV^T += dO^T P and dK^T += Q^T dS by GEMM with the chunk's rows as the reduction
//      ([D][lpp] and [Dv][lpp] accumulators that stay in cache for the whole list). A block reached by many rows is
//      cut into pieces of a fixed number of rows (from the shape and the indices only); each piece sums into its
//      own partial, and the partials are added in piece order afterwards. Each key row of the block is written once.
// Every summation order is fixed by the shape and the indices: results do not depend on the number of threads.
// Rounding: on the bf16 dot-product path (pairs) P and dS are rounded with rha_T before the products that use them
// (§8 allows it); on the fp32 path they stay fp32. Gradients are rounded once with rha_T (§8).
// Rows without visible entry get dQ = 0 and contribute nothing (§6); key rows no entry reaches (never selected,
// past Skv_b, past the last prefix sum) get zeros.
// Invisible positions get P = dS = 0 exactly (set, not multiplied), so inf / NaN in keys or values they do not see
// never reach dK or dV; for dQ, the entries of a key block holding inf / NaN that see only part of it take a scalar
// path (the GEMM would multiply the invisible keys by dS = 0).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/threads.h"
#include "cpu/entry.h"
#include "cpu/row_load.h"
#include "ops/select_attention/cpu.h"
#include "ops/select_attention/cpu_common.h"
#include "ops/select_attention/kernels.h"
#include "ops/select_attention/reference.h"

namespace nsa::select_cpu {
namespace {

constexpr int64_t kTileRows = 64;    // GEMM rows (query rows x G) of a phase-A tile with G >= kDirectMinG
constexpr int64_t kTileRowsGathered = 256;  // the same below kDirectMinG (more query rows share each block)
constexpr int64_t kChunkRows = 128;  // GEMM rows (entries x G) of a phase-B chunk
constexpr int64_t kPieceRows = 8192; // GEMM rows of a phase-B piece (grown while the partials exceed the budget)
constexpr int64_t kPartialBudget = int64_t(64) << 20;  // bytes of phase-B partials
// (kDirectMinG, cpu_common.h: from that G on phase A runs each entry's GEMMs on its G tile rows in place.)

float load_stat(const Tensor3& t, int64_t i, int64_t j) {
  return static_cast<const float*>(t.data)[i * t.stride[0] + j * t.stride[1]];
}

template <bool kPairs>
class Backward : CallState {
 public:
  using P = Path<kPairs>;
  using E = typename P::E;

  Backward(const SelectAttentionGradParams& p, const CallState& state, const Tuning& tuning)
      : CallState(state), p_(p), f_(p.fwd) {
    piece_rows_ = tuned(tuning.bwd_piece_rows, kPieceRows);
    bq_ = tile_tokens(tuning.bwd_tile_rows, kTileRows, kTileRowsGathered);
    ra_ = bq_ * g_.G;
    bc_ = tokens_for_rows(tuned(tuning.bwd_chunk_rows, kChunkRows));
    rb_ = bc_ * g_.G;
    rbp_ = round_up(rb_, 2);
  }

  // Never: dk and dv have T2 rows to write (zeros where no query reaches them) even without query rows.
  static bool nothing_to_write(const SelectAttentionShape&) { return false; }

  void run() {
    const int64_t n_packed = mark(f_);
    packs_.reset(n_packed * g_.block_elems);
    invert();
    plan_pieces();
    stats_.resize(static_cast<size_t>(g_.T1 * g_.N1));

    // tasks: phase-A tiles and phase-B pieces, largest first (LPT; the order never changes a result)
    struct Task {
      int kind;  // 0: query tile (b, n2, s0, s1); 1: piece index
      int64_t b, n2, s0, s1;
      double cost;
    };
    std::vector<Task> tasks;
    const double wa = 2.0 * g_.D + g_.Dv, wb = 2.0 * g_.D + 2.0 * g_.Dv;
    for_each_tile(f_, bq_, [&](int64_t b, int64_t s0, int64_t s1, int64_t n2, int64_t visible) {
      tasks.push_back({0, b, n2, s0, s1, static_cast<double>(visible) * g_.G * wa + (s1 - s0)});
    });
    for (size_t i = 0; i < pieces_.size(); ++i)
      tasks.push_back({1, static_cast<int64_t>(i), 0, 0, 0, pieces_[i].vis * g_.G * wb + 1});
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

    const int workers = threads_;
    std::vector<Scratch> scratch(static_cast<size_t>(workers));
    for (Scratch& sc : scratch) sc.init(*this);  // every allocation before the first output is written
    parts_.reset(parts_total_);

    // packing, row statistics, zero rows no entry reaches
    constexpr int64_t kStatsChunk = 64;
    const int64_t n_stats = (g_.T1 + kStatsChunk - 1) / kStatsChunk;
    cpu::parallel_for(n_packed + n_stats + 1, workers, [&](int64_t i, int w) {
      if (i < n_packed) {
        pack<kPairs>(f_, i, packs_.get(), scratch[static_cast<size_t>(w)].stage.get());
      } else if (i < n_packed + n_stats) {
        compute_row_stats((i - n_packed) * kStatsChunk, std::min(g_.T1, (i - n_packed + 1) * kStatsChunk),
                          scratch[static_cast<size_t>(w)]);
      } else {
        zero_unreached();
      }
    });
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int w) {
      const Task& tk = tasks[static_cast<size_t>(t)];
      Scratch& sc = scratch[static_cast<size_t>(w)];
      if (tk.kind == 0) run_tile(sc, tk.b, tk.n2, tk.s0, tk.s1);
      else run_piece(sc, pieces_[static_cast<size_t>(tk.b)]);
    });
    // blocks cut into several pieces: partials summed in piece order
    cpu::parallel_for(static_cast<int64_t>(multi_.size()), workers, [&](int64_t i, int w) {
      const Multi& mb = multi_[static_cast<size_t>(i)];
      float* acc = parts_.get() + pieces_[static_cast<size_t>(mb.first)].part;
      const int64_t n = (g_.D + g_.Dv) * g_.lpp;
      for (int64_t k = mb.first + 1; k < mb.first + mb.count; ++k) {
        const float* part = parts_.get() + pieces_[static_cast<size_t>(k)].part;
        for (int64_t e = 0; e < n; ++e) acc[e] += part[e];
      }
      const Piece& pc = pieces_[static_cast<size_t>(mb.first)];
      finish_block(scratch[static_cast<size_t>(w)], pc.b, pc.x, pc.n2, acc, acc + g_.D * g_.lpp);
    });
  }

 private:
  // A piece of phase B: entries [e0, e1) of block x of (b, n2); part = offset of its partial (-1: single piece).
  struct Piece {
    int64_t b, x, n2, e0, e1, part;
    double vis;
  };
  struct Multi {
    int64_t first, count;
  };

  struct Scratch {
    // phase A
    AlignedBuf<E> qa, oa;      // [Ra][Dr], [Ra][Dvr] the tile's Q and dO rows
    AlignedBuf<float> dq;      // [Ra][Dp] dQ accumulators
    detail::LineVector<float> m, il, dlt;  // per tile row
    TileEntries te;
    // both phases
    AlignedBuf<E> asq, aso;    // [Rbp][Dr], [Rbp][Dvr] gathered Q and dO rows of a block's entries
    AlignedBuf<float> s, dp;   // [Rbp][lpp] S -> P, dP -> dS
    AlignedBuf<E> dsa;         // [Rbp][lpp] dS as the A operand of dQ = dS K
    AlignedBuf<float> dqt;     // [Rbp][Dp]
    // phase B
    AlignedBuf<E> qT, oT;      // [Dr][Rbp], [Dvr][Rbp] transposed gathered rows (A operands)
    AlignedBuf<E> pB, dsB;     // [npb][Rbp][64] P and dS as B panels (reduction over rows)
    AlignedBuf<float> acc;     // [(D + Dv) lpp] dK^T, dV^T of a single-piece block
    detail::LineVector<float> row;    // a row being converted / stored
    detail::LineVector<uint8_t> keep; // [lpp] ones
    detail::LineVector<float> em, eil, edlt;  // per gathered row: m, 1 / l_sum, Dlt
    detail::LineVector<int32_t> vis;          // per gathered row: visible entries of its slot
    detail::LineVector<const E*> qrow, orow;  // phase A: per gathered row, its Q and dO row in the tile
    detail::LineVector<float*> srow, dprow;   // phase A: per gathered row, its S and dP rows
    detail::LineVector<const E*> dsrow;       // phase A: per gathered row, its dS row (A of dQ += dS K)
    detail::LineVector<float*> dqrow;         // phase A: per gathered row, its tile row's dQ accumulator
    AlignedBuf<E> stage;               // [lpp][max(Dr, Dvr)] key / value rows of a block being packed
    AlignedBuf<float> block_rows;      // [lpp][max(D, Dv)] dK or dV of a finished block, one key row each

    void init(const Backward& bw) {
      const Geo& g = bw.g_;
      const int64_t Ra = bw.ra_, Rc = std::max(bw.rbp_, round_up(Ra, 2));
      qa.reset(Ra * g.Dr);
      oa.reset(Ra * g.Dvr);
      dq.reset(Ra * g.Dp);
      m.resize(static_cast<size_t>(Ra));
      il.resize(static_cast<size_t>(Ra));
      dlt.resize(static_cast<size_t>(Ra));
      te.init(bw.bq_, g.K, g.max_blocks);
      asq.reset(Rc * g.Dr, true);
      aso.reset(Rc * g.Dvr, true);
      s.reset(Rc * g.lpp);
      dp.reset(Rc * g.lpp);
      dsa.reset(Rc * g.lpp);
      dqt.reset(Rc * g.Dp);
      qT.reset(g.Dr * bw.rbp_);
      oT.reset(g.Dvr * bw.rbp_);
      pB.reset(g.npb * bw.rbp_ * kPanel, true);
      dsB.reset(g.npb * bw.rbp_ * kPanel, true);
      acc.reset((g.D + g.Dv) * g.lpp);
      row.resize(static_cast<size_t>(std::max(g.Dp, 2 * g.Dvp) + g.lpp));
      keep.assign(static_cast<size_t>(g.lpp), 1);
      em.resize(static_cast<size_t>(Rc));
      eil.resize(static_cast<size_t>(Rc));
      edlt.resize(static_cast<size_t>(Rc));
      vis.resize(static_cast<size_t>(Rc));
      qrow.resize(static_cast<size_t>(Rc));
      orow.resize(static_cast<size_t>(Rc));
      srow.resize(static_cast<size_t>(Rc));
      dprow.resize(static_cast<size_t>(Rc));
      dsrow.resize(static_cast<size_t>(Rc));
      dqrow.resize(static_cast<size_t>(Rc));
      stage.reset(bw.stage_elems());
      block_rows.reset(g.lpp * std::max(g.D, g.Dv));
    }
  };

  const E* kq(int64_t slot) const { return packs_.get() + slot * g_.block_elems; }
  const E* vd(int64_t slot) const { return packs_.get() + slot * g_.block_elems + g_.kq; }
  const E* ktp(int64_t slot) const { return packs_.get() + slot * g_.block_elems + g_.kq + g_.vd; }

  // The inverted index: per (b, n2) and block x, the entries s K + j reaching it, rows ascending then slots.
  void invert() {
    const int64_t ids = bt_.n_ids;
    inv_start_.assign(static_cast<size_t>(ids + 1), 0);
    inv_vis_.assign(static_cast<size_t>(ids), 0.0);
    for_each_visible_slot(f_, g_, batches_, [&](int64_t b, int64_t, int64_t n2, int64_t, int64_t x, int64_t v) {
      const int64_t id = bt_.id(b, x, n2, g_.N2);
      ++inv_start_[static_cast<size_t>(id) + 1];
      inv_vis_[static_cast<size_t>(id)] += static_cast<double>(v);
    });
    for (int64_t i = 0; i < ids; ++i) inv_start_[static_cast<size_t>(i) + 1] += inv_start_[static_cast<size_t>(i)];
    inv_.resize(static_cast<size_t>(inv_start_[static_cast<size_t>(ids)]));
    std::vector<int64_t> pos(inv_start_.begin(), inv_start_.end() - 1);
    for_each_visible_slot(f_, g_, batches_, [&](int64_t b, int64_t s, int64_t n2, int64_t j, int64_t x, int64_t) {
      const int64_t id = bt_.id(b, x, n2, g_.N2);
      inv_[static_cast<size_t>(pos[static_cast<size_t>(id)]++)] = s * g_.K + j;
    });
  }

  // Pieces of every reached block: ceil(entries G / piece_rows) pieces of equal entry counts; piece_rows doubles
  // while the partials of multi-piece blocks exceed the budget (a function of the shape and the indices only).
  void plan_pieces() {
    const int64_t part = (g_.D + g_.Dv) * g_.lpp;
    int64_t piece_rows = piece_rows_;
    for (;;) {
      int64_t total = 0;
      for (int64_t id : bt_.packed_id) {
        const int64_t n = inv_start_[static_cast<size_t>(id) + 1] - inv_start_[static_cast<size_t>(id)];
        const int64_t np = (n * g_.G + piece_rows - 1) / piece_rows;
        if (np > 1) total += np * part;
      }
      if (total * static_cast<int64_t>(sizeof(float)) <= kPartialBudget) break;
      piece_rows *= 2;
    }
    parts_total_ = 0;
    for (int64_t id : bt_.packed_id) {
      const int64_t e0 = inv_start_[static_cast<size_t>(id)], n = inv_start_[static_cast<size_t>(id) + 1] - e0;
      const int64_t np = std::max<int64_t>(1, (n * g_.G + piece_rows - 1) / piece_rows);
      int64_t b, x, n2;
      decode(id, &b, &x, &n2);
      if (np > 1) multi_.push_back({static_cast<int64_t>(pieces_.size()), np});
      for (int64_t k = 0; k < np; ++k) {
        const int64_t a = e0 + n * k / np, z = e0 + n * (k + 1) / np;
        int64_t off = -1;
        if (np > 1) {
          off = parts_total_;
          parts_total_ += part;
        }
        pieces_.push_back({b, x, n2, a, z, off, inv_vis_[static_cast<size_t>(id)] * static_cast<double>(z - a) / std::max<int64_t>(n, 1)});
      }
    }
  }

  // The row statistics of rows [t0, t1), every head: m, 1 / l_sum, and Dlt = dO . O (fp32, 8 interleaved partial
  // sums then a fixed tree).
  void compute_row_stats(int64_t t0, int64_t t1, Scratch& sc) {
    const int64_t Dv = g_.Dv;
    float* a = sc.row.data();
    float* o = sc.row.data() + Dv;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < g_.N1; ++h) {
        load_f32_row(p_.grad, t, h, Dv, a);
        load_f32_row(p_.attention_out, t, h, Dv, o);
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= Dv; i += 8)
          for (int k = 0; k < 8; ++k) part[k] += a[i + k] * o[i + k];
        for (int k = 0; i < Dv; ++i, ++k) part[k] += a[i] * o[i];
        RowStats& st = stats_[static_cast<size_t>(t * g_.N1 + h)];
        st.m = load_stat(p_.softmax_max, t, h);
        st.il = 1.0f / load_stat(p_.softmax_sum, t, h);
        st.dlt = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      }
  }

  void load_f32_row(const Tensor3& x, int64_t t, int64_t h, int64_t n, float* out) const {
    cpu::load_row_f32(kt_, x.data, t * x.stride[0] + h * x.stride[1], x.stride[2], n, f_.dtype, out);
  }

  // Stores alpha x[0..n) rounded with rha_T at element offset `off` of a contiguous gradient.
  void store_rha_row(const float* x, int64_t n, float alpha, void* base, int64_t off) const {
    const int64_t es = static_cast<int64_t>(dtype_size(f_.dtype));
    sk_->store_rha(x, n, alpha, static_cast<char*>(base) + off * es, f_.dtype);
  }

  // Key/value rows no entry reaches: at or past the last prefix sum, and the valid rows of unreached blocks.
  void zero_unreached() const {
    const size_t es = dtype_size(f_.dtype);
    char* gk = static_cast<char*>(p_.grad_key);
    char* gv = static_cast<char*>(p_.grad_value);
    const int64_t N2 = g_.N2, D = g_.D, Dv = g_.Dv;
    auto zero_rows = [&](int64_t r0, int64_t r1, int64_t n2) {  // rows [r0, r1) of KV head n2 (all heads: n2 < 0)
      for (int64_t r = r0; r < r1; ++r) {
        if (n2 < 0) {
          std::memset(gk + r * N2 * D * static_cast<int64_t>(es), 0, es * static_cast<size_t>(N2 * D));
          std::memset(gv + r * N2 * Dv * static_cast<int64_t>(es), 0, es * static_cast<size_t>(N2 * Dv));
        } else {
          std::memset(gk + (r * N2 + n2) * D * static_cast<int64_t>(es), 0, es * static_cast<size_t>(D));
          std::memset(gv + (r * N2 + n2) * Dv * static_cast<int64_t>(es), 0, es * static_cast<size_t>(Dv));
        }
      }
    };
    zero_rows(g_.kv_end, g_.T2, -1);
    for (size_t b = 0; b < batches_.size(); ++b) {
      const BatchInfo& bi = batches_[b];
      for (int64_t x = 0; x < bi.blocks; ++x)
        for (int64_t n2 = 0; n2 < N2; ++n2) {
          if (bt_.slot[static_cast<size_t>(bt_.id(static_cast<int64_t>(b), x, n2, N2))] >= 0) continue;
          const int64_t r0 = bi.k_begin + x * g_.block;
          zero_rows(r0, r0 + std::min(g_.block, bi.skv - x * g_.block), n2);
        }
    }
  }

  // P and dS of `rows` gathered rows whose S (scaled) and dP are in sc.s / sc.dp, row r visible on [0, vis[r]):
  // s <- P, dp <- dS on the visible prefix, exactly 0 beyond it.
  void softmax_grad(Scratch& sc, int64_t rows, const float* m, const float* il, const float* dlt, const int32_t* vis) const {
    const int64_t lpp = g_.lpp;
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = sc.s.get() + r * lpp;
      float* dr = sc.dp.get() + r * lpp;
      kt_->grad.softmax_grad_row(sr, dr, sc.keep.data(), lpp, m[r], il[r], dlt[r]);
      const int64_t v = vis[r];
      std::fill(sr + v, sr + lpp, 0.0f);
      std::fill(dr + v, dr + lpp, 0.0f);
    }
  }

  // ------------------------------------------------------------------ phase A: query tile -> dQ
  void run_tile(Scratch& sc, int64_t b, int64_t n2, int64_t s0, int64_t s1) const {
    const BatchInfo& bi = batches_[static_cast<size_t>(b)];
    const int64_t G = g_.G, K = g_.K, lpp = g_.lpp, ntok = s1 - s0, R = ntok * G;
    TileEntries& te = sc.te;
    te.build(f_, bi, n2, s0, ntok, K, g_.block);
    std::fill_n(sc.dq.get(), R * g_.Dp, 0.0f);
    if (te.n_entries > 0) {
      for (int64_t i = 0; i < ntok; ++i) {
        const int64_t t = bi.q_begin + s0 + i;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g, h = n2 * G + g;
          load_operand_row<kPairs>(kt_, f_.query, f_.dtype, t, h, g_.D, g_.Dr, sc.qa.get() + r * g_.Dr);
          load_operand_row<kPairs>(kt_, p_.grad, f_.dtype, t, h, g_.Dv, g_.Dvr, sc.oa.get() + r * g_.Dvr);
          const RowStats& st = stats_[static_cast<size_t>(t * g_.N1 + h)];
          sc.m[static_cast<size_t>(r)] = st.m;
          sc.il[static_cast<size_t>(r)] = st.il;
          sc.dlt[static_cast<size_t>(r)] = st.dlt;
        }
      }
    }
    auto& vis = sc.vis;
    auto& cm = sc.em;  // per gathered row of a chunk: its tile row's m, 1 / l_sum, Dlt
    auto& cil = sc.eil;
    auto& cdlt = sc.edlt;
    for_each_entry_chunk(
        te, bt_, g_, bi, b, n2, bt_.dirty_k, bq_,
        [&](const UnionBlock& ub, int32_t ij) { scalar_dq(sc, bi, n2, s0, ub.x, ij); },
        [&](const UnionBlock& ub, const int32_t* ids, int64_t n) {
          if (direct_) {  // each entry's G rows are contiguous in the tile: its GEMMs on them in place
            for (int64_t e = 0; e < n; ++e) {
              const int64_t i = ids[e] / K;
              std::fill_n(vis.data(), G, te.vis[static_cast<size_t>(ids[e])]);
              P::gemm(kt_, sc.qa.get() + i * G * g_.Dr, g_.Dr, G, kq(ub.slot), g_.Dr * kPanel, 0, lpp, g_.Dr,
                      sc.s.get(), lpp, scale_, false);
              P::gemm(kt_, sc.oa.get() + i * G * g_.Dvr, g_.Dvr, G, vd(ub.slot), g_.Dvr * kPanel, 0, lpp, g_.Dvr,
                      sc.dp.get(), lpp, 1.0f, false);
              softmax_grad(sc, G, sc.m.data() + i * G, sc.il.data() + i * G, sc.dlt.data() + i * G, vis.data());
              P::gemm(kt_, ds_rows(sc, G), lpp, G, ktp(ub.slot), lpp * kPanel, 0, g_.Dp, lpp,
                      sc.dq.get() + i * G * g_.Dp, g_.Dp, 1.0f, true);
            }
            return;
          }
          // the entries' Q and dO rows read in place from the tile
          for (int64_t e = 0; e < n; ++e) {
            const int64_t i = ids[e] / K;
            for (int64_t g = 0; g < G; ++g) {
              const size_t r = static_cast<size_t>(e * G + g), ri = static_cast<size_t>(i * G + g);
              sc.qrow[r] = sc.qa.get() + ri * static_cast<size_t>(g_.Dr);
              sc.orow[r] = sc.oa.get() + ri * static_cast<size_t>(g_.Dvr);
              sc.srow[r] = sc.s.get() + r * static_cast<size_t>(lpp);
              sc.dprow[r] = sc.dp.get() + r * static_cast<size_t>(lpp);
              vis[r] = te.vis[static_cast<size_t>(ids[e])];
              cm[r] = sc.m[ri];
              cil[r] = sc.il[ri];
              cdlt[r] = sc.dlt[ri];
            }
          }
          const int64_t rows = n * G;
          P::gemm_gather(kt_, sc.qrow.data(), rows, kq(ub.slot), g_.Dr * kPanel, 0, lpp, g_.Dr, sc.srow.data(), scale_,
                         false);
          P::gemm_gather(kt_, sc.orow.data(), rows, vd(ub.slot), g_.Dvr * kPanel, 0, lpp, g_.Dvr, sc.dprow.data(),
                         1.0f, false);
          softmax_grad(sc, rows, cm.data(), cil.data(), cdlt.data(), vis.data());
          // dQ += dS K straight into the rows' accumulators (dq + products, as the row addition would), unless a row
          // takes two entries of the chunk (duplicate indices, adjacent): then into dqt and added entry by entry
          const bool repeated = has_repeated_row(ids, n, K);
          const E* ds = ds_rows(sc, rows);
          if (!repeated) {
            for (int64_t e = 0; e < n; ++e) {
              const int64_t i = ids[e] / K;
              for (int64_t g = 0; g < G; ++g) {
                sc.dsrow[static_cast<size_t>(e * G + g)] = ds + (e * G + g) * lpp;
                sc.dqrow[static_cast<size_t>(e * G + g)] = sc.dq.get() + (i * G + g) * g_.Dp;
              }
            }
            P::gemm_gather(kt_, sc.dsrow.data(), rows, ktp(ub.slot), lpp * kPanel, 0, g_.Dp, lpp, sc.dqrow.data(),
                           1.0f, true);
            return;
          }
          P::gemm(kt_, ds, lpp, rows, ktp(ub.slot), lpp * kPanel, 0, g_.Dp, lpp, sc.dqt.get(), g_.Dp, 1.0f, false);
          for (int64_t e = 0; e < n; ++e) {
            const int64_t i = ids[e] / K;
            for (int64_t g = 0; g < G; ++g)
              kt_->rows.add_row(sc.dq.get() + (i * G + g) * g_.Dp, sc.dqt.get() + (e * G + g) * g_.Dp, g_.Dp);
          }
        });
    for (int64_t i = 0; i < ntok; ++i) {
      const int64_t t = bi.q_begin + s0 + i;
      for (int64_t g = 0; g < G; ++g) {
        store_rha_row(sc.dq.get() + (i * G + g) * g_.Dp, g_.D, scale_, p_.grad_query, (t * g_.N1 + n2 * G + g) * g_.D);
      }
    }
  }

  // The dS rows in sc.dp as the A operand of dQ = dS K: rha_T bf16 bits (in sc.dsa) on the pairs path, the fp32
  // values themselves otherwise.
  const E* ds_rows(Scratch& sc, int64_t rows) const {
    if constexpr (kPairs) {
      sk_->store_rha(sc.dp.get(), rows * g_.lpp, 1.0f, sc.dsa.get(), DType::kBF16);
      return sc.dsa.get();
    } else {
      return sc.dp.get();
    }
  }

  // P or dS as a GEMM operand: rha_T bf16 bits on the pairs path, fp32 (unrounded) otherwise.
  static E ds_operand(float x) {
    if constexpr (kPairs) {
      return select_detail::f32_to_bf16_rha(x);
    } else {
      return x;
    }
  }

  // Entry ij of the tile (rows s0 + i) on a key block holding inf / NaN, seen in part: its dQ contribution from
  // the visible keys only, computed directly from the tensors (fp32, as the reference).
  void scalar_dq(Scratch& sc, const BatchInfo& bi, int64_t n2, int64_t s0, int64_t x, int32_t ij) const {
    const int64_t K = g_.K, i = ij / K, v = sc.te.vis[static_cast<size_t>(ij)], t = bi.q_begin + s0 + i;
    const DType dt = f_.dtype;
    auto ld = [dt](const Tensor3& a, int64_t r, int64_t h, int64_t k) {
      return detail::load_f32(a.data, r * a.stride[0] + h * a.stride[1] + k * a.stride[2], dt);
    };
    for (int64_t g = 0; g < g_.G; ++g) {
      const int64_t r = i * g_.G + g, h = n2 * g_.G + g;
      float* dq = sc.dq.get() + r * g_.Dp;
      for (int64_t c = 0; c < v; ++c) {
        const int64_t key = bi.k_begin + x * g_.block + c;
        float dot = 0, dp = 0;
        for (int64_t d = 0; d < g_.D; ++d) dot += ld(f_.query, t, h, d) * ld(f_.key, key, n2, d);
        for (int64_t e = 0; e < g_.Dv; ++e) dp += ld(p_.grad, t, h, e) * ld(f_.value, key, n2, e);
        const float pr = std::exp(dot * scale_ - sc.m[static_cast<size_t>(r)]) * sc.il[static_cast<size_t>(r)];
        const float ds = P::value(ds_operand(pr * (dp - sc.dlt[static_cast<size_t>(r)])));
        for (int64_t d = 0; d < g_.D; ++d) dq[d] += ds * ld(f_.key, key, n2, d);
      }
    }
  }

  // ------------------------------------------------------------------ phase B: key block -> dK, dV
  void run_piece(Scratch& sc, const Piece& pc) const {
    const BatchInfo& bi = batches_[static_cast<size_t>(pc.b)];
    const int64_t G = g_.G, K = g_.K, lpp = g_.lpp, D = g_.D, Dv = g_.Dv;
    const int64_t slot = bt_.slot[static_cast<size_t>(bt_.id(pc.b, pc.x, pc.n2, g_.N2))];
    float* acc = pc.part >= 0 ? parts_.get() + pc.part : sc.acc.get();
    float* dkT = acc;            // [D][lpp]
    float* dvT = acc + D * lpp;  // [Dv][lpp]
    std::fill_n(acc, (D + Dv) * lpp, 0.0f);
    auto& vis = sc.vis;
    for (int64_t c0 = pc.e0; c0 < pc.e1; c0 += bc_) {
      const int64_t nc = std::min(bc_, pc.e1 - c0), rows = nc * G, rp = round_up(rows, 2);
      for (int64_t e = 0; e < nc; ++e) {
        const int64_t sj = inv_[static_cast<size_t>(c0 + e)], s = sj / K, j = sj % K, t = bi.q_begin + s;
        const int32_t v = static_cast<int32_t>(select_detail::visible_count(pc.x, s, bi.skv, g_.block, f_.causal));
        (void)j;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = e * G + g, h = pc.n2 * G + g;
          load_operand_row<kPairs>(kt_, f_.query, f_.dtype, t, h, D, g_.Dr, sc.asq.get() + r * g_.Dr);
          load_operand_row<kPairs>(kt_, p_.grad, f_.dtype, t, h, Dv, g_.Dvr, sc.aso.get() + r * g_.Dvr);
          const RowStats& st = stats_[static_cast<size_t>(t * g_.N1 + h)];
          sc.em[static_cast<size_t>(r)] = st.m;
          sc.eil[static_cast<size_t>(r)] = st.il;
          sc.edlt[static_cast<size_t>(r)] = st.dlt;
          vis[static_cast<size_t>(r)] = v;
        }
      }
      // the next chunk's query and dO rows (they come from memory: each row is read once per block that selected
      // it), requested now so that they arrive while this chunk computes
      if (c0 + bc_ < pc.e1)
        for (int64_t e = c0 + bc_; e < std::min(pc.e1, c0 + 2 * bc_); ++e) {
          const int64_t t = bi.q_begin + inv_[static_cast<size_t>(e)] / K;
          prefetch_rows(f_.query, t, pc.n2 * G, G, D);
          prefetch_rows(p_.grad, t, pc.n2 * G, G, Dv);
        }
      if (rp > rows) {  // the zero partner row of the pair layouts
        std::fill_n(sc.asq.get() + rows * g_.Dr, g_.Dr, E(0));
        std::fill_n(sc.aso.get() + rows * g_.Dvr, g_.Dvr, E(0));
      }
      P::gemm(kt_, sc.asq.get(), g_.Dr, rows, kq(slot), g_.Dr * kPanel, 0, lpp, g_.Dr, sc.s.get(), lpp, scale_, false);
      P::gemm(kt_, sc.aso.get(), g_.Dvr, rows, vd(slot), g_.Dvr * kPanel, 0, lpp, g_.Dvr, sc.dp.get(), lpp, 1.0f, false);
      softmax_grad(sc, rows, sc.em.data(), sc.eil.data(), sc.edlt.data(), vis.data());
      // P and dS as B panels over the chunk's rows: element (row r, key c) at (c / 64) rp 64 + (r / U) 64 U +
      // (c % 64) U + r % U, rounded with rha_T on the pairs path
      const int64_t red = kPairs ? rp : rows;
      for (int64_t c0 = 0; c0 < lpp; c0 += kPanel) {
        const int64_t w = std::min(kPanel, lpp - c0);
        E* pb = sc.pB.get() + (c0 / kPanel) * red * kPanel;
        E* db = sc.dsB.get() + (c0 / kPanel) * red * kPanel;
        for (int64_t r = 0; r < rows; r += P::U) {
          const float* s0 = sc.s.get() + r * lpp + c0;
          const float* d0 = sc.dp.get() + r * lpp + c0;
          if constexpr (kPairs) {
            const bool pair = r + 1 < rows;
            sk_->pack_pairs_rha(s0, pair ? s0 + lpp : nullptr, w, pb + r * kPanel);
            sk_->pack_pairs_rha(d0, pair ? d0 + lpp : nullptr, w, db + r * kPanel);
          } else {
            std::memcpy(pb + r * kPanel, s0, sizeof(float) * static_cast<size_t>(w));
            std::memcpy(db + r * kPanel, d0, sizeof(float) * static_cast<size_t>(w));
          }
        }
      }
      // Q^T and dO^T: A operands whose reduction runs over the chunk's rows
      if constexpr (kPairs) {
        kt_->grad.transpose_u16(sc.asq.get(), g_.Dr, rp, D, sc.qT.get(), rp);
        kt_->grad.transpose_u16(sc.aso.get(), g_.Dvr, rp, Dv, sc.oT.get(), rp);
      } else {
        kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(sc.asq.get()), g_.Dr, rows, D,
                                reinterpret_cast<uint32_t*>(sc.qT.get()), rows);
        kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(sc.aso.get()), g_.Dvr, rows, Dv,
                                reinterpret_cast<uint32_t*>(sc.oT.get()), rows);
      }
      P::gemm(kt_, sc.oT.get(), red, Dv, sc.pB.get(), red * kPanel, 0, lpp, red, dvT, lpp, 1.0f, true);
      P::gemm(kt_, sc.qT.get(), red, D, sc.dsB.get(), red * kPanel, 0, lpp, red, dkT, lpp, 1.0f, true);
    }
    if (pc.part < 0) finish_block(sc, pc.b, pc.x, pc.n2, dkT, dvT);
  }

  // Prefetches heads [h0, h0 + n) of row t of a tensor (n elements each; unit element stride only).
  void prefetch_rows(const Tensor3& x, int64_t t, int64_t h0, int64_t n, int64_t len) const {
    if (x.stride[2] != 1) return;
    const int64_t es = static_cast<int64_t>(dtype_size(f_.dtype));
    const char* base = static_cast<const char*>(x.data);
    for (int64_t h = h0; h < h0 + n; ++h) {
      const char* row = base + (t * x.stride[0] + h * x.stride[1]) * es;
      for (int64_t o = 0; o < len * es; o += 64) __builtin_prefetch(row + o, 0, 1);
    }
  }

  // Writes the valid key rows of block x of (b, n2): dK = scale dK^T^T, dV = dV^T^T, rounded with rha_T.
  void finish_block(Scratch& sc, int64_t b, int64_t x, int64_t n2, const float* dkT, const float* dvT) const {
    const BatchInfo& bi = batches_[static_cast<size_t>(b)];
    const int64_t lpp = g_.lpp, valid = std::min(g_.block, bi.skv - x * g_.block);
    const int64_t key0 = bi.k_begin + x * g_.block;
    float* rows = sc.block_rows.get();
    kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(dkT), lpp, g_.D, valid, reinterpret_cast<uint32_t*>(rows),
                            g_.D);
    for (int64_t c = 0; c < valid; ++c)
      store_rha_row(rows + c * g_.D, g_.D, scale_, p_.grad_key, ((key0 + c) * g_.N2 + n2) * g_.D);
    kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(dvT), lpp, g_.Dv, valid,
                            reinterpret_cast<uint32_t*>(rows), g_.Dv);
    for (int64_t c = 0; c < valid; ++c)
      store_rha_row(rows + c * g_.Dv, g_.Dv, 1.0f, p_.grad_value, ((key0 + c) * g_.N2 + n2) * g_.Dv);
  }

  const SelectAttentionGradParams& p_;
  const SelectAttentionParams& f_;
  int64_t bq_ = 1, ra_ = 1;         // phase A: query rows and GEMM rows of a tile
  int64_t bc_ = 1, rb_ = 1, rbp_ = 2;  // phase B: entries, GEMM rows (and rounded to even) of a chunk
  int64_t piece_rows_ = kPieceRows;
  AlignedBuf<E> packs_;
  std::vector<int64_t> inv_start_, inv_;  // inverted index: per id, entries s K + j
  std::vector<double> inv_vis_;           // per id: visible entries (cost)
  std::vector<Piece> pieces_;
  std::vector<Multi> multi_;
  AlignedBuf<float> parts_;
  int64_t parts_total_ = 0;
  // per (query row t, head h) at t N1 + h: m = softmax_max, il = 1 / softmax_sum, dlt = Dlt; gathered rows read
  // them from here instead of the strided statistics tensors
  struct RowStats {
    float m, il, dlt;
  };
  std::vector<RowStats> stats_;
};

}  // namespace

Status backward(const SelectAttentionGradParams& p, const CpuOptions& options, const Tuning& tuning) {
  return run_entry<Backward>("select_attention_backward_cpu",
                             "packed key/value blocks, the inverted index, partials and per-thread tiles",
                             validate_select_attention_backward, select_reference::backward_fp64, p, options,
                             tuning);
}

}  // namespace nsa::select_cpu
