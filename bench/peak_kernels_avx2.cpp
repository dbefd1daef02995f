// AVX2 kernel of peak_probe: compiled with -mavx2 -mfma (bench/CMakeLists.txt).
#include <immintrin.h>

#include "peak_kernels.h"

namespace peak {

float fp32_fma_256(int64_t iters) {
  volatile float x = 0.999f, y = 0.001f;
  const __m256 a = _mm256_set1_ps(x), c = _mm256_set1_ps(y);
  __m256 acc[kChains256];
#pragma GCC unroll 16
  for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, c);
  }
  __m256 s = acc[0];
  for (int j = 1; j < kChains256; ++j) s = _mm256_add_ps(s, acc[j]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  float r = 0.f;
  for (float v : out) r += v;
  return r;
}

}  // namespace peak
