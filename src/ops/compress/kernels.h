// Per-ISA row kernels of the compression operator's CPU backend (internal). kernels_impl.h is compiled once
// per ISA (kernels_scalar.cpp with the baseline flags; kernels_avx2.cpp, kernels_avx512.cpp and
// kernels_avx512bf16.cpp with their own flags, x86 only), each into its own namespace, and exports one KernelTable;
// cpu.cpp (baseline flags) picks the table once per call (kernels_for) and drives the tasks.
//
// Arithmetic contract shared by every table (so that all ISA paths give identical bits): fp32 products and
// sums, each product rounded and then added (no fused multiply-add: these sources are compiled with
// -ffp-contract=off), in the order stated per function; vectorization is across independent elements only.
// Rows are contiguous runs of D elements of the dtype (bf16 / fp16 / fp32; fp64 has its own generic code in
// cpu.cpp). The roundings are those of rounding.h, lane by lane.
#pragma once

#include <cstdint>

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa::compress_kernels {

enum class Round : int {
  kAway = 0,  // rha: the forward's output (§4)
  kEven = 1,  // rne: the gradients (§6)
};

struct KernelTable {
  CpuIsa isa;
  // out[j] = round(acc_j), acc_j = (...((0 + wts[0]*rows[0][j]) + wts[1]*rows[1][j]) + ...) + wts[m-1]*rows[m-1][j]
  // for j < D: a weighted sum of m rows, added in row order (m == 0 writes zeros). out: D contiguous elements of
  // dt, rounded as `mode` says (no rounding for fp32). (The forward: one output row from its window's l rows.)
  // pf != 0: each row's D elements at rows[i] + pf bytes are prefetched (a later window's rows; the address need
  // not be valid).
  void (*weighted_rows)(DType dt, const void* const* rows, const float* wts, int64_t m, int64_t D, void* out,
                        Round mode, int64_t pf);
  // Two windows d rows apart (1 <= d <= l) that share l - d rows: rows[0 .. l + d) hold the rows of window A
  // (rows[0 .. l)) and of window B (rows[d .. d + l)), both weighted by wts[0 .. l); out_a and out_b receive
  // exactly what weighted_rows gives for (rows, wts, l) and (rows + d, wts, l) (the same products added in the same
  // order), with each row read once for both windows. pf: as weighted_rows (rows[i] + pf for every i).
  void (*weighted_rows2)(DType dt, const void* const* rows, const float* wts, int64_t l, int64_t d, int64_t D,
                         void* out_a, void* out_b, Round mode, int64_t pf);
  // The same for P output rows that share their m source rows, given widened to fp32 (rows32[i][j], j < D), each
  // with its own weights: out + p*out_stride (elements of dt) receives round(sum_i wts[i][p] * rows32[i][j]) added
  // in the order i = 0, 1, ..., m-1 from +0. (input_grad: a run of tokens covered by the same windows; wts[i] points
  // at the run's first token's weight in window i, the next tokens' weights following it.)
  // stream: the rows' whole vectors are written with non-temporal stores (bypassing the caches, without reading the
  // lines first) where the table has them (bf16 and fp32 on the x86 tables; fp16 and the scalar table store as
  // usual). Requires out and out_stride * element size to be multiples of 64 bytes; the caller runs store_fence
  // before another thread reads the rows. The same values are written either way.
  void (*weighted_rows_shared)(DType dt, const float* const* rows32, const float* const* wts, int64_t P, int64_t m,
                               int64_t D, void* out, int64_t out_stride, Round mode, bool stream);
  // 16 interleaved partial sums of the dot products of g with m rows: lanes[i*16 + k] += g[j] * rows[i][j] for
  // j = k, k+16, k+32, ... < D, in increasing j (each product rounded, then added). g: D floats; rows: D elements
  // of dt. Called row after row on the same lanes, then reduced with canonical16 (weight_grad).
  void (*dot_lanes)(DType dt, const float* g, const void* const* rows, int64_t m, int64_t D, float* lanes);
  // Two windows d rows apart (1 <= d <= l) over rows[0 .. l + d) (window A: rows[0 .. l), window B: rows[d .. d + l)):
  // exactly dot_lanes(dt, ga, rows, l, D, lanes) followed by dot_lanes(dt, gb, rows + d, l, D, lanes) (lane
  // set w receives window A's row w before window B's row w), with each row read and widened once for both.
  void (*dot_lanes2)(DType dt, const float* ga, const float* gb, const void* const* rows, int64_t l, int64_t d,
                     int64_t D, float* lanes);
  // dst[j] = f32(src[j]) for j < D (exact widening).
  void (*widen)(DType dt, const void* src, int64_t D, float* dst);
  // Orders this thread's non-temporal stores (weighted_rows_shared with stream) before its later stores (sfence on
  // x86; nothing in the scalar table, which has none).
  void (*store_fence)();

  // The instance built with each ISA's flags (src/cpu/isa_tables.h): kernels_scalar.cpp, kernels_avx2.cpp and
  // kernels_avx512.cpp (the last two in x86 builds only).
  static const KernelTable* scalar();
  static const KernelTable* avx2();
  static const KernelTable* avx512();
  // kernels_avx512bf16.cpp: the avx512 kernels with the gradients' bf16 stores by vcvtne2ps2bf16 (x86 builds only).
  static const KernelTable* avx512bf16();
};

// The canonical reduction of 16 partial sums: for s = 8, 4, 2, 1: part[k] = part[k] + part[k + s] (k < s);
// returns part[0] (part is overwritten).
template <typename F>
inline F canonical16(F* part) {
  for (int s = 8; s >= 1; s /= 2)
    for (int k = 0; k < s; ++k) part[k] = part[k] + part[k + s];
  return part[0];
}

// The table of a runnable path (resolve_isa's result): avx512bf16 for the avx512bf16 path, otherwise as
// cpu::table_for_isa picks it (the scalar table where no SIMD table is compiled in).
const KernelTable* kernels_for(CpuIsa isa);

}  // namespace nsa::compress_kernels
