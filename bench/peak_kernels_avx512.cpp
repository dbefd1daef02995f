// AVX-512 kernels of peak_probe: compiled with -mavx512f -mavx512bf16 -mfma (bench/CMakeLists.txt).
#include <immintrin.h>

#include "peak_kernels.h"

namespace peak {
namespace {

float sum_lanes(const __m512 (&acc)[kChains512]) {
  __m512 s = acc[0];
  for (int j = 1; j < kChains512; ++j) s = _mm512_add_ps(s, acc[j]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  float r = 0.f;
  for (float v : lanes) r += v;
  return r;
}

}  // namespace

float bf16_dp_512(int64_t iters) {
  // b = -a pairwise (a0*b0 + a1*b1 = x*y - x*y = 0): the accumulators stay finite and constant,
  // and the unit does the full work regardless of the values.
  volatile float x = 1.5f, y = 0.75f;
  const __m512 lo = _mm512_set1_ps(x), hi = _mm512_set1_ps(y);
  const __m512bh a = _mm512_cvtne2ps_pbh(lo, lo);
  const __m512bh b = _mm512_cvtne2ps_pbh(hi, _mm512_sub_ps(_mm512_setzero_ps(), hi));
  __m512 acc[kChains512];
#pragma GCC unroll 32
  for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 32
    for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  }
  return sum_lanes(acc);
}

float fp32_fma_512(int64_t iters) {
  // acc = acc * a + c with a < 1: converges to c / (1 - a), never overflows or goes denormal.
  volatile float x = 0.999f, y = 0.001f;
  const __m512 a = _mm512_set1_ps(x), c = _mm512_set1_ps(y);
  __m512 acc[kChains512];
#pragma GCC unroll 32
  for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 32
    for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, c);
  }
  return sum_lanes(acc);
}

}  // namespace peak
