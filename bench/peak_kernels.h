// Peak-throughput kernels of peak_probe (internal to bench/). Each kernel runs `iters` iterations of
// NACC independent accumulator chains of one instruction, so the loop is limited by the instruction's
// throughput, not its latency. Each returns a value derived from the accumulators so that the
// compiler cannot drop the work. Every kernel lives in a file compiled with its own ISA flags; call it
// only after peak_probe.cpp's cpuid/XCR0 check says the ISA is usable.
#pragma once

#include <cstdint>

namespace peak {

// Independent chains per kernel (enough to cover latency x issue width on Zen 4/5 and Intel cores).
constexpr int kChains512 = 24;  // zmm: 24 accumulators + 2 operands fit in 32 registers
constexpr int kChains256 = 12;  // ymm without AVX-512VL: 12 accumulators + 2 operands fit in 16

// vdpbf16ps zmm: 16 fp32 lanes x 2 bf16 products, each a multiply and an add = 64 FLOP.
float bf16_dp_512(int64_t iters);
// vfmadd zmm (fp32): 16 lanes x 2 = 32 FLOP.
float fp32_fma_512(int64_t iters);
// vfmadd ymm (fp32, AVX2): 8 lanes x 2 = 16 FLOP.
float fp32_fma_256(int64_t iters);

}  // namespace peak
