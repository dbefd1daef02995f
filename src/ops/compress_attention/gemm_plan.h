// GEMM operand choices of compressed attention on the CPU (internal), shared by the training forward
// (compress_attention/cpu_forward.cpp) and the decode operator (compress_attention_infer/cpu.cpp), whose two GEMMs
// S = (Q.K^T) * scale and O = rne(P).V have the same operands (src/cpu/kernels.h layouts).
#pragma once

#include <cstdint>

#include "common/aligned_buffer.h"
#include "cpu/kernels.h"
#include "nsa/common.h"

namespace nsa::detail {

// Fills the GEMM fields of a CPU plan `pl` whose kernel table pl.kt is already chosen, for inputs of dtype `dtype`,
// head dimensions D (queries and keys) and Dv (values) and at most max_c compressed tokens per batch:
//   bf16_dot  bf16 inputs on a table with the bf16 dot product: both GEMMs on bf16 pairs (vdpbf16ps), else fp32 FMA;
//   pstore    how the softmax stores P for P.V: bf16 bits (bf16_dot), fp32 holding P rounded to the input dtype (bf16,
//             fp16 on fp32 GEMMs), or fp32 P unrounded (fp32 inputs);
//   scale     scale_value as fp32 (applied to the fp32 dot product);
//   qk_red    reduction length of Q.K^T: D elements, or (D + 1) / 2 pairs (odd D padded with one zero element);
//   q_lda     elements per packed query row: D, or 2 * qk_red (even) for pairs;
//   d2p       Dv rounded up to the panel width (64 columns);
//   cp_max    max_c rounded up to the panel width.
template <typename Plan>
inline void set_gemm_plan(Plan& pl, DType dtype, double scale_value, int64_t D, int64_t Dv, int64_t max_c) {
  using cpu::PStore;
  pl.bf16_dot = dtype == DType::kBF16 && pl.kt->gemm.bf16 != nullptr;
  pl.pstore = pl.bf16_dot                 ? PStore::kBf16Bits
              : dtype == DType::kBF16     ? PStore::kF32AsBf16
              : dtype == DType::kF16      ? PStore::kF32AsF16
                                          : PStore::kF32;
  pl.scale = static_cast<float>(scale_value);
  pl.qk_red = pl.bf16_dot ? (D + 1) / 2 : D;
  pl.q_lda = pl.bf16_dot ? 2 * pl.qk_red : D;
  pl.d2p = round_up(Dv, cpu::kPanel);
  pl.cp_max = round_up(max_c, cpu::kPanel);
}

}  // namespace nsa::detail
