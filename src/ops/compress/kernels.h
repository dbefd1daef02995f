// Per-ISA row kernels of the compression operator's CPU backend (internal). kernels_impl.h is compiled once
// per ISA (kernels_scalar.cpp with the baseline flags; kernels_avx2.cpp and kernels_avx512.cpp with their own
// flags, x86 only), each into its own namespace, and exports one KernelTable; cpu.cpp (baseline flags) picks
// the table once per call and drives the tasks.
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
  // dt, rounded as `mode` says (no rounding for fp32).
  void (*weighted_rows)(DType dt, const void* const* rows, const float* wts, int64_t m, int64_t D, void* out,
                        Round mode);
  // dots[i] = sum_j g[j] * rows[i][j] for i < m, in the canonical order: 16 partial sums, partial k adding the
  // products of j = k, k+16, k+32, ... in increasing j (starting from 0), then for s = 8, 4, 2, 1:
  // part[k] = part[k] + part[k + s] (k < s); dots[i] = part[0]. g: D floats.
  void (*row_dots)(DType dt, const float* g, const void* const* rows, int64_t m, int64_t D, float* dots);
  // dst[j] = f32(src[j]) for j < D (exact widening).
  void (*widen)(DType dt, const void* src, int64_t D, float* dst);
};

const KernelTable* kernels_scalar();
#if NSA_HAVE_X86_KERNELS
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
#endif

// The table of a runnable path (resolve_isa's result): avx512bf16 uses the avx512 table (no bf16 dot product is
// involved); the scalar table where no SIMD table is compiled in.
const KernelTable* kernels_for(CpuIsa isa);

}  // namespace nsa::compress_kernels
