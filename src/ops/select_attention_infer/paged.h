// Paged decode attention, internal pieces shared by select_attention_infer (docs/spec/decode.md §4) and
// paged_window_attention (§9): reading positions through a block table, the page checks of the argument rules,
// and the CPU tile worker (header-only, so that either operator builds without the other).
//
// Positions. Raw position p of batch b lives in page block_table[b][p / P], row p % P, of a cache
// [num_pages, P, N2, D]. A (query token, KV head) attends to a list of runs of positions [start, end) (§4: one
// run per non-empty slot, in slot order, duplicates repeated; §9: the one run of the window); its entries are the
// runs' positions in that order.
//
// CPU tile worker (TileWorker). For one query token t of batch b and KV head n2, with its ne entries:
//   1. gather: the entries' key rows into KQ [ceil(nep/64) panels][D][64] and value rows into
//      VO [Dvp/64 panels][nep][64] (src/cpu/kernels.h B layouts), nep = ne rounded up to 16, the padding zero
//      (never read from the caches). Two operand paths: fp32 (the rows converted to float; every dtype and ISA),
//      and bf16 pairs for bf16 inputs on an ISA with KernelTable::gemm.bf16 (the rows' bits copied as they are,
//      reductions over pairs: (p / 2) 128 + c 2 + p % 2 in a panel, D rounded up to Dr = even; the products are
//      exact, the sums fp32). A third path skips the gather: contiguous bf16 rows with an even D on an ISA with
//      KernelTable::gemm.pv_bf16 are read where they lie (attend_in_place), with the same products and sums;
//   2. S = (Q K^T) scale for the G query heads of n2 in one GEMM (fp32 dot products, then times the float32 scale),
//      padding columns set to -inf (they take no part: exp(-inf - m) = 0 exactly);
//   3. m = row_max, l = exp_sum (KernelTable row kernels: the exp values in place, their fp32 sum in the canonical
//      order);
//   4. the rounded probabilities (select: rha_T of the unnormalised exp values, §4 step 4; window: rha_T of
//      exp / l, window_attention.md §5 step 4) times VO in one GEMM (fp32 accumulation);
//   5. the output rows: select: (sum / l) rounded rne_T for bf16, rha_T for fp16 (§4 step 4); window: rha_T(sum).
// Every output element has one writer and a summation order fixed by the shapes: results do not depend on the
// number of threads. Per-worker memory O(ne (D + Dv) + G (ne + Dv)), proportional to the attended positions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/arg_checks.h"
#include "common/numeric.h"
#include "common/threads.h"
#include "cpu/entry.h"
#include "cpu/kernels.h"
#include "cpu/row_load.h"
#include "nsa/select_attention_infer.h"
#include "ops/select_attention/rounding.h"

namespace nsa::paged {

// [start, end) raw positions of one batch.
struct Run {
  int64_t start = 0, end = 0;
};

// block_table[b][k] (int32 elements).
inline int64_t table_at(const Tensor2& bt, int64_t b, int64_t k) {
  return static_cast<const int32_t*>(bt.data)[b * bt.stride[0] + k * bt.stride[1]];
}

// Element offset of (page, row, head, 0) in a cache view.
inline int64_t cache_offset(const PagedCacheView& c, int64_t page, int64_t row, int64_t head) {
  return page * c.stride[0] + row * c.stride[1] + head * c.stride[2];
}

// The page checks of §4 / §9 for the positions [start, end) of batch b: every page k = p / P they touch exists
// (k < max_pages) and block_table[b][k] lies in [0, num_pages). `who` and `row` name the query row that needs them
// (for the message).
inline Status check_pages(const Tensor2& bt, int64_t b, int64_t start, int64_t end, int64_t P, int64_t num_pages,
                          const char* who, int64_t row) {
  if (end <= start) return Status::Ok();
  const int64_t max_pages = bt.size[1];
  for (int64_t k = start / P; k <= (end - 1) / P; ++k) {
    if (k >= max_pages)
      return detail::arg_error("block_table must have a page for every position a row reads, but ", who, " ", row,
                               " reads positions [", start, ", ", end, ") of batch ", b, ", which need page entry ",
                               k, " of a block_table row of ", max_pages, " entries (page size ", P, ")");
    const int64_t page = table_at(bt, b, k);
    if (page < 0 || page >= num_pages)
      return detail::arg_error("block_table[", b, "][", k, "] = ", page, " is not a valid page: ", who, " ", row,
                               " reads positions [", std::max(start, k * P), ", ", std::min(end, (k + 1) * P),
                               ") of batch ", b, " through it, so it must lie in [0, num_pages = ", num_pages, ")");
  }
  return Status::Ok();
}

// Checks of a cache view: 4-D sizes (pages >= 0, the other dims >= 1) and data when it holds elements.
inline Status check_cache(const PagedCacheView& c, const char* name, const char* layout) {
  for (int i = 0; i < 4; ++i)
    if (c.size[i] < (i == 0 ? 0 : 1))
      return detail::arg_error(name, " ", layout, " must have sizes >= 1 (the page count >= 0), got ",
                               detail::shape_str(c.size, 4));
  if (c.data == nullptr && c.size[0] > 0) return detail::arg_error(name, " must not be null");
  return Status::Ok();
}

// How the probabilities and the output are rounded (see the header comment).
enum class Mode : int { kSelect = 0, kWindow = 1 };

// What a TileWorker needs of a validated call.
struct Problem {
  DType dtype = DType::kF32;
  Mode mode = Mode::kSelect;
  Tensor3 query;         // [T, N1, D]
  PagedCacheView key;    // [num_pages, P, N2, D]
  PagedCacheView value;  // [num_pages, P, N2, Dv]
  Tensor2 block_table;
  int64_t N1 = 0, N2 = 0, G = 0, D = 0, Dv = 0, P = 0;
  float scale = 1.0f;
  void* out = nullptr;  // [T, N1, Dv] contiguous
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

class TileWorker {
 public:
  // max_entries: the most entries of one (token, KV head) of the call.
  TileWorker(const Problem& pr, const cpu::KernelTable* kt, int64_t max_entries) : pr_(pr), kt_(kt) {
    cap_ = round_up(std::max<int64_t>(max_entries, 1), 16);
    dvp_ = round_up(pr.Dv, cpu::kPanel);
    pairs_ = pr.dtype == DType::kBF16 && kt->gemm.bf16 != nullptr;
    dr_ = pairs_ ? round_up(pr.D, 2) : pr.D;
    in_place_ = pairs_ && kt->gemm.pv_bf16 != nullptr && pr.D % 2 == 0 && pr.key.stride[3] == 1 &&
                pr.value.stride[3] == 1;
    if (in_place_) {
      gp_ = round_up(pr.G, 16);
      qp16_.reset(round_up(pr.G, cpu::kPanel) * dr_);
      tile_.reset(kRun * gp_);
      pv_work_.reset(pr.G * round_up(pr.Dv, 64));
      vrow_.resize(static_cast<size_t>(cap_));
      p16_.reset(pr.G * cap_);
    } else if (pairs_) {
      kq16_.reset(round_up(cap_, cpu::kPanel) * dr_);
      ktmp16_.reset(cpu::kPanel * dr_);
      vo16_.reset(dvp_ * cap_);
      qa16_.reset(pr.G * dr_);
      p16_.reset(pr.G * cap_);
    } else {
      kq_.reset(round_up(cap_, cpu::kPanel) * pr.D);
      ktmp_.reset(cpu::kPanel * pr.D);
      vo_.reset(dvp_ * cap_);
      qa_.reset(pr.G * pr.D);
      p_.reset(pr.G * cap_);
    }
    s_.reset(pr.G * cap_);
    o_.reset(pr.G * dvp_);
    row_.resize(static_cast<size_t>(std::max(pr.D, dvp_)));
  }

  // Writes the G output rows (t, n2 G + g) of query token t of batch b attending to the runs' positions; no
  // entry gives zero rows (§4 step 5).
  void attend(int64_t b, int64_t t, int64_t n2, const std::vector<Run>& runs) {
    const int64_t G = pr_.G, D = pr_.D, Dv = pr_.Dv;
    int64_t ne = 0;
    for (const Run& r : runs) ne += r.end - r.start;
    if (ne == 0) {
      zero_rows(t, n2);
      return;
    }
    const int64_t nep = round_up(ne, 16);
    if (in_place_) {
      attend_in_place(b, t, n2, runs, ne, nep);
      return;
    }
    if (pairs_) {
      attend_pairs(b, t, n2, runs, ne, nep);
      return;
    }
    // 1. gather the entries' rows through the block table into the packed operands. Keys: up to 64 rows side by
    //    side in ktmp_, then one 32-bit transpose makes the panel [D][64]; values: each row into its panels.
    locate(b, n2, runs);
    constexpr int64_t W = cpu::kPanel;
    for (int64_t c0 = 0; c0 < nep; c0 += W) {
      const int64_t n = std::min(W, nep - c0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = c0 + i;
        float* kr = ktmp_.get() + i * D;
        if (c >= ne) {  // padding entries: zero keys and values
          std::fill(kr, kr + D, 0.0f);
          for (int64_t e0 = 0; e0 < dvp_; e0 += W)
            std::memset(vo_.get() + (e0 / W) * nep * W + c * W, 0, sizeof(float) * W);
          continue;
        }
        prefetch_ahead(c);
        load_from(pr_.key.data, koff_[static_cast<size_t>(c)], pr_.key.stride[3], D, kr);
        load(pr_.value, voff_[static_cast<size_t>(c)], Dv, dvp_);
        for (int64_t e0 = 0; e0 < dvp_; e0 += W)
          std::memcpy(vo_.get() + (e0 / W) * nep * W + c * W, row_.data() + e0, sizeof(float) * W);
      }
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(ktmp_.get()), D, n, D,
                              reinterpret_cast<uint32_t*>(kq_.get() + (c0 / W) * D * W), W);
    }
    // 2. scores of the G heads
    for (int64_t g = 0; g < G; ++g) {
      const int64_t off = t * pr_.query.stride[0] + (n2 * G + g) * pr_.query.stride[1];
      load_from(pr_.query.data, off, pr_.query.stride[2], D, qa_.get() + g * D);
    }
    kt_->gemm.f32(qa_.get(), D, G, kq_.get(), D * cpu::kPanel, 0, nep, D, D, s_.get(), nep, pr_.scale, false);
    const DType dt = pr_.dtype;
    const bool low = dt == DType::kBF16 || dt == DType::kF16;
    l_.resize(static_cast<size_t>(G));
    // 3.-4. exact softmax statistics, probabilities rounded rha_T held as float (fp32: unrounded)
    for (int64_t g = 0; g < G; ++g)
      probabilities_row(g, ne, nep, p_.get() + g * nep,
                        [&](float v) { return low ? select_detail::round_rha(v, dt) : v; });
    kt_->gemm.f32(p_.get(), nep, G, vo_.get(), nep * cpu::kPanel, 0, dvp_, nep, nep, o_.get(), dvp_, 1.0f, false);
    store_outputs(t, n2);
  }

  void zero_rows(int64_t t, int64_t n2) {
    const size_t esz = dtype_size(pr_.dtype);
    std::memset(static_cast<char*>(pr_.out) + (t * pr_.N1 + n2 * pr_.G) * pr_.Dv * static_cast<int64_t>(esz), 0,
                esz * static_cast<size_t>(pr_.G * pr_.Dv));
  }

 private:
  // Steps 1-4 on bf16 pairs (bf16 inputs, KernelTable::gemm.bf16): the same operations with bf16 operands; P is
  // rounded to bf16 half away from zero as the contract rounds it, so the P.V operand is exact.
  void attend_pairs(int64_t b, int64_t t, int64_t n2, const std::vector<Run>& runs, int64_t ne, int64_t nep) {
    const int64_t G = pr_.G, D = pr_.D, Dv = pr_.Dv, dr = dr_;
    constexpr int64_t W = cpu::kPanel;
    const uint16_t* kbase = static_cast<const uint16_t*>(pr_.key.data);
    const uint16_t* vbase = static_cast<const uint16_t*>(pr_.value.data);
    // 1. gather. Keys: up to 64 entries' rows (D bf16, padded to dr) side by side in ktmp16_, then one 32-bit
    //    transpose makes the panel (pair (d, d + 1) of entry c at word (d / 2) 64 + c % 64). Values: entries c, c + 1
    //    (c even) interleaved, element e of the pair at word (e / 64) nep 32 + (c / 2) 64 + e % 64 (low half: c).
    locate(b, n2, runs);
    const int64_t ks = pr_.key.stride[3], vs = pr_.value.stride[3];
    for (int64_t c0 = 0; c0 < nep; c0 += W) {
      const int64_t n = std::min(W, nep - c0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = c0 + i;
        uint16_t* kr = ktmp16_.get() + i * dr;
        if (c >= ne) {  // padding entries: zero keys
          std::memset(kr, 0, sizeof(uint16_t) * static_cast<size_t>(dr));
          continue;
        }
        prefetch_ahead(c);
        const uint16_t* krow = kbase + koff_[static_cast<size_t>(c)];
        if (ks == 1) std::memcpy(kr, krow, sizeof(uint16_t) * static_cast<size_t>(D));
        else
          for (int64_t d = 0; d < D; ++d) kr[d] = krow[d * ks];
        if (dr > D) kr[D] = 0;
      }
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(ktmp16_.get()), dr / 2, n, dr / 2,
                              reinterpret_cast<uint32_t*>(kq16_.get() + (c0 / W) * dr * W), W);
    }
    uint32_t words[cpu::kPanel];
    for (int64_t c = 0; c < nep; c += 2) {
      const uint16_t* va = c < ne ? vbase + voff_[static_cast<size_t>(c)] : nullptr;
      const uint16_t* vb = c + 1 < ne ? vbase + voff_[static_cast<size_t>(c + 1)] : nullptr;
      for (int64_t e0 = 0; e0 < dvp_; e0 += W) {
        const int64_t n = std::max<int64_t>(0, std::min(W, Dv - e0));
        if (va && vb && vs == 1) {  // the common case, a loop that vectorizes
          const uint16_t* a = va + e0;
          const uint16_t* bb = vb + e0;
          for (int64_t i = 0; i < n; ++i) words[i] = static_cast<uint32_t>(a[i]) | (static_cast<uint32_t>(bb[i]) << 16);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const uint32_t lo = va ? va[(e0 + i) * vs] : 0u, hi = vb ? vb[(e0 + i) * vs] : 0u;
            words[i] = lo | (hi << 16);
          }
        }
        for (int64_t i = n; i < W; ++i) words[i] = 0;
        std::memcpy(vo16_.get() + (e0 / W) * nep * W + (c / 2) * 2 * W, words, sizeof(words));
      }
    }
    // 2. scores of the G heads
    const uint16_t* qbase = static_cast<const uint16_t*>(pr_.query.data);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t off = t * pr_.query.stride[0] + (n2 * G + g) * pr_.query.stride[1];
      uint16_t* qa = qa16_.get() + g * dr;
      for (int64_t d = 0; d < D; ++d) qa[d] = qbase[off + d * pr_.query.stride[2]];
      for (int64_t d = D; d < dr; ++d) qa[d] = 0;
    }
    kt_->gemm.bf16(qa16_.get(), dr, G, kq16_.get(), dr * W, 0, nep, dr / 2, dr / 2, s_.get(), nep, pr_.scale, false);
    // 3.-4. softmax statistics, P rounded half away to bf16
    l_.resize(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
      probabilities_row(g, ne, nep, p16_.get() + g * nep, [](float v) { return select_detail::f32_to_bf16_rha(v); });
    kt_->gemm.bf16(p16_.get(), nep, G, vo16_.get(), nep * W, 0, dvp_, nep / 2, nep / 2, o_.get(), dvp_, 1.0f, false);
    store_outputs(t, n2);
  }

  // Steps 1-4 on bf16 pairs with the cache rows read where they lie (bf16 inputs on a path with
  // KernelTable::gemm.pv_bf16, D even, contiguous key and value rows): the same products, sums and roundings as
  // attend_pairs, without packing the keys and values.
  //   scores: the entries in groups of consecutive rows of one page (at most kRun), each group's key rows the A operand
  //     of gemm.bf16 as they lie (lda = the cache's row stride) against the G query rows as B (pair panels, columns
  //     g, zero padded to gp_): the tile S^T[j][g] = (k_j . q_g) scale, the chain over pairs of the untransposed
  //     product, transposed into the score rows; the next group's key rows are prefetched meanwhile;
  //   P.V: gemm.pv_bf16 over the entries' value rows in entry order, one chunk: the chain of attend_pairs' GEMM
  //     without its zero padding pairs (each adds +0 to a sum that is never -0: the same bits).
  void attend_in_place(int64_t b, int64_t t, int64_t n2, const std::vector<Run>& runs, int64_t ne, int64_t nep) {
    const int64_t G = pr_.G, D = pr_.D, dr = dr_, ks = pr_.key.stride[1];
    constexpr int64_t W = cpu::kPanel;
    const uint16_t* kbase = static_cast<const uint16_t*>(pr_.key.data);
    const uint16_t* vbase = static_cast<const uint16_t*>(pr_.value.data);
    locate(b, n2, runs);
    // query rows as B: element (e, g) at (g / 64) dr 64 + (e / 2) 128 + (g % 64) 2 + e % 2, padding columns zero
    const uint16_t* qbase = static_cast<const uint16_t*>(pr_.query.data);
    std::memset(qp16_.get(), 0, sizeof(uint16_t) * static_cast<size_t>(round_up(G, W) * dr));
    const uint16_t* q0 = qbase + t * pr_.query.stride[0] + n2 * G * pr_.query.stride[1];
    if (pr_.query.stride[2] == 1 && D % 2 == 0 && pr_.query.stride[1] % 2 == 0 &&
        reinterpret_cast<uintptr_t>(q0) % 4 == 0) {
      // contiguous rows of D / 2 pairs (32-bit words), panels of dr / 2 words per column
      cpu::transpose_rows_into_panels(*kt_, reinterpret_cast<const uint32_t*>(q0), pr_.query.stride[1] / 2, G, D / 2,
                                      0, dr / 2, reinterpret_cast<uint32_t*>(qp16_.get()));
    } else {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = t * pr_.query.stride[0] + (n2 * G + g) * pr_.query.stride[1];
        uint16_t* col = qp16_.get() + (g / W) * dr * W + (g % W) * 2;
        for (int64_t d = 0; d < D; ++d) col[(d / 2) * 2 * W + d % 2] = qbase[off + d * pr_.query.stride[2]];
      }
    }
    const int64_t key_bytes = D * 2;
    auto group_end = [&](int64_t c) {  // end of the group of consecutive rows starting at entry c
      int64_t e = c + 1;
      while (e < ne && e - c < kRun && koff_[static_cast<size_t>(e)] == koff_[static_cast<size_t>(e - 1)] + ks) ++e;
      return e;
    };
    for (int64_t c = 0, e = ne > 0 ? group_end(0) : 0; c < ne;) {
      const int64_t next_end = e < ne ? group_end(e) : e;
      for (int64_t j = e; j < next_end; ++j) {  // the next group's key rows
        const char* row = reinterpret_cast<const char*>(kbase + koff_[static_cast<size_t>(j)]);
        for (int64_t i = 0; i < key_bytes; i += 64) __builtin_prefetch(row + i);
      }
      float* T = tile_.get();
      kt_->gemm.bf16(kbase + koff_[static_cast<size_t>(c)], ks, e - c, qp16_.get(), dr * W, 0, gp_, dr / 2, dr / 2, T,
                     gp_, pr_.scale, false);
      kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(T), gp_, e - c, G,
                              reinterpret_cast<uint32_t*>(s_.get() + c), nep);
      c = e;
      e = next_end;
    }
    l_.resize(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
      probabilities_row(g, ne, nep, p16_.get() + g * nep, [](float v) { return select_detail::f32_to_bf16_rha(v); });
    for (int64_t c = 0; c < ne; ++c) vrow_[static_cast<size_t>(c)] = vbase + voff_[static_cast<size_t>(c)];
    kt_->gemm.pv_bf16(vrow_.data(), ne, ne, pr_.Dv, p16_.get(), nep, G, o_.get(), dvp_, false, pv_work_.get());
    store_outputs(t, n2);
  }

  // Step 3 on row g of the scores s_ (nep columns, the first ne real): the padding columns set to -inf, m = the row's
  // maximum, the row replaced by exp(s - m) in place and l_[g] = their fp32 sum (KernelTable row kernels, the
  // canonical order). Returns the row.
  const float* softmax_row(int64_t g, int64_t ne, int64_t nep) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    float* line = s_.get() + g * nep;
    std::fill(line + ne, line + nep, neg_inf);
    const float m = kt_->rows.row_max(line, nep, neg_inf);
    l_[static_cast<size_t>(g)] = kt_->rows.exp_sum(line, nep, m);
    return line;
  }

  // Steps 3-4 on row g: softmax_row, then the probabilities P_i = e_i (select: the unnormalised exp values, §4
  // step 4) or e_i / l (window: one IEEE division, window_attention.md §5 step 4) for i < nep (padding: e_i = 0),
  // each stored as out[i] = store(P_i) (the path's rounding to its GEMM operand: float or bf16 bits).
  template <typename T, typename Store>
  void probabilities_row(int64_t g, int64_t ne, int64_t nep, T* out, Store store) {
    const float* line = softmax_row(g, ne, nep);
    const float lsum = l_[static_cast<size_t>(g)];
    if (pr_.mode == Mode::kSelect) {
      for (int64_t i = 0; i < nep; ++i) out[i] = store(line[i]);
    } else {
      for (int64_t i = 0; i < nep; ++i) out[i] = store(line[i] / lsum);
    }
  }

  // 5. the G output rows of token t from the accumulators o_ and the sums l_.
  void store_outputs(int64_t t, int64_t n2) {
    const int64_t G = pr_.G, Dv = pr_.Dv;
    const DType dt = pr_.dtype;
    const std::vector<float>& l = l_;
    for (int64_t g = 0; g < G; ++g) {
      float* o = o_.get() + g * dvp_;
      const int64_t base = (t * pr_.N1 + n2 * G + g) * Dv;
      if (pr_.mode == Mode::kSelect) {
        const float lsum = l[static_cast<size_t>(g)];
        for (int64_t e = 0; e < Dv; ++e) o[e] = o[e] / lsum;
        if (dt == DType::kBF16) {
          uint16_t* dst = static_cast<uint16_t*>(pr_.out) + base;
          for (int64_t e = 0; e < Dv; ++e) dst[e] = detail::f32_to_bf16(o[e]);  // rne_bf16
          continue;
        }
      }
      for (int64_t e = 0; e < Dv; ++e) select_detail::store_rha(pr_.out, base + e, o[e], dt);  // rha_T
    }
  }

  // Element offsets of the entries' key and value rows (head n2), in entry order.
  void locate(int64_t b, int64_t n2, const std::vector<Run>& runs) {
    koff_.clear();
    voff_.clear();
    for (const Run& r : runs)
      for (int64_t pos = r.start; pos < r.end; ++pos) {
        const int64_t page = table_at(pr_.block_table, b, pos / pr_.P), prow = pos % pr_.P;
        koff_.push_back(cache_offset(pr_.key, page, prow, n2));
        voff_.push_back(cache_offset(pr_.value, page, prow, n2));
      }
  }
  // Software prefetch of the key and value rows of entry c + kAhead (rows lie in pages anywhere in the caches:
  // the hardware prefetchers do not follow them).
  void prefetch_ahead(int64_t c) const {
    constexpr int64_t kAhead = 16;
    const size_t n = static_cast<size_t>(c + kAhead);
    if (n >= koff_.size()) return;
    const int64_t esz = static_cast<int64_t>(dtype_size(pr_.dtype));
    auto rows = [&](const PagedCacheView& v, int64_t off, int64_t len) {
      const char* p = static_cast<const char*>(v.data) + off * esz;
      const int64_t bytes = ((len - 1) * v.stride[3] + 1) * esz;
      for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
    };
    rows(pr_.key, koff_[n], pr_.D);
    rows(pr_.value, voff_[n], pr_.Dv);
  }

  // row_[0..n) = the n elements at data + off with element stride `step`, row_[n..n_pad) = 0.
  void load(const PagedCacheView& c, int64_t off, int64_t n, int64_t n_pad) {
    load_from(c.data, off, c.stride[3], n, row_.data());
    std::fill(row_.begin() + n, row_.begin() + n_pad, 0.0f);
  }
  void load_from(const void* data, int64_t off, int64_t step, int64_t n, float* out) const {
    cpu::load_row_f32(kt_, data, off, step, n, pr_.dtype, out);
  }

  const Problem& pr_;
  const cpu::KernelTable* kt_;
  static constexpr int64_t kRun = 64;  // key rows per score GEMM of attend_in_place
  int64_t cap_ = 0, dvp_ = 0, dr_ = 0, gp_ = 0;
  bool pairs_ = false, in_place_ = false;
  detail::AlignedBuffer<float> kq_, vo_, qa_, s_, p_, o_, ktmp_;
  detail::AlignedBuffer<uint16_t> kq16_, vo16_, qa16_, p16_, ktmp16_, qp16_;
  detail::AlignedBuffer<float> tile_, pv_work_;
  std::vector<const uint16_t*> vrow_;
  std::vector<float> row_, l_;
  std::vector<int64_t> koff_, voff_;
};

// The Problem of a validated call. Shape: SelectAttentionInferShape or PagedWindowAttentionShape (the same field
// names); key / value: the caches; scale: the score factor, used as float32.
template <typename Shape>
inline Problem make_problem(const Shape& sh, DType dtype, Mode mode, const Tensor3& query, const PagedCacheView& key,
                            const PagedCacheView& value, const Tensor2& block_table, double scale, void* out) {
  return Problem{.dtype = dtype, .mode = mode, .query = query, .key = key, .value = value,
                 .block_table = block_table, .N1 = sh.N1, .N2 = sh.N2, .G = sh.G, .D = sh.D, .Dv = sh.Dv,
                 .P = sh.page, .scale = static_cast<float>(scale), .out = out};
}

// The CPU driver of both operators: units u = b N2 + n2 (batch b < B, KV head n2 < N2), one task each, on
// min(resolve_num_threads(num_threads), units) threads. Each thread has a TileWorker sized for max_entries entries
// and a run list holding one run; all of them are allocated before the first output is written (an allocation
// failure is an exception before any write). unit(b, n2, worker, runs) writes every output row of the unit,
// filling `runs` (the thread's list) per query token. Each output row has one writer: results do not depend on the
// number of threads.
template <typename Unit>
inline void run_units(const Problem& pr, const cpu::KernelTable* kt, int64_t B, int64_t max_entries, int num_threads,
                      Unit&& unit) {
  const int64_t units = B * pr.N2;
  const int threads = static_cast<int>(
      std::min<int64_t>(cpu::resolve_num_threads(num_threads), std::max<int64_t>(units, 1)));
  std::vector<TileWorker> workers;
  workers.reserve(static_cast<size_t>(threads));
  for (int w = 0; w < threads; ++w) workers.emplace_back(pr, kt, max_entries);
  std::vector<std::vector<Run>> runs(static_cast<size_t>(threads), std::vector<Run>(1));
  cpu::parallel_for(units, threads, [&](int64_t u, int w) {
    unit(u / pr.N2, u % pr.N2, workers[static_cast<size_t>(w)], runs[static_cast<size_t>(w)]);
  });
}

// The optimized CPU entry point of both operators: cpu::run_entry's steps (validation, ISA, the fp64 reference for
// fp64 inputs; workspace errors name "packed key/value tiles"), then the batches' descriptors make_batches(p) and
// the Problem of the validated call (make_problem with mode, the query, the caches key / value, block_table, scale
// and out), run by run_units on the kernels of the resolved ISA: unit(bt, b, n2, worker, runs) writes the rows of
// unit (b, n2), bt being batch b's descriptor.
template <typename Params, typename Shape, typename Batch, typename Unit>
inline Status run_paged_entry(const char* entry, Status (*validate)(const Params&, Shape*),
                              Status (*fp64)(const Params&), std::vector<Batch> (*make_batches)(const Params&),
                              const Params& p, const CpuOptions& options, Mode mode, const Tensor3& query,
                              const PagedCacheView& key, const PagedCacheView& value, const Tensor2& block_table,
                              double scale, void* out, Unit&& unit) {
  return cpu::run_entry(entry, "packed key/value tiles", validate, fp64, p, options,
                        [&](const Shape& sh, CpuIsa isa) {
                          const std::vector<Batch> batches = make_batches(p);
                          const Problem pr =
                              make_problem(sh, p.dtype, mode, query, key, value, block_table, scale, out);
                          run_units(pr, cpu::kernels_for(isa), sh.B, sh.max_entries, options.num_threads,
                                    [&](int64_t b, int64_t n2, TileWorker& tw, std::vector<Run>& runs) {
                                      unit(batches[static_cast<size_t>(b)], b, n2, tw, runs);
                                    });
                          return Status::Ok();
                        });
}

}  // namespace nsa::paged
