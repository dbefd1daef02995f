// Per-ISA row kernels of the selected-attention CPU backend (internal): the conversions the operator rounds half
// away from zero (rounding.h), which the shared KernelTable (src/cpu/kernels.h, nearest-even stores) does not
// provide. kernels_impl.h holds their bodies as plain loops over rounding.h's integer formulas; it is compiled
// once per ISA (kernels_scalar.cpp with the baseline flags; kernels_avx2.cpp and kernels_avx512.cpp with their
// own flags, x86 only), each into its own namespace, so that the compiler vectorizes them for that ISA. Every
// operation is exact or a single IEEE rounding (one division or one multiplication, then integer code): every
// table gives identical bits.
#pragma once

#include <cstdint>

#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa::select_kernels {

// How normalize_rha stores P.
enum class PMode : int {
  kBf16Bits = 0,   // bf16 bits of rha_bf16(P) (the bf16 dot-product GEMM's operand)
  kF32Bf16 = 1,    // float holding rha_bf16(P)
  kF32F16 = 2,     // float holding rha_f16(P)
  kF32 = 3,        // float P (fp32 inputs)
};

struct Table {
  CpuIsa isa;
  // P = x[i] / l (one IEEE division) stored as `mode` says into out[i], i < n.
  void (*normalize_rha)(const float* x, int64_t n, float l, void* out, PMode mode);
  // pairs[2i] = bits of rha_bf16(a[i]), pairs[2i + 1] = bits of rha_bf16(b[i]) (0 where b is null), i < n.
  void (*pack_pairs_rha)(const float* a, const float* b, int64_t n, uint16_t* pairs);
  // out[i] = rha_T(x[i] * alpha) (one IEEE multiplication) for T = dt (bf16 / fp16 bits, fp32 as float), i < n.
  void (*store_rha)(const float* x, int64_t n, float alpha, void* out, DType dt);

  // The instance built with each ISA's flags (src/cpu/isa_tables.h): kernels_scalar.cpp, kernels_avx2.cpp and
  // kernels_avx512.cpp (the last two in x86 builds only).
  static const Table* scalar();
  static const Table* avx2();
  static const Table* avx512();
};

// The table for a resolved CPU path, as cpu::table_for_isa picks it (avx512bf16 uses the AVX-512 table).
const Table* table_for(CpuIsa isa);

}  // namespace nsa::select_kernels
