// Portable scalar kernels (baseline flags; "vectors" of one float). The reference for the
// ISA paths' operation order: fused multiply-adds via std::fma, nearest-even rounding via
// std::nearbyint, so results equal the SIMD paths bit for bit where the operation order agrees.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/numeric.h"
#include "cpu/kernels.h"

namespace nsa::cpu::isa_scalar {

struct V {
  using F = float;
  static constexpr int W = 1;
  static constexpr int kSliceVectors = 16;  // 16 columns per slice
  static constexpr int kMaxRows = 4;
  static constexpr bool kStream = false;  // plain stores (store_row_stream falls back to store_row)
  static void stream64(void*, const void*) {}
  static void stream_fence() {}
  static F zero() { return 0.0f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float x) { return x; }
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F max(F a, F b) { return a > b ? a : b; }  // NaN in either -> b (as maxps)
  static F min(F a, F b) { return a < b ? a : b; }  // NaN in either -> b (as minps)
  static F rint(F x) { return std::nearbyint(x); }
  static F pow2(F n) { return detail::bits_f32(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23); }
  // p * 2^n with n split in two factors: p * 2^n1 is exact (normal range), the second product
  // rounds once, so the result equals a single-rounding scaling (as vscalefps).
  static F scale2(F p, F n) {
    const F n1 = rint(mul(n, set1(0.5f)));
    return mul(mul(p, pow2(n1)), pow2(sub(n, n1)));
  }
  static F keep_nan(F x, F r) { return x != x ? x : r; }
  static F inf_above(F x, F hi, F r) { return x > hi ? __builtin_inff() : r; }
  static F round_bf16(F x) { return detail::bf16_to_f32(detail::f32_to_bf16(x)); }
  static F round_f16(F x) { return detail::f16_to_f32(detail::f32_to_f16(x)); }
  static void store_bf16_bits(uint16_t* p, F v) { *p = static_cast<uint16_t>(detail::f32_bits(v) >> 16); }
  static void store_f16(uint16_t* p, F v) { *p = detail::f32_to_f16(v); }
  static F load_bf16(const uint16_t* p) { return detail::bf16_to_f32(*p); }
  static F load_f16(const uint16_t* p) { return detail::f16_to_f32(*p); }
  static float reduce_max(F v, float init) { return v > init ? v : init; }
  static int count_ge(const float* p, float v) { return p[0] >= v; }  // number of p[0..1) >= v
  // x where keep[0] != 0, else +0 (backward: masked entries of a tile pair)
  static F keep_bytes(F x, const uint8_t* keep) { return keep[0] != 0 ? x : 0.0f; }
};

#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_scalar

namespace nsa::cpu {
const KernelTable* kernels_scalar() {
  namespace k = isa_scalar;
  static const KernelTable table = {
      .isa = CpuIsa::kScalar,
      .gemm =
          {
              .f32 = k::gemm_f32_impl,
              .bf16 = nullptr,
          },
      .rows =
          {
              .row_max = k::row_max_impl,
              .exp_sum = k::exp_sum_impl,
              .normalize_row = k::normalize_row_impl,
              .normalize_group = k::normalize_group_impl,
              .box_sum = k::box_sum_impl,
              .add_row = k::add_row_impl,
              .store_row = k::store_row_impl,
              .store_row_stream = k::store_row_stream_impl,
              .stream_fence = k::stream_fence_impl,
              .load_row = k::load_row_impl,
          },
      .select =
          {
              .top_k = k::top_k_impl,
          },
      .grad =
          {
              .softmax_grad_row = k::softmax_grad_row_impl,
              .pack_rows_bf16 = nullptr,
              .transpose_u16 = k::transpose_u16_impl,
              .transpose_u32 = k::transpose_u32_impl,
          },
  };
  return &table;
}
}  // namespace nsa::cpu
