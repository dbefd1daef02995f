// Optimized CPU backward of docs/spec/window_attention.md §7: deterministic without atomics, work proportional to
// the band, per-thread memory bounded by the tile sizes.
//
// Query tiles are those of the forward (Bq tokens x G heads = R rows, cpu.h); key tiles are 64 keys on a grid of
// batch-local multiples of 64. For a pair (query tile i, key tile j) whose spans meet, on the 16-column window
// [w0, w1) of the key tile that holds every visible entry of the tile's rows:
//   S  = Q_i K_j^T * scale,  P = exp(S - m) / l from the saved statistics (0 where invisible),
//   dP = dO_i V_j^T,  dS = P (dP - Dlt),  Dlt = rowsum(dO * O) with O = attention_in.
// Two kinds of tasks, each the only writer of its outputs, so no partial sums cross tasks:
//   dK/dV tasks (batch, KV head, strip of key tiles): for every query tile whose span meets the strip, in
//     ascending order, the pairs with the strip's key tiles: dV_j^T += dO_i^T P, dK_j^T += Q_i^T dS (gathered per
//     key tile); then dK = scale dK^T, dV = dV^T + the share of rows without a visible key (§7), written.
//     A query tile whose whole span lies inside the strip ("owned" by it) also gets dQ_i += dS K_j there, key tiles
//     ascending, and its dQ is written by this task.
//   dQ tasks (batch, KV head, strip of query tiles), for the tiles no dK/dV task owns: over the strip's keys in
//     chunks of chunk_keys (packed once per chunk), the pairs of its tiles with the chunk's key tiles, ascending:
//     dQ_i += dS K_j; then dQ = scale dQ, written. Rows without a visible key keep dQ = 0.
// S, P, dP and dS of a pair are computed twice only for tiles that straddle two key strips (the price of having no
// cross-task reduction; with 2048-key strips and a 512-key band, about a quarter of the tiles). Every output
// element is a sum in a fixed order (query tiles ascending for dK/dV, key tiles ascending for dQ) of per-pair
// products that depend on the two tiles only: results are bitwise identical for any strip size and thread count.
//
// Products are GEMM calls of the per-ISA KernelTable with the B operand in its packed panel layout:
//   bf16 pairs (bf16 inputs on an ISA with a bf16 dot product): P and dS rounded to bf16 (nearest even) before the
//     products that use them (§7 allows it); every sum stays fp32. Operands: Q and dO rows (pairs along D / Dv),
//     Q^T and dO^T (pairs along the tile's rows), P and dS as B panels with pairs along rows, dS rows (pairs along
//     keys), and per key tile K with pairs along D (for S), V with pairs along Dv (for dP), K with pairs along
//     keys (for dQ).
//   fp32 (everything else but fp64): fp32 operands, P and dS unrounded.
// fp64 inputs (a testing extension) run the reference. dq, dk and dv are rounded with rha_T (§7).
#include <array>
#include <cfloat>
#include <cmath>
#include <new>
#include <stdexcept>
#include <string>

#include "common/aligned_buffer.h"
#include "common/numeric.h"
#include "common/row_helpers.h"
#include "common/threads.h"
#include "cpu/kernels.h"
#include "cpu/row_load.h"
#include "ops/window_attention/cpu.h"
#include "ops/window_attention/cpu_common.h"
#include "ops/window_attention/reference.h"
#include "ops/window_attention/rounding.h"

namespace nsa::window_cpu {
namespace {

using cpu::KernelTable;
using window_detail::WBatch;
using detail::Carver;
using detail::dot_fixed;
using detail::load_bits_row;

constexpr int64_t kBc = 64;    // keys of a key tile (= one B panel)
constexpr int64_t kPan = cpu::kPanel;
static_assert(kBc == kPan, "a key tile is one panel");

// Per-worker workspace (zeroed once: padding rows and columns are read as zeros).
struct Scratch {
  AlignedBuf<char> buf;
  // query tile: fp32 path Q rows qa [R][D], Q^T qT [D][R], dO rows oa [R][Dv], dO^T oT [Dv][R];
  // bf16 path qb [Rp][2Dh], qTb [D][Rp], ob [Rp][2Dvh], oTb [Dv][Rp]
  float *qa = nullptr, *qT = nullptr, *oa = nullptr, *oT = nullptr;
  uint16_t *qb = nullptr, *qTb = nullptr, *ob = nullptr, *oTb = nullptr;
  // pair: s (S, then P) and dp (dP, then dS) [Rp][64], keep [Rp][64]; bf16: pB, dsB [Rp/2][64][2], dsA [R][64],
  // pair_tmp [64][2]
  float *s = nullptr, *dp = nullptr;
  uint8_t* keep = nullptr;
  uint16_t *pB = nullptr, *dsB = nullptr, *dsA = nullptr, *pair_tmp = nullptr;
  float *rm = nullptr, *ril = nullptr, *rdlt = nullptr, *ra = nullptr, *rb = nullptr;
  float *krows = nullptr, *vrows = nullptr;  // [64][D], [64][Dv]: a key tile's rows being packed
  // packed key tiles of a task, dK^T/dV^T accumulators of a key strip, dQ accumulators of a query strip
  void* slots = nullptr;
  float* kv_acc = nullptr;
  float* dq = nullptr;
  float* dq_tile = nullptr;  // [R][Dp]: dQ of an owned tile in a dK/dV task
  std::vector<RowInfo> info;
};

struct QStrip {
  size_t t0 = 0, t1 = 0;    // query tiles
  int64_t rows = 0;
  int64_t jlo = 0, jhi = 0;  // key tiles the strip's spans reach
};

struct KStrip {
  int64_t b = 0, j0 = 0, j1 = 0;  // key tiles [j0, j1) of batch b
  std::vector<size_t> tiles;      // query tiles whose span meets the strip, ascending
};

struct Task {
  bool key_task;
  size_t strip;
  int64_t n2;
  double cost;
};

class Backward : CallState {
 public:
  Backward(const WindowAttentionGradParams& g, const WindowAttentionShape& sh, const KernelTable* kt, int threads,
           const Tuning& tu)
      : CallState(g.fwd, sh, kt, threads, tu), g_(g) {
    dot_ = p_.dtype == DType::kBF16 && kt->gemm.bf16 != nullptr && kt->grad.pack_rows_bf16 != nullptr;
    G_ = sh.G;
    Bq_ = std::max<int64_t>(1, tu.tile_rows / G_);
    R_ = Bq_ * G_;
    Rp_ = round_up(R_, 2);
    D_ = sh.D;
    Dv_ = sh.Dv;
    Dh_ = (D_ + 1) / 2;
    Dvh_ = (Dv_ + 1) / 2;
    nDp_ = (D_ + kPan - 1) / kPan;
    Dp_ = nDp_ * kPan;
    ktile_ = dot_ ? (Dh_ + Dvh_) * 2 * kBc + nDp_ * kBc * kPan : (D_ + Dv_) * kBc + nDp_ * kBc * kPan;
    const int64_t esz = dot_ ? 2 : 4;
    chunk_ = tu.chunk_keys > 0 ? round_up(tu.chunk_keys, kBc) : default_chunk_keys(D_, Dv_, esz);
    strip_keys_ = std::max<int64_t>(kBc, round_up(tu.strip_keys, kBc));
    scale_ = static_cast<float>(p_.scale);
  }

  void run() {
    tiles_ = plan_tiles(p_, sh_, batches_, vis_, Bq_, threads_);
    plan();
    // Share of rows without a visible key (§7, inner_precise 0/1): u = sum over those rows and heads of
    // dy / Skv_b, per (batch, KV head), added to every dV row of the batch.
    const std::vector<int64_t> need =
        pairs_with_invisible_rows(tiles_, batches_.size(), sh_.N2, Dv_, p_.inner_precise, share_);
    std::vector<Task> tasks;
    for (size_t s = 0; s < kstrips_.size(); ++s)
      for (int64_t n2 = 0; n2 < sh_.N2; ++n2) tasks.push_back({true, s, n2, kcost_[s]});
    for (size_t s = 0; s < qstrips_.size(); ++s)
      for (int64_t n2 = 0; n2 < sh_.N2; ++n2) tasks.push_back({false, s, n2, qcost_[s]});
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
    const int workers =
        static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_, static_cast<int64_t>(tasks.size()))));
    std::vector<Scratch> scratch(static_cast<size_t>(workers));
    for (Scratch& sc : scratch) init_scratch(sc);  // before any output is written (bad_alloc -> error)

    cpu::parallel_for(static_cast<int64_t>(need.size()), threads_,
                      [&](int64_t x, int) { compute_share(need[static_cast<size_t>(x)]); });
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t x, int w) {
      const Task& tk = tasks[static_cast<size_t>(x)];
      Scratch& sc = scratch[static_cast<size_t>(w)];
      if (tk.key_task) run_key_strip(kstrips_[tk.strip], tk.n2, sc);
      else run_query_strip(qstrips_[tk.strip], tk.n2, sc);
    });
    // Key/value rows past max(actual_seq_kvlen) get zero gradient (§3). (+0 is all-zero bits in every dtype.)
    int64_t k_end = 0;
    for (const WBatch& bi : batches_) k_end = std::max(k_end, bi.k0 + bi.skv);
    const size_t esz = dtype_size(p_.dtype);
    std::memset(static_cast<char*>(g_.grad_key) + k_end * sh_.N2 * D_ * static_cast<int64_t>(esz), 0,
                static_cast<size_t>((sh_.T2 - k_end) * sh_.N2 * D_) * esz);
    std::memset(static_cast<char*>(g_.grad_value) + k_end * sh_.N2 * Dv_ * static_cast<int64_t>(esz), 0,
                static_cast<size_t>((sh_.T2 - k_end) * sh_.N2 * Dv_) * esz);
  }

 private:
  // ---------------------------------------------------------------- plan
  void plan() {
    // dK/dV strips: strip_keys keys of every batch with keys (fewer where the shape would give under 2 tasks per
    // thread; strips never change a result); the query tiles meeting each, ascending.
    int64_t keys = 0;
    for (const WBatch& bi : batches_) keys += bi.skv;
    const int64_t target = round_up(keys * sh_.N2 / std::max<int64_t>(1, 2 * static_cast<int64_t>(threads_)), kBc);
    strip_keys_ = std::clamp<int64_t>(target, std::min<int64_t>(512, strip_keys_), strip_keys_);
    size_t tb = 0;  // first tile of batch b
    batch_tiles_.assign(batches_.size() + 1, 0);
    for (size_t b = 0; b < batches_.size(); ++b) {
      size_t te = tb;
      while (te < tiles_.size() && tiles_[te].b == static_cast<int64_t>(b)) ++te;
      batch_tiles_[b] = tb;
      batch_tiles_[b + 1] = te;
      const int64_t nk = (batches_[b].skv + kBc - 1) / kBc, per = strip_keys_ / kBc;
      const size_t first = kstrips_.size();
      for (int64_t j0 = 0; j0 < nk; j0 += per) {
        KStrip ks;
        ks.b = static_cast<int64_t>(b);
        ks.j0 = j0;
        ks.j1 = std::min(nk, j0 + per);
        kstrips_.push_back(std::move(ks));
      }
      for (size_t x = tb; x < te; ++x) {
        const Tile& t = tiles_[x];
        if (t.hi <= t.lo) continue;
        const int64_t a = t.lo / kBc / per, e = (t.hi - 1) / kBc / per;  // strips met
        for (int64_t k = a; k <= e; ++k) kstrips_[first + static_cast<size_t>(k)].tiles.push_back(x);
      }
      tb = te;
    }
    // A tile whose whole span lies in one dK/dV strip is "owned" by it: that task also accumulates its dQ (the same
    // products in the same order as a dQ task would: the result does not depend on who computes it), so dQ tasks
    // skip it and the pairs' S, P, dP, dS are computed once instead of twice.
    owned_.assign(tiles_.size(), 0);
    for (const KStrip& ks : kstrips_)
      for (size_t x : ks.tiles)
        if (tiles_[x].lo >= ks.j0 * kBc && tiles_[x].hi <= ks.j1 * kBc) owned_[x] = 1;
    for (const KStrip& ks : kstrips_) {
      double cost = static_cast<double>(ks.j1 - ks.j0) * kBc * (D_ + Dv_);
      for (size_t x : ks.tiles) {
        const Tile& t = tiles_[x];
        const int64_t a = std::max(t.lo, ks.j0 * kBc), e = std::min(t.hi, ks.j1 * kBc);
        cost += static_cast<double>((t.s1 - t.s0) * G_) * static_cast<double>(std::max<int64_t>(0, e - a)) *
                (owned_[x] ? 3 * D_ + 2 * Dv_ : 2 * D_ + 2 * Dv_);
      }
      kcost_.push_back(cost);
    }
    // dQ strips: runs of consecutive tiles of a batch that no dK/dV task owns (the tiles whose band straddles two
    // key strips), at most st tokens and strip_rows rows (their dQ accumulators) each.
    int64_t st = sh_.T1 * sh_.N2 / std::max<int64_t>(1, 4 * static_cast<int64_t>(threads_));
    st = std::clamp<int64_t>(round_down(st, Bq_), Bq_, std::max(Bq_, tu_.strip_tokens));
    max_qrows_ = R_;
    for (size_t i = 0; i < tiles_.size();) {
      if (owned_[i]) {
        ++i;
        continue;
      }
      QStrip s;
      s.t0 = i;
      int64_t tokens = 0;
      s.jlo = INT64_MAX;
      s.jhi = INT64_MIN;
      double cost = 0;
      size_t j = i;
      for (; j < tiles_.size() && tiles_[j].b == tiles_[i].b && !owned_[j]; ++j) {
        const Tile& t = tiles_[j];
        const int64_t tk = t.s1 - t.s0;
        if (j > i && (tokens + tk > st || s.rows + tk * G_ > std::max(R_, tu_.strip_rows))) break;
        tokens += tk;
        s.rows += tk * G_;
        if (t.hi > t.lo) {
          s.jlo = std::min(s.jlo, t.lo / kBc);
          s.jhi = std::max(s.jhi, (t.hi + kBc - 1) / kBc);
        }
        cost += static_cast<double>(tk * G_) * (static_cast<double>(std::max<int64_t>(0, t.hi - t.lo)) * (2 * D_ + Dv_) + D_);
      }
      s.t1 = j;
      i = j;
      if (s.jhi < s.jlo) s.jlo = s.jhi = 0;
      qcost_.push_back(cost);
      max_qrows_ = std::max(max_qrows_, s.rows);
      qstrips_.push_back(s);
    }
    // packed key tiles a task holds at once: a dK/dV strip, or a dQ strip's keys up to chunk_keys
    slot_tiles_ = 1;
    for (const KStrip& ks : kstrips_) slot_tiles_ = std::max(slot_tiles_, ks.j1 - ks.j0);
    for (const QStrip& qs : qstrips_) slot_tiles_ = std::max(slot_tiles_, std::min(chunk_ / kBc, qs.jhi - qs.jlo));
  }

  void carve(Carver& c, Scratch& x) const {
    const int64_t R = R_, Rp = Rp_;
    if (dot_) {
      c.take(&x.qb, Rp * 2 * Dh_);
      c.take(&x.qTb, D_ * Rp);
      c.take(&x.ob, Rp * 2 * Dvh_);
      c.take(&x.oTb, Dv_ * Rp);
      c.take(&x.pB, Rp * kBc);
      c.take(&x.dsB, Rp * kBc);
      c.take(&x.dsA, R * kBc);
      c.take(&x.pair_tmp, 2 * kBc);
    } else {
      c.take(&x.qa, R * D_);
      c.take(&x.qT, D_ * R);
      c.take(&x.oa, R * Dv_);
      c.take(&x.oT, Dv_ * R);
    }
    c.take(&x.s, Rp * kBc);
    c.take(&x.dp, Rp * kBc);
    c.take(&x.keep, Rp * kBc);
    c.take(&x.rm, R);
    c.take(&x.ril, R);
    c.take(&x.rdlt, R);
    c.take(&x.ra, std::max(D_, Dv_));
    c.take(&x.rb, std::max(D_, Dv_));
    c.take(&x.krows, kBc * D_);
    c.take(&x.vrows, kBc * Dv_);
    const int64_t slots = slot_tiles_ * ktile_;
    if (dot_) c.take(reinterpret_cast<uint16_t**>(&x.slots), slots);
    else c.take(reinterpret_cast<float**>(&x.slots), slots);
    c.take(&x.kv_acc, strip_keys_ / kBc * (D_ + Dv_) * kBc);
    c.take(&x.dq, max_qrows_ * Dp_);
    c.take(&x.dq_tile, R_ * Dp_);
  }

  void init_scratch(Scratch& sc) const {
    Carver count;
    Scratch dummy;
    carve(count, dummy);
    sc.buf.reset(count.used);
    std::memset(sc.buf.get(), 0, static_cast<size_t>(count.used));
    Carver assign;
    assign.base = sc.buf.get();
    carve(assign, sc);
    sc.info.resize(static_cast<size_t>(Bq_));
  }

  void compute_share(int64_t x) {
    const int64_t b = x / sh_.N2, n2 = x % sh_.N2;
    const WBatch& bi = batches_[static_cast<size_t>(b)];
    float* u = share_[static_cast<size_t>(x)].data();
    const float skv = static_cast<float>(bi.skv);
    for (size_t y = batch_tiles_[static_cast<size_t>(b)]; y < batch_tiles_[static_cast<size_t>(b) + 1]; ++y) {
      const Tile& t = tiles_[y];
      if (!t.any_none) continue;
      for (int64_t i = t.s0; i < t.s1; ++i) {
        if (row_info(vis_, bi, i).kind != kNone) continue;
        for (int64_t gg = 0; gg < G_; ++gg) {
          const Tensor3& dy = g_.dy;
          const int64_t base = (bi.q0 + i) * dy.stride[0] + (n2 * G_ + gg) * dy.stride[1];
          for (int64_t e = 0; e < Dv_; ++e) u[e] += detail::load_f32(dy.data, base + e * dy.stride[2], p_.dtype) / skv;
        }
      }
    }
  }

  // ---------------------------------------------------------------- loads and packing
  void load_f32_row(const Tensor3& t, int64_t row, int64_t head, int64_t n, float* dst) const {
    cpu::load_row_f32(kt_, t.data, row * t.stride[0] + head * t.stride[1], t.stride[2], n, p_.dtype, dst);
  }

  // Key tile j (batch-local keys [64 j, 64 j + 64)) of (batch, n2) into a slot; keys past Skv_b are zero.
  //   bf16: K [Dh][64][2] (pairs along D) | V [Dvh][64][2] | K [nDp][32][64][2] (pairs along keys)
  //   fp32: K^T [D][64] | V^T [Dv][64] | K [nDp][64 keys][64]
  void pack_key_tile(const WBatch& bi, int64_t n2, int64_t j, void* slot, Scratch& sc) const {
    const int64_t c0 = j * kBc, nc = std::min(bi.skv, c0 + kBc) - c0;
    if (dot_) {
      // the tile's 64 key and value rows (zero past Skv_b and in the odd last column), then two word transposes
      // (pairs along D / Dv) and one interleave of row pairs (pairs along keys)
      uint16_t* kr = reinterpret_cast<uint16_t*>(sc.krows);  // [64][2 Dh]
      uint16_t* vr = reinterpret_cast<uint16_t*>(sc.vrows);  // [64][2 Dvh]
      for (int64_t c = 0; c < kBc; ++c) {
        uint16_t* kd = kr + c * 2 * Dh_;
        uint16_t* vd = vr + c * 2 * Dvh_;
        if (c < nc) {
          load_bits_row(p_.key, bi.k0 + c0 + c, n2, D_, kd);
          load_bits_row(p_.value, bi.k0 + c0 + c, n2, Dv_, vd);
          if (D_ % 2) kd[D_] = 0;
          if (Dv_ % 2) vd[Dv_] = 0;
        } else {
          std::memset(kd, 0, sizeof(uint16_t) * static_cast<size_t>(2 * Dh_));
          std::memset(vd, 0, sizeof(uint16_t) * static_cast<size_t>(2 * Dvh_));
        }
      }
      uint16_t* kd = static_cast<uint16_t*>(slot);
      uint16_t* vd = kd + Dh_ * 2 * kBc;
      uint32_t* kk = reinterpret_cast<uint32_t*>(vd + Dvh_ * 2 * kBc);
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(kr), Dh_, kBc, Dh_, reinterpret_cast<uint32_t*>(kd), kBc);
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(vr), Dvh_, kBc, Dvh_, reinterpret_cast<uint32_t*>(vd),
                              kBc);
      for (int64_t pn = 0; pn < nDp_; ++pn) {
        const int64_t n = std::min(kPan, D_ - pn * kPan);
        for (int64_t pp = 0; pp < kBc / 2; ++pp) {
          uint32_t* dst = kk + pn * (kBc / 2) * kPan + pp * kPan;
          const uint16_t* a = kr + (2 * pp) * 2 * Dh_ + pn * kPan;
          const uint16_t* b = a + 2 * Dh_;
          for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<uint32_t>(a[d]) | (static_cast<uint32_t>(b[d]) << 16);
          for (int64_t d = n; d < kPan; ++d) dst[d] = 0;
        }
      }
    } else {
      float* kr = sc.krows;  // [64][D]
      float* vr = sc.vrows;  // [64][Dv]
      for (int64_t c = 0; c < kBc; ++c) {
        if (c < nc) {
          load_f32_row(p_.key, bi.k0 + c0 + c, n2, D_, kr + c * D_);
          load_f32_row(p_.value, bi.k0 + c0 + c, n2, Dv_, vr + c * Dv_);
        } else {
          std::memset(kr + c * D_, 0, sizeof(float) * static_cast<size_t>(D_));
          std::memset(vr + c * Dv_, 0, sizeof(float) * static_cast<size_t>(Dv_));
        }
      }
      float* kT = static_cast<float*>(slot);
      float* vT = kT + D_ * kBc;
      float* kp = vT + Dv_ * kBc;
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(kr), D_, kBc, D_, reinterpret_cast<uint32_t*>(kT), kBc);
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(vr), Dv_, kBc, Dv_, reinterpret_cast<uint32_t*>(vT), kBc);
      for (int64_t pn = 0; pn < nDp_; ++pn) {
        const int64_t n = std::min(kPan, D_ - pn * kPan);
        for (int64_t c = 0; c < kBc; ++c) {
          float* dst = kp + pn * kBc * kPan + c * kPan;
          std::memcpy(dst, kr + c * D_ + pn * kPan, sizeof(float) * static_cast<size_t>(n));
          if (n < kPan) std::memset(dst + n, 0, sizeof(float) * static_cast<size_t>(kPan - n));
        }
      }
    }
  }
  void* slot(Scratch& sc, int64_t k) const {
    return static_cast<char*>(sc.slots) + k * ktile_ * static_cast<int64_t>(dot_ ? 2 : 4);
  }

  int64_t tile_rows(const Tile& t) const { return (t.s1 - t.s0) * G_; }

  // Query tile t of head group n2: Q and dO rows (and, for dK/dV tasks, transposed), the statistics m and 1/l and
  // Dlt of every row, the row infos.
  void load_tile(const Tile& t, int64_t n2, bool transposed, Scratch& sc) const {
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    const int64_t rows = tile_rows(t), N1 = sh_.N1;
    for (int64_t i = t.s0; i < t.s1; ++i) sc.info[static_cast<size_t>(i - t.s0)] = row_info(vis_, bi, i);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = t.s0 + r / G_, h = n2 * G_ + r % G_, tq = bi.q0 + i;
      if (sc.info[static_cast<size_t>(r / G_)].kind == kNone) {
        sc.rm[r] = 0.0f;
        sc.ril[r] = 0.0f;
        sc.rdlt[r] = 0.0f;
      } else {
        const int64_t so = window_detail::stat_offset(p_.softmax_layout, N1, bi, h, i);
        sc.rm[r] = g_.softmax_max[so];
        sc.ril[r] = 1.0f / g_.softmax_sum[so];
        load_f32_row(g_.dy, tq, h, Dv_, sc.ra);
        load_f32_row(g_.attention_in, tq, h, Dv_, sc.rb);
        sc.rdlt[r] = dot_fixed(sc.ra, sc.rb, Dv_);
      }
      if (dot_) {
        load_bits_row(p_.query, tq, h, D_, sc.qb + r * 2 * Dh_);
        load_bits_row(g_.dy, tq, h, Dv_, sc.ob + r * 2 * Dvh_);
      } else {
        load_f32_row(p_.query, tq, h, D_, sc.qa + r * D_);
        load_f32_row(g_.dy, tq, h, Dv_, sc.oa + r * Dv_);
      }
    }
    if (dot_) {
      // rows past the tile are zero: they are read as pair partners; so is the odd last column
      for (int64_t r = rows; r < Rp_; ++r) {
        std::memset(sc.qb + r * 2 * Dh_, 0, sizeof(uint16_t) * static_cast<size_t>(2 * Dh_));
        std::memset(sc.ob + r * 2 * Dvh_, 0, sizeof(uint16_t) * static_cast<size_t>(2 * Dvh_));
      }
      if (transposed) {
        const int64_t tr = round_up(rows, 2);
        kt_->grad.transpose_u16(sc.qb, 2 * Dh_, tr, D_, sc.qTb, Rp_);
        kt_->grad.transpose_u16(sc.ob, 2 * Dvh_, tr, Dv_, sc.oTb, Rp_);
      }
    } else if (transposed) {
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(sc.qa), D_, rows, D_, reinterpret_cast<uint32_t*>(sc.qT),
                              R_);
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(sc.oa), Dv_, rows, Dv_,
                              reinterpret_cast<uint32_t*>(sc.oT), R_);
    }
  }

  // The 16-column window of key tile j holding the visible entries of tile t (w1 > w0), or false.
  static bool window_of(const Tile& t, int64_t j, int64_t* w0, int64_t* w1) {
    const int64_t a = std::max(t.lo, j * kBc), e = std::min(t.hi, (j + 1) * kBc);
    if (e <= a) return false;
    *w0 = round_down(a - j * kBc, 16);
    *w1 = round_up(e - j * kBc, 16);
    return true;
  }

  // S, P, dP, dS of the pair (tile t, key tile j) on the columns [w0, w1); P in sc.s, dS in sc.dp.
  void pair_softmax(const Tile& t, int64_t j, const void* key, int64_t w0, int64_t w1, Scratch& sc) const {
    const int64_t rows = tile_rows(t), wn = w1 - w0, c0 = j * kBc;
    if (dot_) {
      const uint16_t* kd = static_cast<const uint16_t*>(key);
      const uint16_t* vd = kd + Dh_ * 2 * kBc;
      kt_->gemm.bf16(sc.qb, 2 * Dh_, rows, kd, 0, w0, wn, Dh_, Dh_, sc.s + w0, kBc, scale_, false);
      kt_->gemm.bf16(sc.ob, 2 * Dvh_, rows, vd, 0, w0, wn, Dvh_, Dvh_, sc.dp + w0, kBc, 1.0f, false);
    } else {
      const float* kT = static_cast<const float*>(key);
      const float* vT = kT + D_ * kBc;
      kt_->gemm.f32(sc.qa, D_, rows, kT, 0, w0, wn, D_, D_, sc.s + w0, kBc, scale_, false);
      kt_->gemm.f32(sc.oa, Dv_, rows, vT, 0, w0, wn, Dv_, Dv_, sc.dp + w0, kBc, 1.0f, false);
    }
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    for (int64_t i = t.s0; i < t.s1; ++i) {
      const RowInfo& ri = sc.info[static_cast<size_t>(i - t.s0)];
      uint8_t* k0 = sc.keep + (i - t.s0) * G_ * kBc;
      // 1 on [a, e) (the row's range inside the window), 0 elsewhere; mask bits read inside in kMasked rows
      const int64_t a = ri.kind == kNone ? w1 : std::clamp(ri.lo - c0, w0, w1);
      const int64_t e = ri.kind == kNone ? w1 : std::clamp(std::min(ri.hi, bi.skv) - c0, a, w1);
      std::memset(k0 + w0, 0, static_cast<size_t>(a - w0));
      std::memset(k0 + a, 1, static_cast<size_t>(e - a));
      std::memset(k0 + e, 0, static_cast<size_t>(w1 - e));
      if (ri.kind == kMasked)
        for (int64_t c = a; c < e; ++c) k0[c] = !vis_.masked(i, c0 + c);
      for (int64_t gg = 1; gg < G_; ++gg) std::memcpy(k0 + gg * kBc + w0, k0 + w0, static_cast<size_t>(wn));
    }
    for (int64_t r = 0; r < rows; ++r)
      kt_->grad.softmax_grad_row(sc.s + r * kBc + w0, sc.dp + r * kBc + w0, sc.keep + r * kBc + w0, wn, sc.rm[r],
                                 sc.ril[r], sc.rdlt[r]);
    if (dot_ && rows % 2 != 0) {  // the zero partner of the last row in the pair layouts
      std::memset(sc.s + rows * kBc + w0, 0, sizeof(float) * static_cast<size_t>(wn));
      std::memset(sc.dp + rows * kBc + w0, 0, sizeof(float) * static_cast<size_t>(wn));
    }
  }

  // ---------------------------------------------------------------- dK/dV tasks
  void run_key_strip(const KStrip& ks, int64_t n2, Scratch& sc) const {
    const WBatch& bi = batches_[static_cast<size_t>(ks.b)];
    const int64_t nt = ks.j1 - ks.j0, acc_tile = (D_ + Dv_) * kBc;
    std::fill(sc.kv_acc, sc.kv_acc + nt * acc_tile, 0.0f);
    if (!ks.tiles.empty())
      for (int64_t j = ks.j0; j < ks.j1; ++j) pack_key_tile(bi, n2, j, slot(sc, j - ks.j0), sc);
    for (size_t x : ks.tiles) {
      const Tile& t = tiles_[x];
      load_tile(t, n2, true, sc);
      const int64_t rows = tile_rows(t);
      const bool owned = owned_[x];  // the tile's whole span lies in this strip: its dQ is computed here too
      if (owned) std::fill(sc.dq_tile, sc.dq_tile + rows * Dp_, 0.0f);
      for (int64_t j = ks.j0; j < ks.j1; ++j) {
        int64_t w0, w1;
        if (!window_of(t, j, &w0, &w1)) continue;
        const int64_t wn = w1 - w0;
        pair_softmax(t, j, slot(sc, j - ks.j0), w0, w1, sc);
        if (owned) accumulate_dq(t, slot(sc, j - ks.j0), w0, w1, sc.dq_tile, sc);
        float* dkT = sc.kv_acc + (j - ks.j0) * acc_tile;
        float* dvT = dkT + D_ * kBc;
        if (dot_) {
          const int64_t half = (rows + 1) / 2;
          for (int64_t pp = 0; pp < half; ++pp) {
            const int64_t r0 = 2 * pp, r1 = 2 * pp + 1;
            kt_->grad.pack_rows_bf16(sc.s + r0 * kBc + w0, sc.s + r1 * kBc + w0, wn, sc.pB + pp * 2 * kBc + 2 * w0,
                                     nullptr, nullptr);
            kt_->grad.pack_rows_bf16(sc.dp + r0 * kBc + w0, sc.dp + r1 * kBc + w0, wn, sc.dsB + pp * 2 * kBc + 2 * w0,
                                     nullptr, nullptr);
          }
          kt_->gemm.bf16(sc.oTb, Rp_, Dv_, sc.pB, 0, w0, wn, half, half, dvT + w0, kBc, 1.0f, true);   // dV^T += dO^T P
          kt_->gemm.bf16(sc.qTb, Rp_, D_, sc.dsB, 0, w0, wn, half, half, dkT + w0, kBc, 1.0f, true);  // dK^T += Q^T dS
        } else {
          kt_->gemm.f32(sc.oT, R_, Dv_, sc.s, 0, w0, wn, rows, rows, dvT + w0, kBc, 1.0f, true);
          kt_->gemm.f32(sc.qT, R_, D_, sc.dp, 0, w0, wn, rows, rows, dkT + w0, kBc, 1.0f, true);
        }
      }
      if (owned) write_dq(t, n2, sc.dq_tile);
    }
    // dK = scale dK^T, dV = dV^T (+ the share of rows without a visible key), rounded with rha.
    const std::vector<float>& u = share_[static_cast<size_t>(ks.b * sh_.N2 + n2)];
    const size_t esz = dtype_size(p_.dtype);
    for (int64_t j = ks.j0; j < ks.j1; ++j) {
      const float* dkT = sc.kv_acc + (j - ks.j0) * acc_tile;
      const float* dvT = dkT + D_ * kBc;
      const int64_t nc = std::min(bi.skv, (j + 1) * kBc) - j * kBc;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t row = (bi.k0 + j * kBc + c) * sh_.N2 + n2;
        for (int64_t d = 0; d < D_; ++d) sc.ra[d] = scale_ * dkT[d * kBc + c];
        store_rha(sc.ra, static_cast<char*>(g_.grad_key) + row * D_ * static_cast<int64_t>(esz), D_, p_.dtype,
                  kt_->isa);
        for (int64_t e = 0; e < Dv_; ++e) sc.ra[e] = u.empty() ? dvT[e * kBc + c] : dvT[e * kBc + c] + u[e];
        store_rha(sc.ra, static_cast<char*>(g_.grad_value) + row * Dv_ * static_cast<int64_t>(esz), Dv_, p_.dtype,
                  kt_->isa);
      }
    }
  }

  // ---------------------------------------------------------------- dQ tasks
  // dQ_t += dS K_j on the pair's window (dS of pair_softmax in sc.dp), into the rows dq [rows][Dp].
  void accumulate_dq(const Tile& t, const void* key, int64_t w0, int64_t w1, float* dq, Scratch& sc) const {
    const int64_t rows = tile_rows(t), wn = w1 - w0;
    if (dot_) {
      const uint16_t* kk = static_cast<const uint16_t*>(key) + (Dh_ + Dvh_) * 2 * kBc;
      for (int64_t pp = 0; pp < (rows + 1) / 2; ++pp) {
        const int64_t r0 = 2 * pp, r1 = 2 * pp + 1;
        kt_->grad.pack_rows_bf16(sc.dp + r0 * kBc + w0, sc.dp + r1 * kBc + w0, wn, sc.pair_tmp, sc.dsA + r0 * kBc + w0,
                                 r1 < rows ? sc.dsA + r1 * kBc + w0 : nullptr);
      }
      kt_->gemm.bf16(sc.dsA + w0, kBc, rows, kk + (w0 / 2) * 2 * kPan, kBc * kPan, 0, Dp_, wn / 2, wn / 2, dq, Dp_, 1.0f,
                     true);
    } else {
      const float* kp = static_cast<const float*>(key) + (D_ + Dv_) * kBc;
      kt_->gemm.f32(sc.dp + w0, kBc, rows, kp + w0 * kPan, kBc * kPan, 0, Dp_, wn, wn, dq, Dp_, 1.0f, true);
    }
  }

  // dQ = scale * sum of tile t's rows dq [rows][Dp], rounded with rha; rows without a visible key hold 0.
  void write_dq(const Tile& t, int64_t n2, float* dq) const {
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    const size_t esz = dtype_size(p_.dtype);
    for (int64_t r = 0; r < tile_rows(t); ++r) {
      const int64_t i = t.s0 + r / G_, h = n2 * G_ + r % G_, tq = bi.q0 + i;
      float* dqr = dq + r * Dp_;
      for (int64_t d = 0; d < D_; ++d) dqr[d] *= scale_;
      store_rha(dqr, static_cast<char*>(g_.grad_query) + (tq * sh_.N1 + h) * D_ * static_cast<int64_t>(esz), D_,
                p_.dtype, kt_->isa);
    }
  }

  // ---------------------------------------------------------------- dQ tasks
  void run_query_strip(const QStrip& qs, int64_t n2, Scratch& sc) const {
    const WBatch& bi = batches_[static_cast<size_t>(tiles_[qs.t0].b)];
    std::fill(sc.dq, sc.dq + qs.rows * Dp_, 0.0f);
    const int64_t per = chunk_ / kBc;
    for (int64_t cb = qs.jlo / per * per; cb < qs.jhi; cb += per) {
      const int64_t ja = std::max(cb, qs.jlo), jb = std::min(cb + per, qs.jhi);
      for (int64_t j = ja; j < jb; ++j) pack_key_tile(bi, n2, j, slot(sc, j - ja), sc);
      int64_t row0 = 0;
      for (size_t x = qs.t0; x < qs.t1; ++x) {
        const Tile& t = tiles_[x];
        const int64_t rows = tile_rows(t);
        if (owned_[x]) {  // its dQ is written by the dK/dV task whose strip holds its whole span
          row0 += rows;
          continue;
        }
        bool loaded = false;
        for (int64_t j = ja; j < jb; ++j) {
          int64_t w0, w1;
          if (!window_of(t, j, &w0, &w1)) continue;
          if (!loaded) {
            load_tile(t, n2, false, sc);
            loaded = true;
          }
          const void* key = slot(sc, j - ja);
          pair_softmax(t, j, key, w0, w1, sc);
          accumulate_dq(t, key, w0, w1, sc.dq + row0 * Dp_, sc);
        }
        row0 += rows;
      }
    }
    int64_t row0 = 0;
    for (size_t x = qs.t0; x < qs.t1; ++x) {
      if (!owned_[x]) write_dq(tiles_[x], n2, sc.dq + row0 * Dp_);
      row0 += tile_rows(tiles_[x]);
    }
  }

  const WindowAttentionGradParams& g_;
  bool dot_ = false;
  float scale_ = 1.0f;
  int64_t G_ = 1, Bq_ = 1, R_ = 1, Rp_ = 2, D_ = 1, Dv_ = 1, Dh_ = 1, Dvh_ = 1, nDp_ = 1, Dp_ = 64, ktile_ = 0;
  int64_t chunk_ = 64, strip_keys_ = 64, max_qrows_ = 1, slot_tiles_ = 1;
  std::vector<Tile> tiles_;
  std::vector<QStrip> qstrips_;
  std::vector<uint8_t> owned_;  // per tile: its dQ is computed by a dK/dV task
  std::vector<KStrip> kstrips_;
  std::vector<double> qcost_, kcost_;
  std::vector<std::vector<float>> share_;  // [b * N2 + n2][Dv]: dV share of rows without a visible key
  std::vector<size_t> batch_tiles_;        // [B + 1]: tiles of batch b are [batch_tiles_[b], batch_tiles_[b + 1])
};

}  // namespace

Status backward(const WindowAttentionGradParams& p, const CpuOptions& options, const Tuning& tuning) {
  return run_entry<Backward>("window_attention_backward_cpu", "packed key tiles and per-thread accumulators",
                             validate_window_attention_backward, window_reference::backward_fp64, p, options,
                             tuning);
}

}  // namespace nsa::window_cpu
