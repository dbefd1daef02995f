// Portable scalar vector traits ("vectors" of one float) for kernels_impl.h: plain C++, no intrinsics. The
// reference for the ISA paths' operation order: fused multiply-adds via std::fma, nearest-even rounding via
// std::nearbyint, so results equal the SIMD paths bit for bit where the operation order agrees.
// Included inside the namespace of each scalar table (kernels_scalar.cpp, kernels_scalar_fma.cpp), after
// <cmath>, <cstdint>, common/numeric.h, cpu/arch/scalar/scalar_vector.h and cpu/kernels.h at global scope; no
// include guard on purpose.

struct V : nsa::cpu::ScalarVector<V> {
  // GEMM micro-tile 3 rows x 8 columns: the shape that the FMA build's compiler vectorizes best. The blocking never
  // changes a result (each C element is one fma chain over p, whatever the tile).
  static constexpr int kSliceVectors = 8;
  static constexpr int kMaxRows = 3;
  static constexpr bool kStream = false;  // plain stores (store_row_stream falls back to store_row)
  static void stream_line(void*, const float*, nsa::DType) {}  // never called (kStream false)
  static void stream_fence() {}
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }
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
  static int count_ge(const float* p, float v) { return p[0] >= v; }  // number of p[0..1) >= v
  static int count_gt(const float* p, float v) { return p[0] > v; }   // number of p[0..1) > v
  // x where keep[0] != 0, else +0 (backward: masked entries of a tile pair)
  static F keep_bytes(F x, const uint8_t* keep) { return keep[0] != 0 ? x : 0.0f; }
  // value where b[0] != 0, else x (forced selection blocks)
  static F set_where_bytes(F x, const uint8_t* b, float value) { return b[0] != 0 ? value : x; }
};
