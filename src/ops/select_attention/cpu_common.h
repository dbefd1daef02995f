// Pieces shared by the CPU forward and backward of selected attention (docs/spec/select_attention.md), internal.
//
// Two arithmetic paths, chosen once per call:
//   pairs (kPairs = true):  bf16 inputs on an ISA with KernelTable::gemm.bf16 (vdpbf16ps). Operands are bf16 bits,
//                           reductions run over pairs of elements (products exact, sums in fp32).
//   fp32  (kPairs = false): every other dtype and ISA (bf16 without a bf16 dot product, fp16, fp32), through
//                           KernelTable::gemm.f32 on fp32 operands. (fp64 inputs take the fp64 reference.)
// U = 2 (pairs) or 1 (fp32) elements per reduction unit; E = uint16_t (bf16 bits) or float.
//
// Packed key blocks. Selection block x of (batch b, KV head n2) covers the batch's key positions [x l', (x+1) l')
// (§2). Each block that some visible entry reaches is packed once per call into GEMM B operands (src/cpu/kernels.h
// layouts, panels of 64 columns, zero padded), with lpp = l' rounded up to 16 and only its valid keys (positions
// < Skv_b) filled, so that keys past the batch's end are zeros and never read from the tensors:
//   KQ [ceil(lpp/64) panels][Dr][64]  key block as the B operand of S = Q K^T   (reduction over D, columns = keys)
//   VO [Dvp/64 panels][lpp][64]        value block as the B operand of O = P V (reduction over keys, columns = Dv)
//   VD [ceil(lpp/64) panels][Dvr][64]  value block as the B operand of dP = dO V^T (backward)
//   KT [Dp/64 panels][lpp][64]         key block as the B operand of dQ = dS K   (backward)
// In each, the reduction index p and the column c of a panel are stored at (p / U) 64 U + c U + p % U (for U = 2
// the bf16 pairs of vdpbf16ps). Dr, Dvr: D, Dv rounded up to U; Dp, Dvp: rounded up to 64.
//
// Entries of a query tile. A tile is (batch, KV head, consecutive query rows); its GEMM rows are (row i of the
// tile, head g of the group), r = i G + g. Every slot (i, j) with at least one visible entry (§3) is an entry of the
// tile; entries are grouped by block in first-appearance order (rows ascending, then slots): the union of the
// blocks the tile reaches. A block's entries share its packed operands in one GEMM (their Q rows gathered), which
// is what keeps the B operand hot when the G heads alone are few (G = 1). A slot repeated in a row (a duplicate,
// §6) is a separate entry, so it counts twice as the contract requires.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/forward_params.h"
#include "common/numeric.h"
#include "common/threads.h"
#include "cpu/entry.h"
#include "cpu/kernels.h"
#include "nsa/select_attention.h"
#include "ops/select_attention/kernels.h"
#include "ops/select_attention/cpu.h"
#include "ops/select_attention/batches.h"
#include "ops/select_attention/rounding.h"

namespace nsa::select_cpu {

using select_detail::BatchInfo;
using cpu::KernelTable;
using cpu::kPanel;

using detail::round_up;

// 64-byte aligned buffer (common/aligned_buffer.h); std::bad_alloc when memory runs out (the entry points turn it
// into a Status).
template <typename T>
using AlignedBuf = detail::AlignedBuffer<T>;

// Sizes of a validated call (the shape; block = l') and of the packed operands.
struct Geo : SelectAttentionShape {
  int64_t lpp = 0;             // l' rounded up to 16: columns of a block in score rows, P.V reduction length
  int64_t npb = 0;             // panels of 64 keys per block (ceil(lpp / 64))
  int64_t Dr = 0, Dvr = 0;     // D, Dv rounded up to U
  int64_t Dp = 0, Dvp = 0;     // D, Dv rounded up to 64
  int64_t kq = 0, vo = 0, vd = 0, kt = 0;  // elements of each packed operand of one block (0 when not packed)
  int64_t block_elems = 0;     // kq + vo + vd + kt
};

inline Geo make_geo(const SelectAttentionShape& sh, bool pairs, bool backward) {
  Geo g{sh};
  const int64_t U = pairs ? 2 : 1;
  g.lpp = round_up(sh.block, 16);
  g.npb = (g.lpp + kPanel - 1) / kPanel;
  g.Dr = round_up(sh.D, U);
  g.Dvr = round_up(sh.Dv, U);
  g.Dp = round_up(sh.D, kPanel);
  g.Dvp = round_up(sh.Dv, kPanel);
  g.kq = g.npb * g.Dr * kPanel;
  if (backward) {
    g.vd = g.npb * g.Dvr * kPanel;
    g.kt = g.Dp * g.lpp;
  } else {
    g.vo = g.Dvp * g.lpp;
  }
  g.block_elems = g.kq + g.vo + g.vd + g.kt;
  return g;
}

// The GEMMs of both paths with reduction lengths in elements (multiples of U) and E operands.
template <bool kPairs>
struct Path {
  using E = typename std::conditional<kPairs, uint16_t, float>::type;
  static constexpr int64_t U = kPairs ? 2 : 1;
  // C[r][c] (+)= alpha sum_p A[r][p] B[p][col0 + c], r < R, c < ncols (a multiple of 16), p < red.
  static void gemm(const KernelTable* kt, const E* A, int64_t lda, int64_t R, const E* B, int64_t panel_stride,
                   int64_t col0, int64_t ncols, int64_t red, float* C, int64_t ldc, float alpha, bool accumulate) {
    if (R <= 0 || ncols <= 0) return;
    if constexpr (kPairs) {
      kt->gemm.bf16(A, lda, R, B, panel_stride, col0, ncols, red / 2, red / 2, C, ldc, alpha, accumulate);
    } else {
      kt->gemm.f32(A, lda, R, B, panel_stride, col0, ncols, red, red, C, ldc, alpha, accumulate);
    }
  }
  // The same with the rows of A and C given by pointers (GemmKernels::f32_gather / bf16_gather): A rows may repeat,
  // C rows are distinct.
  static void gemm_gather(const KernelTable* kt, const E* const* a_rows, int64_t R, const E* B, int64_t panel_stride,
                          int64_t col0, int64_t ncols, int64_t red, float* const* c_rows, float alpha,
                          bool accumulate) {
    if (R <= 0 || ncols <= 0) return;
    if constexpr (kPairs) {
      kt->gemm.bf16_gather(a_rows, R, B, panel_stride, col0, ncols, red / 2, red / 2, c_rows, alpha, accumulate);
    } else {
      kt->gemm.f32_gather(a_rows, R, B, panel_stride, col0, ncols, red, red, c_rows, alpha, accumulate);
    }
  }
  // Element (p, c) of a packed B operand whose panels hold `red` reduction elements (red a multiple of U).
  static int64_t b_index(int64_t p, int64_t c, int64_t red) {
    return (c / kPanel) * red * kPanel + (p / U) * kPanel * U + (c % kPanel) * U + p % U;
  }
  // x rounded half away from zero to the input dtype as an operand: bf16 bits (pairs), else a float holding
  // rha_T(x) (bf16 / fp16) or x (fp32).
  static E rha(float x, DType dt) {
    if constexpr (kPairs) {
      return select_detail::f32_to_bf16_rha(x);
    } else {
      return select_detail::round_rha(x, dt);
    }
  }
  static float value(E x) {
    if constexpr (kPairs) {
      return detail::bf16_to_f32(x);
    } else {
      return x;
    }
  }
};

// Row of a tensor (t, h) as operand elements: bf16 bits (pairs) or floats; out[n..n_pad) = 0.
template <bool kPairs>
inline void load_operand_row(const KernelTable* kt, const Tensor3& x, DType dt, int64_t row, int64_t head, int64_t n,
                             int64_t n_pad, typename Path<kPairs>::E* out) {
  const int64_t off = row * x.stride[0] + head * x.stride[1];
  if constexpr (kPairs) {
    const uint16_t* src = static_cast<const uint16_t*>(x.data) + off;
    if (x.stride[2] == 1) std::memcpy(out, src, sizeof(uint16_t) * static_cast<size_t>(n));
    else
      for (int64_t k = 0; k < n; ++k) out[k] = src[k * x.stride[2]];
  } else {
    if (x.stride[2] == 1 && dt != DType::kF64) {
      kt->rows.load_row(static_cast<const char*>(x.data) + off * static_cast<int64_t>(dtype_size(dt)), out, n, dt);
    } else {
      for (int64_t k = 0; k < n; ++k) out[k] = detail::load_f32(x.data, off + k * x.stride[2], dt);
    }
  }
  for (int64_t k = n; k < n_pad; ++k) out[k] = 0;
}

// Whether an operand element is inf or NaN.
template <bool kPairs>
inline bool non_finite(typename Path<kPairs>::E v) {
  if constexpr (kPairs) {
    return (v & 0x7f80u) == 0x7f80u;
  } else {
    return !std::isfinite(v);
  }
}

// Packed blocks of a call: the blocks some visible entry reaches, in (batch, block, KV head) order.
struct BlockTable {
  std::vector<int64_t> first;   // per batch: global id of its block 0 (ids: (first[b] + x) * N2 + n2)
  std::vector<int64_t> slot;    // per id: index among the packed blocks, or -1 (not reached: not packed)
  std::vector<uint8_t> dirty_k, dirty_v;  // per packed block: a valid key / value element is inf or NaN
  std::vector<int64_t> packed_id;  // per packed block: its id
  int64_t n_ids = 0;
  int64_t id(int64_t b, int64_t x, int64_t n2, int64_t N2) const { return (first[static_cast<size_t>(b)] + x) * N2 + n2; }
};

// Calls fn(b, s, n2, j, x, v) for every slot j < K of every query row s of every batch b (batch-local rows, in
// the order b, s, n2, j ascending) whose block x = index (b's row s, KV head n2, slot j) has v > 0 visible keys (§3).
template <typename Fn>
inline void for_each_visible_slot(const SelectAttentionParams& p, const Geo& g, const std::vector<BatchInfo>& batches,
                                  Fn&& fn) {
  for (size_t b = 0; b < batches.size(); ++b) {
    const BatchInfo& bi = batches[b];
    for (int64_t s = 0; s < bi.sq; ++s)
      for (int64_t n2 = 0; n2 < g.N2; ++n2)
        for (int64_t j = 0; j < g.K; ++j) {
          const int64_t x = select_detail::index_at(p, bi.q_begin + s, n2, j);
          const int64_t v = select_detail::visible_count(x, s, bi.skv, g.block, p.causal);
          if (v > 0) fn(static_cast<int64_t>(b), s, n2, j, x, v);
        }
  }
}

// What Forward and Backward hold of a validated call (their base): the ISA's kernels and its rha conversions
// (select_kernels), the thread count (at least 1), the shape with the sizes of the path (Geo; pairs: the bf16 pairs
// path), the score factor (float32), whether G >= kDirectMinG runs each entry's GEMMs on its tile rows in
// place (direct), the batches and the block table.
//
// From G = kDirectMinG on, the G rows of an entry alone fill the GEMM micro-kernel (6 rows): each entry's GEMMs run
// on its rows in place. Below it, a block's entries are gathered into one GEMM (their rows copied) so that the
// packed block is reused across query rows.
constexpr int64_t kDirectMinG = 8;
struct CallState {
  CallState(const SelectAttentionParams& f, const SelectAttentionShape& sh, const KernelTable* kt, int threads,
            bool pairs, bool backward)
      : kt_(kt), threads_(std::max(1, threads)), g_(make_geo(sh, pairs, backward)),
        scale_(static_cast<float>(f.scale_value)), sk_(select_kernels::table_for(kt->isa)),
        direct_(g_.G >= kDirectMinG) {}
  // A tuning knob's value, or `dflt` where it is 0 (unset).
  static int64_t tuned(int64_t knob, int64_t dflt) { return knob > 0 ? knob : dflt; }
  // Query rows of a tile of about `rows` GEMM rows (query rows x G): rows / G rounded to nearest, at least 1.
  int64_t tokens_for_rows(int64_t rows) const { return std::max<int64_t>(1, (rows + g_.G / 2) / g_.G); }
  // Query rows of a query tile: about `knob` GEMM rows (when set; else direct_rows from G = kDirectMinG on,
  // gathered_rows below it), at most the longest batch (max Sq_b), at least 1.
  int64_t tile_tokens(int64_t knob, int64_t direct_rows, int64_t gathered_rows) const {
    return std::min(tokens_for_rows(tuned(knob, direct_ ? direct_rows : gathered_rows)),
                    std::max<int64_t>(g_.max_sq, 1));
  }

  // The batches of the call and its block table (mark_blocks); returns the number of packed blocks.
  int64_t mark(const SelectAttentionParams& f);

  // Packed block id (BlockTable::packed_id) to its batch b, block x and KV head n2.
  void decode(int64_t id, int64_t* b, int64_t* x, int64_t* n2) const {
    *n2 = id % g_.N2;
    const int64_t gb = id / g_.N2;
    *b = static_cast<int64_t>(std::upper_bound(bt_.first.begin(), bt_.first.end(), gb) - bt_.first.begin()) - 1;
    // empty batches share their `first` with the next one: upper_bound finds the last batch starting at or
    // before gb, which is the one that owns block gb
    *x = gb - bt_.first[static_cast<size_t>(*b)];
  }

  // Packs the i-th reached block (bt_.packed_id[i]) into packs + i * block_elems (pack_block, below) and records
  // whether its K / V hold non-finite values. stage: stage_elems() elements of the calling worker.
  template <bool kPairs>
  void pack(const SelectAttentionParams& f, int64_t i, typename Path<kPairs>::E* packs,
            typename Path<kPairs>::E* stage);
  int64_t stage_elems() const { return g_.lpp * std::max(g_.Dr, g_.Dvr); }

  // The query tiles of the call, batch by batch, bq query rows each (the last one of a batch shorter), and KV head:
  // fn(b, s0, s1, n2, visible), rows [s0, s1) of batch b, with `visible` the number of visible entries of those rows
  // (a tile's cost).
  template <typename Fn>
  void for_each_tile(const SelectAttentionParams& f, int64_t bq, Fn&& fn) const {
    for (size_t b = 0; b < batches_.size(); ++b) {
      const BatchInfo& bi = batches_[b];
      for (int64_t s0 = 0; s0 < bi.sq; s0 += bq) {
        const int64_t s1 = std::min(bi.sq, s0 + bq);
        for (int64_t n2 = 0; n2 < g_.N2; ++n2) {
          int64_t visible = 0;
          for (int64_t s = s0; s < s1; ++s)
            for (int64_t j = 0; j < g_.K; ++j)
              visible += select_detail::visible_count(select_detail::index_at(f, bi.q_begin + s, n2, j), s, bi.skv,
                                                      g_.block, f.causal);
          fn(static_cast<int64_t>(b), s0, s1, n2, visible);
        }
      }
    }
  }

  const KernelTable* kt_;
  int threads_;
  Geo g_;
  float scale_;
  const select_kernels::Table* sk_;
  bool direct_;
  std::vector<BatchInfo> batches_;
  BlockTable bt_;
};

// The entry point of either direction (cpu::run_entry: validation, ISA, the fp64 reference `fp64` for fp64 inputs,
// exceptions as an error naming `entry`), whose optimized path returns at once where the driver has nothing to write
// (Driver<false>::nothing_to_write(shape)), refuses sizes whose workspace byte counts could overflow 64-bit
// arithmetic (products of D, K, select_block_size and N1; only reachable with stride-0 views of a small buffer), then
// runs the driver (Forward / Backward) with the call's CallState on its arithmetic path (see the top of this file):
// Driver<true>, bf16 pairs, for bf16 inputs on an ISA with KernelTable::gemm.bf16; Driver<false>, fp32 operands,
// otherwise.
template <template <bool> class Driver, typename Params>
inline Status run_entry(const char* entry, const char* workspace,
                        Status (*validate)(const Params&, SelectAttentionShape*), Status (*fp64)(const Params&),
                        const Params& p, const CpuOptions& options, const Tuning& tuning) {
  return cpu::run_entry(entry, workspace, validate, fp64, p, options,
                        [&](const SelectAttentionShape& sh, CpuIsa isa) {
                          if (Driver<false>::nothing_to_write(sh)) return Status::Ok();
                          constexpr int64_t kMaxDim = int64_t(1) << 20;
                          if (sh.D > kMaxDim || sh.K > kMaxDim || sh.block > kMaxDim || sh.N1 > kMaxDim)
                            return Status::Error(std::string(entry) +
                                                 ": sizes too large for the CPU backend's workspace (D, K, "
                                                 "select_block_size and N1 must be < 2^20)");
                          const KernelTable* kt = cpu::kernels_for(isa);
                          const SelectAttentionParams& f = detail::forward_params(p);
                          const bool pairs = f.dtype == DType::kBF16 && kt->gemm.bf16 != nullptr;
                          constexpr bool kBackward = std::is_same_v<Params, SelectAttentionGradParams>;
                          const CallState state(f, sh, kt, cpu::resolve_num_threads(options.num_threads), pairs,
                                                kBackward);
                          if (pairs)
                            Driver<true>(p, state, tuning).run();
                          else
                            Driver<false>(p, state, tuning).run();
                          return Status::Ok();
                        });
}

// Marks the blocks that some visible entry reaches (one pass over the indices, O(T1 N2 K)) and numbers them.
inline void mark_blocks(const SelectAttentionParams& p, const Geo& g, const std::vector<BatchInfo>& batches,
                        BlockTable& bt) {
  bt.first.resize(batches.size());
  int64_t total = 0;
  for (size_t b = 0; b < batches.size(); ++b) {
    bt.first[b] = total;
    total += batches[b].blocks;
  }
  bt.n_ids = total * g.N2;
  bt.slot.assign(static_cast<size_t>(bt.n_ids), -1);
  for_each_visible_slot(p, g, batches, [&](int64_t b, int64_t, int64_t n2, int64_t, int64_t x, int64_t) {
    bt.slot[static_cast<size_t>(bt.id(b, x, n2, g.N2))] = 0;
  });
  int64_t n = 0;
  for (int64_t i = 0; i < bt.n_ids; ++i)
    if (bt.slot[static_cast<size_t>(i)] == 0) {
      bt.slot[static_cast<size_t>(i)] = n++;
      bt.packed_id.push_back(i);
    }
  bt.dirty_k.assign(static_cast<size_t>(n), 0);
  bt.dirty_v.assign(static_cast<size_t>(n), 0);
}

// Rows [0, valid) of block x of (batch bi, KV head n2) of a key or value tensor as operand elements (bf16 bits on
// the pairs path, fp32 otherwise), row c at ptr + c * ld, n elements then zeros up to n_pad: read in place where
// the tensor's rows are already that (contiguous, no padding, 32-bit aligned words), else staged in `stage`
// (valid * n_pad elements, allocated by the caller).
template <bool kPairs>
struct BlockRows {
  const typename Path<kPairs>::E* ptr;
  int64_t ld;
};

template <bool kPairs>
BlockRows<kPairs> block_rows(const KernelTable* kt, const Tensor3& t, DType dt, int64_t row0, int64_t n2,
                             int64_t valid, int64_t n, int64_t n_pad, typename Path<kPairs>::E* stage) {
  using E = typename Path<kPairs>::E;
  const int64_t off = row0 * t.stride[0] + n2 * t.stride[1];
  const bool same_type = kPairs ? dt == DType::kBF16 : dt == DType::kF32;  // pairs: bf16 inputs only
  if (same_type && t.stride[2] == 1 && n == n_pad && (!kPairs || t.stride[0] % 2 == 0)) {
    const E* ptr = static_cast<const E*>(t.data) + off;
    if (reinterpret_cast<uintptr_t>(ptr) % 4 == 0) return {ptr, t.stride[0]};
  }
  for (int64_t c = 0; c < valid; ++c)
    load_operand_row<kPairs>(kt, t, dt, row0 + c, n2, n, n_pad, stage + c * n_pad);
  return {stage, n_pad};
}

// Whether one of the first n elements of `valid` rows is inf or NaN.
template <bool kPairs>
bool any_non_finite(const BlockRows<kPairs>& r, int64_t valid, int64_t n) {
  constexpr int64_t kAhead = 4;  // rows prefetched ahead: the first reads of a block's rows come from memory
  const int64_t line = 64 / static_cast<int64_t>(sizeof(typename Path<kPairs>::E));
  for (int64_t c = 0; c < std::min(kAhead, valid); ++c)
    for (int64_t d = 0; d < n; d += line) __builtin_prefetch(r.ptr + c * r.ld + d);
  bool bad = false;
  for (int64_t c = 0; c < valid; ++c) {
    const typename Path<kPairs>::E* row = r.ptr + c * r.ld;
    if (c + kAhead < valid)
      for (int64_t d = 0; d < n; d += line) __builtin_prefetch(row + kAhead * r.ld + d);
    unsigned acc = 0;  // OR of the row's flags (a branch-free loop)
    for (int64_t d = 0; d < n; ++d) acc |= non_finite<kPairs>(row[d]);
    bad |= acc != 0;
  }
  return bad;
}

// Rows [0, valid) as the B operand of a product reducing over them (KT, VO): element (row c, column d < n) at
// panels[P::b_index(c, d, red)]; columns are in panels of 64, rows in units of U (bf16 pairs: the word of rows
// 2i, 2i + 1 holds row 2i in its low half, a missing last partner is 0). The other elements are left as they are.
template <bool kPairs>
void rows_into_reduction_panels(const BlockRows<kPairs>& r, int64_t valid, int64_t n, int64_t red,
                                typename Path<kPairs>::E* panels) {
  for (int64_t d0 = 0; d0 < n; d0 += kPanel) {
    const int64_t m = std::min(kPanel, n - d0);
    if constexpr (kPairs) {
      uint32_t* out = reinterpret_cast<uint32_t*>(panels + (d0 / kPanel) * red * kPanel);
      for (int64_t c = 0; c < valid; c += 2) {
        const uint16_t* a = r.ptr + c * r.ld + d0;
        uint32_t* w = out + (c / 2) * kPanel;
        if (c + 1 < valid) {
          const uint16_t* b = a + r.ld;
          for (int64_t e = 0; e < m; ++e) w[e] = static_cast<uint32_t>(a[e]) | static_cast<uint32_t>(b[e]) << 16;
        } else {
          for (int64_t e = 0; e < m; ++e) w[e] = a[e];
        }
      }
    } else {
      float* out = panels + (d0 / kPanel) * red * kPanel;
      for (int64_t c = 0; c < valid; ++c)
        std::memcpy(out + c * kPanel, r.ptr + c * r.ld + d0, sizeof(float) * static_cast<size_t>(m));
    }
  }
}

// Packs block x of (batch bi, KV head n2) into dst (g.block_elems elements: KQ, VO, VD, KT in this order, each
// present when its size is not 0) and reports non-finite valid elements of K and V. KQ and VD take the rows as
// panel columns (one transpose per 64 keys), KT and VO as reduction rows; keys past the block's valid ones stay 0.
// stage: lpp * max(Dr, Dvr) elements (block_rows).
template <bool kPairs>
void pack_block(const KernelTable* kt, const SelectAttentionParams& p, const Geo& g, const BatchInfo& bi, int64_t x,
                int64_t n2, typename Path<kPairs>::E* dst, uint8_t* dirty_k, uint8_t* dirty_v,
                typename Path<kPairs>::E* stage) {
  using P = Path<kPairs>;
  using E = typename P::E;
  constexpr int64_t U = P::U;
  std::memset(dst, 0, sizeof(E) * static_cast<size_t>(g.block_elems));
  E* kq = dst;
  E* vo = kq + g.kq;
  E* vd = vo + g.vo;
  E* ktp = vd + g.vd;
  const int64_t valid = std::min(g.block, bi.skv - x * g.block);  // keys of the block below Skv_b
  const int64_t row0 = bi.k_begin + x * g.block;
  const BlockRows<kPairs> k = block_rows<kPairs>(kt, p.key, p.dtype, row0, n2, valid, g.D, g.Dr, stage);
  *dirty_k = any_non_finite(k, valid, g.D);
  transpose_rows_into_panels(*kt, reinterpret_cast<const uint32_t*>(k.ptr), k.ld / U, valid, g.Dr / U, 0, g.Dr / U,
                             reinterpret_cast<uint32_t*>(kq));
  if (g.kt) rows_into_reduction_panels(k, valid, g.D, g.lpp, ktp);
  const BlockRows<kPairs> v = block_rows<kPairs>(kt, p.value, p.dtype, row0, n2, valid, g.Dv, g.Dvr, stage);
  *dirty_v = any_non_finite(v, valid, g.Dv);
  if (g.vo) rows_into_reduction_panels(v, valid, g.Dv, g.lpp, vo);
  if (g.vd)
    transpose_rows_into_panels(*kt, reinterpret_cast<const uint32_t*>(v.ptr), v.ld / U, valid, g.Dvr / U, 0,
                               g.Dvr / U, reinterpret_cast<uint32_t*>(vd));
}

// The entries of a query tile grouped by block (see the header comment).
struct TileEntries {
  detail::LineVector<int64_t> x;      // [rows * K]: block of slot (i, j), -1 when the slot has no visible entry
  detail::LineVector<int32_t> vis;    // [rows * K]: its visible entries (a prefix of the block, §3)
  detail::LineVector<int64_t> nvis;   // [rows]: visible entries of row i (0: a row without visible entry, §6)
  detail::LineVector<int32_t> map;    // [max_blocks]: block -> position in the union, -1 otherwise (reset after use)
  detail::LineVector<int64_t> ublock; // blocks of the union in first-appearance order
  detail::LineVector<int32_t> ustart; // [union + 1]: their entries are ent[ustart[u] .. ustart[u+1])
  detail::LineVector<int32_t> ent;    // entries i K + j, grouped by block, rows ascending then slots within a block
  int64_t n_entries = 0;

  void init(int64_t max_rows, int64_t K, int64_t max_blocks) {
    x.resize(static_cast<size_t>(max_rows * K));
    vis.resize(static_cast<size_t>(max_rows * K));
    nvis.resize(static_cast<size_t>(max_rows));
    map.assign(static_cast<size_t>(std::max<int64_t>(max_blocks, 1)), -1);
    ublock.reserve(static_cast<size_t>(std::min(max_blocks, max_rows * K)));
    ustart.reserve(static_cast<size_t>(std::min(max_blocks, max_rows * K) + 1));
    ent.resize(static_cast<size_t>(max_rows * K));
  }

  // Rows [s0, s0 + rows) of batch bi (local positions), KV head n2.
  void build(const SelectAttentionParams& p, const BatchInfo& bi, int64_t n2, int64_t s0, int64_t rows, int64_t K,
             int64_t lp) {
    ublock.clear();
    ustart.clear();
    auto& count = ustart;  // counts first, then (shifted) start offsets
    n_entries = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t s = s0 + i;
      int64_t total = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t xx = select_detail::index_at(p, bi.q_begin + s, n2, j);
        const int64_t v = select_detail::visible_count(xx, s, bi.skv, lp, p.causal);
        const size_t e = static_cast<size_t>(i * K + j);
        x[e] = v > 0 ? xx : -1;
        vis[e] = static_cast<int32_t>(v);
        total += v;
        if (v > 0) {
          int32_t& u = map[static_cast<size_t>(xx)];
          if (u < 0) {
            u = static_cast<int32_t>(ublock.size());
            ublock.push_back(xx);
            count.push_back(0);
          }
          ++count[static_cast<size_t>(u)];
          ++n_entries;
        }
      }
      nvis[static_cast<size_t>(i)] = total;
    }
    // counts -> start offsets (ustart[u] = entries of the blocks before u), then fill in (i, j) order
    int32_t acc = 0;
    for (int32_t& c : count) {
      const int32_t n = c;
      c = acc;
      acc += n;
    }
    count.push_back(acc);
    auto& pos = count;  // running fill position per block: advanced, then restored below
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < K; ++j) {
        const size_t e = static_cast<size_t>(i * K + j);
        if (x[e] < 0) continue;
        const int32_t u = map[static_cast<size_t>(x[e])];
        ent[static_cast<size_t>(pos[static_cast<size_t>(u)]++)] = static_cast<int32_t>(i * K + j);
      }
    // pos[u] now holds the end of block u = the start of block u + 1: shift back
    for (size_t u = ublock.size(); u > 0; --u) pos[u] = pos[u - 1];
    pos[0] = 0;
    for (int64_t xx : ublock) map[static_cast<size_t>(xx)] = -1;
  }
  int64_t blocks() const { return static_cast<int64_t>(ublock.size()); }
};

inline int64_t CallState::mark(const SelectAttentionParams& f) {
  batches_ = select_detail::make_batches(f);
  mark_blocks(f, g_, batches_, bt_);
  return static_cast<int64_t>(bt_.packed_id.size());
}

template <bool kPairs>
void CallState::pack(const SelectAttentionParams& f, int64_t i, typename Path<kPairs>::E* packs,
                     typename Path<kPairs>::E* stage) {
  int64_t b, x, n2;
  decode(bt_.packed_id[static_cast<size_t>(i)], &b, &x, &n2);
  pack_block<kPairs>(kt_, f, g_, batches_[static_cast<size_t>(b)], x, n2, packs + i * g_.block_elems,
                     &bt_.dirty_k[static_cast<size_t>(i)], &bt_.dirty_v[static_cast<size_t>(i)], stage);
}

// Block u of a query tile's union (block x of batch b, KV head n2): its packed slot, the keys it holds inside the
// batch (valid = min(l', Skv_b - x l')) and its entries e[0..ne) (i K + j, see TileEntries).
struct UnionBlock {
  int64_t x, slot, valid;
  const int32_t* e;
  int64_t ne;
};
inline UnionBlock union_block(const TileEntries& te, int64_t u, const BlockTable& bt, const Geo& g, const BatchInfo& bi,
                              int64_t b, int64_t n2) {
  const size_t uu = static_cast<size_t>(u);
  const int64_t x = te.ublock[uu];
  return UnionBlock{x, bt.slot[static_cast<size_t>(bt.id(b, x, n2, g.N2))], std::min(g.block, bi.skv - x * g.block),
                    te.ent.data() + te.ustart[uu], te.ustart[uu + 1] - te.ustart[uu]};
}

// Whether two of the n entries ids[0..n) (s K + j, in row order) share a row s: duplicate indices of one block.
inline bool has_repeated_row(const int32_t* ids, int64_t n, int64_t K) {
  for (int64_t e = 1; e < n; ++e)
    if (ids[e] / K == ids[e - 1] / K) return true;
  return false;
}

// The union blocks of tile te (batch bi = batches[b], KV head n2) in order, each with its entries in GEMM chunks of
// up to min(cap, 1024) entry ids (i K + j, the block's order): chunk(ub, ids, n). Where the block is dirty
// (dirty[ub.slot] != 0: an inf or NaN among the valid elements of the packed operand the caller reads), an entry that
// sees only part of the block goes to scalar(ub, ij) instead, alone: in a GEMM the zero weight of an invisible column
// would meet its non-finite value (0 x inf = NaN).
template <typename Scalar, typename Chunk>
void for_each_entry_chunk(const TileEntries& te, const BlockTable& bt, const Geo& g, const BatchInfo& bi, int64_t b,
                          int64_t n2, const std::vector<uint8_t>& dirty, int64_t cap, Scalar&& scalar, Chunk&& chunk) {
  int32_t ids[1024];
  cap = std::min<int64_t>(cap, 1024);
  for (int64_t u = 0; u < te.blocks(); ++u) {
    const UnionBlock ub = union_block(te, u, bt, g, bi, b, n2);
    const bool is_dirty = dirty[static_cast<size_t>(ub.slot)] != 0;
    int64_t c0 = 0;
    while (c0 < ub.ne) {
      int64_t n = 0, taken = 0;
      for (; c0 + taken < ub.ne && n < cap; ++taken) {
        const int32_t ij = ub.e[c0 + taken];
        if (is_dirty && te.vis[static_cast<size_t>(ij)] < ub.valid)
          scalar(ub, ij);
        else
          ids[n++] = ij;
      }
      c0 += taken;
      if (n > 0) chunk(ub, ids, n);
    }
  }
}

}  // namespace nsa::select_cpu
