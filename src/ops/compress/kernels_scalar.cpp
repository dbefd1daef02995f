// Compression kernels with baseline flags ("vectors" of one float): the path of non-x86 machines and of
// NSA_CPU_ISA=scalar, and the definition of the operation order that the SIMD paths repeat lane by lane.
#include <cstdint>

#include "common/numeric.h"
#include "ops/compress/kernels.h"
#include "ops/compress/rounding.h"

namespace nsa::compress_kernels::isa_scalar {

struct V {
  using F = float;
  static constexpr int W = 1;
  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F load_f32(const float* p) { return *p; }
  static F load_bf16(const uint16_t* p) { return detail::bf16_to_f32(*p); }
  static F load_f16(const uint16_t* p) { return detail::f16_to_f32(*p); }
  static void store_f32(float* p, F v) { *p = v; }
  static void store_bf16(uint16_t* p, F v, bool away) {
    *p = away ? compress_detail::f32_to_bf16_rha(v) : compress_detail::f32_to_bf16_rne(v);
  }
  static void store_f16(uint16_t* p, F v, bool away) {
    *p = away ? compress_detail::f32_to_f16_rha(v) : compress_detail::f32_to_f16_rne(v);
  }
};

#include "ops/compress/kernels_impl.h"

}  // namespace nsa::compress_kernels::isa_scalar

namespace nsa::compress_kernels {

const KernelTable* kernels_scalar() {
  static const KernelTable t{CpuIsa::kScalar, &isa_scalar::weighted_rows_impl, &isa_scalar::weighted_rows_shared_impl,
                             &isa_scalar::dot_lanes_impl,
                             &isa_scalar::widen_impl};
  return &t;
}

const KernelTable* kernels_for(CpuIsa isa) {
#if NSA_HAVE_X86_KERNELS
  switch (isa) {
    case CpuIsa::kAvx2: return kernels_avx2();
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16: return kernels_avx512();
    default: break;
  }
#else
  (void)isa;
#endif
  return kernels_scalar();
}

}  // namespace nsa::compress_kernels
