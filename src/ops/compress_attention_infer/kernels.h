// Per-ISA kernels of the decode compressed attention CPU backend (internal; docs/spec/decode.md §3 step 5) that the
// shared KernelTable (src/cpu/kernels.h) does not provide: the P.V product read from the paged value cache in place.
// kernels_avx512bf16.cpp (x86 only, AVX-512 BF16 flags) holds the bf16 pair version; paths without it pack V into
// the shared GEMM's panels instead (cpu.cpp).
#pragma once

#include <cstdint>

#include "nsa/cpu.h"

namespace nsa::cai_kernels {

// The products of one reduction chunk of O = rne(P).V on bf16 pairs (vdpbf16ps), tokens read in place:
//   T[r][e] = sum over token pairs (2j, 2j + 1), j = 0, 1, ... in order, of one vdpbf16ps step
//             P[r][2j] * V_2j[e] + P[r][2j + 1] * V_2j+1[e]          (fp32 accumulator per (r, e), starting at +0)
//   O[r][e] = accumulate ? O[r][e] + T[r][e] : T[r][e]               for r < R, e < round_up(Dv, 32)
// with V_c = vrow[c] (Dv contiguous bf16 values of token c, c < ntok; an odd last token is paired with zeros) and
// P[r][c] = P[r * ldp + c] (bf16 bits, c < round_up(ntok, 2)), i.e. exactly the chunk of the shared GEMM
// gemm.bf16 (A = P rows, B = V as pair panels, one reduction chunk) without packing V. work: R * round_up(Dv, 64)
// floats of scratch. O row r at O + r * ldo. vrow lists nvalid >= ntok rows: those past ntok (the next chunk's) are
// only prefetched.
using PvBf16Fn = void (*)(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t Dv, const uint16_t* P,
                          int64_t ldp, int64_t R, float* O, int64_t ldo, bool accumulate, float* work);

// The kernel of a resolved CPU path: the AVX-512 BF16 one for CpuIsa::kAvx512Bf16 on x86 builds, else null.
PvBf16Fn pv_bf16_for(CpuIsa isa);

#if NSA_HAVE_X86_KERNELS
void pv_bf16_avx512bf16(const uint16_t* const* vrow, int64_t ntok, int64_t nvalid, int64_t Dv, const uint16_t* P,
                        int64_t ldp, int64_t R, float* O, int64_t ldo, bool accumulate, float* work);
#endif

}  // namespace nsa::cai_kernels
