// Optimized CPU forward of selected attention (docs/spec/select_attention.md §3-§6).
//
// Once per call: the blocks some visible entry reaches are packed into GEMM operands (cpu_common.h: KQ and VO per
// block, only the batch's valid keys, zero padded). Then one task per query tile = (batch, KV head n2, Bq
// consecutive query rows); its R = Bq G GEMM rows are (row i, head g), r = i G + g. Per tile:
//   1. entries: every slot with a visible entry (§3), grouped by block (cpu_common.h TileEntries);
//   2. scores: for each block of the tile's union, S = (Q K_x^T) scale in one GEMM over its entries' Q rows (G rows
//      per entry, read in place through row pointers: GemmKernels::*_gather) (fp32 dot products, then times the
//      float32 scale: §4 step 1), each entry's scores written straight into its row's score line at slot j: line
//      (i, g) holds K slots of lpp columns, slot j at j lpp; invisible positions (past the causal limit or Skv_b) and
//      empty slots hold -inf, so they take no part in the maximum or the sum (§4 step 2: exp(-inf - m) = 0 exactly);
//   3. exact softmax per line (§4 step 3): m = max, l_sum = sum of exp(S - m) (KernelTable row kernels: one pass
//      each over the whole line, no online rescaling), P = exp(S - m) / l_sum rounded half away from zero to the
//      input dtype (§4 step 4, rha_T);
//   4. O = sum over blocks of rha(P)_entries V_x: for each block, its entries' P slices (read in place) multiplied
//      by the packed V block in one GEMM (fp32 accumulation), the products added to the rows' fp32 accumulators in a
//      fixed order (blocks of the union, then entries);
//   (for G >= kDirectMinG the G rows of one entry fill the GEMM micro-kernel on their own: steps 2 and 4 then run
//   one GEMM per entry on its rows, writing the scores into its lines and accumulating O in place);
//   5. attention_out rounded to nearest even (§4 step 4), statistics m and l_sum x 8 (§5); a row without visible
//      entry gets zeros, -FLT_MAX and +FLT_MAX (§6).
// A value block holding inf or NaN (dirty) takes a scalar path for the entries that see only part of it, so that
// invisible values never meet a zero probability (0 x inf = NaN); every other entry runs through the GEMM.
// Extra memory: the packed blocks (at most the size of the key and value inputs) and per-worker tile buffers,
// O(R (K lpp + D + Dv)); nothing grows with T1 x K x l'. Each output element has one writer and one summation
// order fixed by the shape and the indices: results do not depend on the number of threads.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/row_helpers.h"
#include "common/threads.h"
#include "cpu/entry.h"
#include "ops/select_attention/cpu.h"
#include "ops/select_attention/cpu_common.h"
#include "ops/select_attention/kernels.h"
#include "ops/select_attention/reference.h"

namespace nsa::select_cpu {
namespace {

constexpr int64_t kTargetRows = 64;           // GEMM rows (query rows x G heads) of a tile with G >= kDirectMinG
constexpr int64_t kTargetRowsGathered = 256;  // the same below kDirectMinG: more query rows share each block (bigger
                                              // gathered GEMMs; bench-8k-g1 about 15 % faster than with 64)
constexpr int64_t kMaxLineBytes = int64_t(4) << 20;      // cap of a worker's score lines (R x K lpp floats)
// (kDirectMinG, cpu_common.h: from that G on each entry's GEMMs run on its rows in place, scores written into its
// lines and O accumulated in place.)

template <bool kPairs>
class Forward : CallState {
 public:
  using P = Path<kPairs>;
  using E = typename P::E;

  Forward(const SelectAttentionParams& p, const CallState& state, const Tuning& tuning) : CallState(state), p_(p) {
    ld_s_ = g_.K * g_.lpp;
    // a worker's score lines (bq G rows of ld_s_ floats and as many E) stay within kMaxLineBytes
    const int64_t line_bytes = static_cast<int64_t>(sizeof(float) + sizeof(E)) * g_.G * ld_s_;
    bq_ = std::min(tile_tokens(tuning.fwd_tile_rows, kTargetRows, kTargetRowsGathered),
                   std::max<int64_t>(1, kMaxLineBytes / line_bytes));
    rmax_ = bq_ * g_.G;
    using select_kernels::PMode;
    pmode_ = kPairs ? PMode::kBf16Bits
                    : (p.dtype == DType::kBF16 ? PMode::kF32Bf16 : (p.dtype == DType::kF16 ? PMode::kF32F16 : PMode::kF32));
  }

  // No query row (T1 = 0): attention_out and the statistics have no element.
  static bool nothing_to_write(const SelectAttentionShape& sh) { return sh.T1 == 0; }

  void run() {
    const int64_t n_packed = mark(p_);
    packs_.reset(n_packed * g_.block_elems);
    // tasks: tiles (b, n2, s0, s1), largest first (cost: visible entries); the order never changes a result
    struct Task {
      int64_t b, n2, s0, s1, cost;
    };
    std::vector<Task> tasks;
    for_each_tile(p_, bq_, [&](int64_t b, int64_t s0, int64_t s1, int64_t n2, int64_t visible) {
      tasks.push_back({b, n2, s0, s1, visible});
    });
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
    const int workers = threads_;
    std::vector<Scratch> scratch(static_cast<size_t>(workers));
    // every allocation before the first output is written: a failure is a Status, not a partial result
    for (Scratch& sc : scratch) sc.init(*this);

    // pack the reached blocks
    cpu::parallel_for(n_packed, workers, [&](int64_t i, int w) {
      pack<kPairs>(p_, i, packs_.get(), scratch[static_cast<size_t>(w)].stage.get());
    });
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int w) {
      const Task& tk = tasks[static_cast<size_t>(t)];
      run_tile(scratch[static_cast<size_t>(w)], tk.b, tk.n2, tk.s0, tk.s1);
    });
  }

 private:
  struct Scratch {
    AlignedBuf<E> qa;     // [R][Dr] the tile's query rows
    detail::LineVector<const E*> arow;  // [R] A rows of one block's entries (query rows or rha(P) slices), gathered
    detail::LineVector<float*> crow;    // [R] their result rows (score slots or otmp rows)
    AlignedBuf<float> s;     // [R][K lpp] score lines, then exp values
    AlignedBuf<E> pr;        // [R][K lpp] rha(P) lines
    AlignedBuf<float> otmp;  // [R][Dvp] P.V of one block's entries
    AlignedBuf<float> o;     // [R][Dvp] output accumulators
    detail::LineVector<float> m, l;
    TileEntries te;
    AlignedBuf<E> stage;     // [lpp][max(Dr, Dvr)] key / value rows of a block being packed
    void init(const Forward& f) {
      const Geo& g = f.g_;
      const int64_t R = f.rmax_;
      qa.reset(R * g.Dr);
      arow.resize(static_cast<size_t>(R));
      crow.resize(static_cast<size_t>(R));
      s.reset(R * f.ld_s_);
      pr.reset(R * f.ld_s_);
      otmp.reset(R * g.Dvp);
      o.reset(R * g.Dvp);
      m.resize(static_cast<size_t>(R));
      l.resize(static_cast<size_t>(R));
      te.init(f.bq_, g.K, g.max_blocks);
      stage.reset(f.stage_elems());
    }
  };

  const E* kq(int64_t slot) const { return packs_.get() + slot * g_.block_elems; }
  const E* vo(int64_t slot) const { return packs_.get() + slot * g_.block_elems + g_.kq; }

  void run_tile(Scratch& sc, int64_t b, int64_t n2, int64_t s0, int64_t s1) {
    const BatchInfo& bi = batches_[static_cast<size_t>(b)];
    const int64_t G = g_.G, K = g_.K, lpp = g_.lpp, ntok = s1 - s0, R = ntok * G;
    const DType dt = p_.dtype;
    TileEntries& te = sc.te;
    te.build(p_, bi, n2, s0, ntok, K, g_.block);  // 1.

    // 2. scores
    const float neg_inf = -std::numeric_limits<float>::infinity();
    if (te.n_entries > 0) {
      for (int64_t i = 0; i < ntok; ++i) {
        load_operand_rows(sc.qa.get() + i * G * g_.Dr, bi.q_begin + s0 + i, n2);
        for (int64_t j = 0; j < K; ++j)
          if (te.x[static_cast<size_t>(i * K + j)] < 0)
            for (int64_t g = 0; g < G; ++g) std::fill_n(sc.s.get() + (i * G + g) * ld_s_ + j * lpp, lpp, neg_inf);
      }
    }
    for (int64_t u = 0; u < te.blocks(); ++u) {
      const int64_t slot = bt_.slot[static_cast<size_t>(bt_.id(b, te.ublock[static_cast<size_t>(u)], n2, g_.N2))];
      const int32_t* e0 = te.ent.data() + te.ustart[static_cast<size_t>(u)];
      const int64_t ne = te.ustart[static_cast<size_t>(u) + 1] - te.ustart[static_cast<size_t>(u)];
      if (direct_) {  // each entry's G query rows are contiguous: its scores straight into its line
        for (int64_t e = 0; e < ne; ++e) {
          const int64_t ij = e0[e], i = ij / K, j = ij % K, v = te.vis[static_cast<size_t>(ij)];
          float* dst = sc.s.get() + i * G * ld_s_ + j * lpp;
          P::gemm(kt_, sc.qa.get() + i * G * g_.Dr, g_.Dr, G, kq(slot), g_.Dr * kPanel, 0, lpp, g_.Dr, dst, ld_s_,
                  scale_, false);
          if (v < lpp)
            for (int64_t g = 0; g < G; ++g) std::fill(dst + g * ld_s_ + v, dst + g * ld_s_ + lpp, neg_inf);
        }
        continue;
      }
      // the entries' query rows read in place, their scores written straight into their slots
      for (int64_t c0 = 0; c0 < ne; c0 += bq_) {
        const int64_t nc = std::min(bq_, ne - c0);
        for (int64_t e = 0; e < nc; ++e) {
          const int64_t ij = e0[c0 + e], i = ij / K, j = ij % K;
          for (int64_t g = 0; g < G; ++g) {
            sc.arow[static_cast<size_t>(e * G + g)] = sc.qa.get() + (i * G + g) * g_.Dr;
            sc.crow[static_cast<size_t>(e * G + g)] = sc.s.get() + (i * G + g) * ld_s_ + j * lpp;
          }
        }
        P::gemm_gather(kt_, sc.arow.data(), nc * G, kq(slot), g_.Dr * kPanel, 0, lpp, g_.Dr, sc.crow.data(), scale_,
                       false);
        for (int64_t e = 0; e < nc; ++e) {  // invisible positions of each slot: -inf
          const int64_t v = te.vis[static_cast<size_t>(e0[c0 + e])];
          for (int64_t g = 0; g < G; ++g) {
            float* line = sc.crow[static_cast<size_t>(e * G + g)];
            std::fill(line + v, line + lpp, neg_inf);
          }
        }
      }
    }

    // 3. softmax per line, rha(P)
    // (maxima and exp sums of each run of tokens with a visible entry, several rows at a time)
    detail::for_each_run(
        ntok, [&](int64_t i) { return te.nvis[static_cast<size_t>(i)] != 0; },
        [&](int64_t i0, int64_t i1) {
          kt_->rows.softmax_rows(sc.s.get() + i0 * G * ld_s_, ld_s_, (i1 - i0) * G, ld_s_, neg_inf,
                                 &sc.m[static_cast<size_t>(i0 * G)], &sc.l[static_cast<size_t>(i0 * G)]);
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = i * G + g;
              const float l = sc.l[static_cast<size_t>(r)];
              float* line = sc.s.get() + r * ld_s_;
              E* pl = sc.pr.get() + r * ld_s_;
              for (int64_t j = 0; j < K; ++j)  // the slots P.V reads: those with a visible entry
                if (te.x[static_cast<size_t>(i * K + j)] >= 0)
                  sk_->normalize_rha(line + j * lpp, lpp, l, pl + j * lpp, pmode_);
            }
        });

    // 4. O = sum over blocks of rha(P) V
    std::fill_n(sc.o.get(), R * g_.Dvp, 0.0f);
    // up to bq_ entries at a time for the GEMM (for_each_entry_chunk: partly seen entries of a block with non-finite
    // values take the scalar path)
    for_each_entry_chunk(
        te, bt_, g_, bi, b, n2, bt_.dirty_v, bq_,
        [&](const UnionBlock& ub, int32_t ij) { scalar_pv(sc, bi, n2, ub.x, ij); },
        [&](const UnionBlock& ub, const int32_t* ids, int64_t n) {
          if (direct_) {  // each entry's G rows of rha(P) are a strided block of its lines: O += P V in place
            for (int64_t e = 0; e < n; ++e) {
              const int64_t i = ids[e] / K, j = ids[e] % K;
              P::gemm(kt_, sc.pr.get() + i * G * ld_s_ + j * lpp, ld_s_, G, vo(ub.slot), lpp * kPanel, 0, g_.Dvp,
                      lpp, sc.o.get() + i * G * g_.Dvp, g_.Dvp, 1.0f, true);
            }
            return;
          }
          // the entries' rha(P) slices read in place, the products added to their rows' accumulators by the GEMM
          // (O + P V, as the row addition would), unless a row takes two entries of the chunk (duplicate indices:
          // adjacent, the entries being in row order): then into otmp and added entry by entry
          const bool repeated = has_repeated_row(ids, n, K);
          for (int64_t e = 0; e < n; ++e) {
            const int64_t i = ids[e] / K, j = ids[e] % K;
            for (int64_t g = 0; g < G; ++g) {
              sc.arow[static_cast<size_t>(e * G + g)] = sc.pr.get() + (i * G + g) * ld_s_ + j * lpp;
              sc.crow[static_cast<size_t>(e * G + g)] =
                  repeated ? sc.otmp.get() + (e * G + g) * g_.Dvp : sc.o.get() + (i * G + g) * g_.Dvp;
            }
          }
          P::gemm_gather(kt_, sc.arow.data(), n * G, vo(ub.slot), lpp * kPanel, 0, g_.Dvp, lpp, sc.crow.data(), 1.0f,
                         !repeated);
          if (repeated)
            for (int64_t e = 0; e < n; ++e) {
              const int64_t i = ids[e] / K;
              for (int64_t g = 0; g < G; ++g)
                kt_->rows.add_row(sc.o.get() + (i * G + g) * g_.Dvp, sc.otmp.get() + (e * G + g) * g_.Dvp, g_.Dvp);
            }
        });

    // 5. outputs
    const size_t esz = dtype_size(dt);
    for (int64_t i = 0; i < ntok; ++i) {
      const int64_t t = bi.q_begin + s0 + i;
      const bool empty = te.nvis[static_cast<size_t>(i)] == 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = i * G + g, h = n2 * G + g;
        char* dst = static_cast<char*>(p_.attention_out) + (t * g_.N1 + h) * g_.Dv * static_cast<int64_t>(esz);
        const int64_t so = select_detail::stat_offset(t, h, g_.N1);
        if (empty) {  // §6
          std::memset(dst, 0, esz * static_cast<size_t>(g_.Dv));
          std::fill_n(p_.softmax_max + so, 8, -FLT_MAX);
          std::fill_n(p_.softmax_sum + so, 8, FLT_MAX);
          continue;
        }
        kt_->rows.store_row(sc.o.get() + r * g_.Dvp, dst, g_.Dv, dt);  // rne_T
        std::fill_n(p_.softmax_max + so, 8, sc.m[static_cast<size_t>(r)]);
        std::fill_n(p_.softmax_sum + so, 8, sc.l[static_cast<size_t>(r)]);
      }
    }
  }

  // The G query rows of (query row t, KV head n2) as operand rows of Dr elements at dst.
  void load_operand_rows(E* dst, int64_t t, int64_t n2) const {
    for (int64_t g = 0; g < g_.G; ++g)
      load_operand_row<kPairs>(kt_, p_.query, p_.dtype, t, n2 * g_.G + g, g_.D, g_.Dr, dst + g * g_.Dr);
  }

  // Entry ij of a dirty value block seen in part: o[row] += sum_{r < vis} rha(P)[r] v[r], read from the tensor.
  void scalar_pv(Scratch& sc, const BatchInfo& bi, int64_t n2, int64_t x, int32_t ij) const {
    const int64_t K = g_.K, i = ij / K, j = ij % K, v = sc.te.vis[static_cast<size_t>(ij)];
    const Tensor3& val = p_.value;
    for (int64_t g = 0; g < g_.G; ++g) {
      const int64_t r = i * g_.G + g;
      const E* pl = sc.pr.get() + r * ld_s_ + j * g_.lpp;
      float* o = sc.o.get() + r * g_.Dvp;
      for (int64_t c = 0; c < v; ++c) {
        const float pc = P::value(pl[c]);
        const int64_t base = (bi.k_begin + x * g_.block + c) * val.stride[0] + n2 * val.stride[1];
        for (int64_t e = 0; e < g_.Dv; ++e) o[e] += pc * detail::load_f32(val.data, base + e * val.stride[2], p_.dtype);
      }
    }
  }

  const SelectAttentionParams& p_;
  int64_t ld_s_ = 0, bq_ = 1, rmax_ = 1;
  select_kernels::PMode pmode_ = select_kernels::PMode::kF32;  // how rha(P) is stored for P.V
  AlignedBuf<E> packs_;
};

}  // namespace

// Workspace that cannot be allocated is reported as an error, never as a crash: all of it (packed blocks,
// per-worker tiles) is allocated before the first output is written.
Status forward(const SelectAttentionParams& p, const CpuOptions& options, const Tuning& tuning) {
  return run_entry<Forward>("select_attention_cpu", "packed key/value blocks and per-thread tiles",
                            validate_select_attention, select_reference::forward_fp64, p, options, tuning);
}

}  // namespace nsa::select_cpu
