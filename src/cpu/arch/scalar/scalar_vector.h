// The scalar "vector" of the ISA layer: VectorBase (src/cpu/arch/vector_base.h) on one float, with the exact fp16
// widening of common/numeric.h (the bf16 one is VectorBase's). The base of every scalar traits struct V: the shared
// KernelTable's (src/cpu/arch/scalar/scalar_traits.h) and the operators' own (src/ops/<op>/kernels_scalar.cpp).
#pragma once

#include <cstdint>

#include "common/numeric.h"
#include "cpu/arch/vector_base.h"

namespace nsa::cpu {

template <typename Self>
struct ScalarVector : VectorBase<float, Self> {
  static float load_f16(const uint16_t* p) { return detail::f16_to_f32(*p); }
};

}  // namespace nsa::cpu
