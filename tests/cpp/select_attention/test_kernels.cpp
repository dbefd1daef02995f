// The selected-attention row kernels (src/ops/select_attention/kernels.h) on every ISA table this host runs,
// against rounding.h's scalar roundings element by element (identical bits): ties, subnormal fp16 results, values
// that round to inf, NaN, signed zeros, random values over many binades, and lengths that are not multiples of
// any vector width. Plus rounding.h's fp16 rha against an independent double-precision rounding.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/numeric.h"
#include "ops/select_attention/kernels.h"
#include "ops/select_attention/rounding.h"
#include "select_util.h"

namespace sel_test {
namespace {

using nsa::select_kernels::PMode;
namespace sd = nsa::select_detail;

std::vector<float> probe_values() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, FLT_MAX, -FLT_MAX, FLT_MIN, 1e-40f, -1e-40f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(), 65504.0f, 65519.0f, 65520.0f, -65520.0f,
                          std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(3.0f, -25), std::ldexp(1.0f, -14),
                          std::ldexp(1023.5f, -24), nsa::detail::bits_f32(0x3f808000u), nsa::detail::bits_f32(0xbf808000u),
                          1.0f + 1.0f / 2048.0f, -(1.0f + 3.0f / 2048.0f)};
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 3000; ++i) v.push_back(nsa::detail::bits_f32(bits(rng)));  // every binade, NaN payloads
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (int i = 0; i < 3000; ++i) v.push_back(std::ldexp(u(rng), -static_cast<int>(i % 40)));
  for (uint32_t t = 0; t < 512; ++t) {  // exact bf16 and fp16 ties near 1 and in the fp16 subnormals
    v.push_back(nsa::detail::bits_f32(0x3f800000u + (t << 16) + 0x8000u));
    v.push_back(std::ldexp(static_cast<float>(2 * t + 1), -25));
  }
  v.push_back(1.0f);  // an odd length: 3000 + 3000 + 1024 + 27
  return v;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)); }

TEST(SelectKernels, EveryTableEqualsTheScalarRoundings) {
  const std::vector<float> x = probe_values();
  const int64_t n = static_cast<int64_t>(x.size());
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::select_kernels::Table* t = nsa::select_kernels::table_for(isa);
    for (float l : {1.0f, 3.0f, 0.37f}) {
      std::vector<uint16_t> bits(static_cast<size_t>(n));
      std::vector<float> f(static_cast<size_t>(n));
      t->normalize_rha(x.data(), n, l, bits.data(), PMode::kBf16Bits);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(bits[static_cast<size_t>(i)], sd::f32_to_bf16_rha(x[static_cast<size_t>(i)] / l)) << "x " << x[static_cast<size_t>(i)] << " l " << l;
      t->normalize_rha(x.data(), n, l, f.data(), PMode::kF32Bf16);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_TRUE(same_bits(f[static_cast<size_t>(i)], sd::round_rha(x[static_cast<size_t>(i)] / l, DType::kBF16))) << x[static_cast<size_t>(i)];
      t->normalize_rha(x.data(), n, l, f.data(), PMode::kF32F16);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_TRUE(same_bits(f[static_cast<size_t>(i)], sd::round_rha(x[static_cast<size_t>(i)] / l, DType::kF16))) << x[static_cast<size_t>(i)];
      t->normalize_rha(x.data(), n, l, f.data(), PMode::kF32);
      for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(same_bits(f[static_cast<size_t>(i)], x[static_cast<size_t>(i)] / l));
    }
    for (float alpha : {1.0f, 0.125f, 3.5f}) {
      std::vector<uint16_t> h(static_cast<size_t>(n));
      std::vector<float> f(static_cast<size_t>(n));
      t->store_rha(x.data(), n, alpha, h.data(), DType::kBF16);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(h[static_cast<size_t>(i)], sd::f32_to_bf16_rha(x[static_cast<size_t>(i)] * alpha));
      t->store_rha(x.data(), n, alpha, h.data(), DType::kF16);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(h[static_cast<size_t>(i)], sd::f32_to_f16_rha(x[static_cast<size_t>(i)] * alpha)) << "x " << x[static_cast<size_t>(i)] << " alpha " << alpha;
      t->store_rha(x.data(), n, alpha, f.data(), DType::kF32);
      for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(same_bits(f[static_cast<size_t>(i)], x[static_cast<size_t>(i)] * alpha));
    }
    std::vector<uint16_t> pairs(static_cast<size_t>(2 * n));
    const std::vector<float> y(x.rbegin(), x.rend());
    t->pack_pairs_rha(x.data(), y.data(), n, pairs.data());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(pairs[static_cast<size_t>(2 * i)], sd::f32_to_bf16_rha(x[static_cast<size_t>(i)]));
      ASSERT_EQ(pairs[static_cast<size_t>(2 * i + 1)], sd::f32_to_bf16_rha(y[static_cast<size_t>(i)]));
    }
    t->pack_pairs_rha(x.data(), nullptr, n, pairs.data());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(pairs[static_cast<size_t>(2 * i)], sd::f32_to_bf16_rha(x[static_cast<size_t>(i)]));
      ASSERT_EQ(pairs[static_cast<size_t>(2 * i + 1)], 0);
    }
  }
}

// rounding.h's integer fp16 rha against half-away-from-zero rounding done in double (every 4099th bit pattern).
TEST(SelectKernels, Fp16RhaMatchesADoublePrecisionRounding) {
  int64_t checked = 0;
  for (uint64_t u = 0; u < (uint64_t(1) << 32); u += 4099) {
    const float x = nsa::detail::bits_f32(static_cast<uint32_t>(u));
    const uint16_t got = sd::f32_to_f16_rha(x);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    if (std::isnan(x)) {
      ASSERT_EQ(got, sign | 0x7e00);
      continue;
    }
    const double a = std::fabs(static_cast<double>(x));
    uint16_t want;
    if (a >= 65520.0) {
      want = sign | 0x7c00;
    } else {
      const double ulp = a < std::ldexp(1.0, -14) ? std::ldexp(1.0, -24) : std::ldexp(1.0, std::ilogb(a) - 10);
      const double q = a / ulp;
      double r = std::floor(q);
      if (q - r >= 0.5) r += 1;
      want = static_cast<uint16_t>(sign | nsa::detail::f32_to_f16(static_cast<float>(r * ulp)));
    }
    ASSERT_EQ(got, want) << "x = " << x;
    ++checked;
  }
  EXPECT_GT(checked, 1000000);
}

}  // namespace
}  // namespace sel_test
