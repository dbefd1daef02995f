// Test support shared by the operators' C++ tests (namespace nsa_test): the dtypes, rounding a double to a dtype
// and its ulp, the CPU ISA paths this host runs, and tensors / masks materialized in a dtype with any memory
// layout (permuted dims, padding, inner step, zero strides). Padding is filled with NaN (tensors) or 0xFF (masks)
// so that a backend reading it is caught.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/numeric.h"
#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa_test {

using nsa::CpuIsa;
using nsa::DType;

inline const DType kAllDtypes[] = {DType::kBF16, DType::kF16, DType::kF32, DType::kF64};

// ------------------------------------------------------------------------------------ numerics

// x rounded to the dtype (nearest even), as a double.
inline double round_to(DType dt, double x) {
  switch (dt) {
    case DType::kBF16: return nsa::detail::bf16_to_f32(nsa::detail::f32_to_bf16(static_cast<float>(x)));
    case DType::kF16: return nsa::detail::f16_to_f32(nsa::detail::f32_to_f16(static_cast<float>(x)));
    case DType::kF32: return static_cast<float>(x);
    case DType::kF64: return x;
  }
  return x;
}

// One unit in the last place of the dtype at magnitude |x| (subnormal spacing below the normals).
inline double ulp_of(DType dt, double x) {
  int prec = 53, emin = -1022;
  switch (dt) {
    case DType::kBF16: prec = 8; emin = -126; break;
    case DType::kF16: prec = 11; emin = -14; break;
    case DType::kF32: prec = 24; emin = -126; break;
    case DType::kF64: break;
  }
  int e = 0;
  x = std::fabs(x);
  if (x > 0 && std::isfinite(x)) std::frexp(x, &e);  // x = f * 2^e, f in [0.5, 1)
  else e = emin + 1;
  if (e < emin + 1) e = emin + 1;
  return std::ldexp(1.0, e - prec);
}

inline std::vector<CpuIsa> supported_isas() {
  std::vector<CpuIsa> out;
  for (int i = 0; i <= static_cast<int>(CpuIsa::kAvx512Bf16); ++i)
    if (nsa::cpu_isa_supported(static_cast<CpuIsa>(i))) out.push_back(static_cast<CpuIsa>(i));
  return out;
}

// ------------------------------------------------------------------------------------ layouts

// Memory layout of a 3-D input. order lists the logical dims from outermost to innermost in
// memory; pad adds elements per logical dim; step is the stride of the innermost dim;
// zero_dim (0..2) gets stride 0 (the data must then be constant along it), -1 for none.
struct Layout3 {
  std::array<int, 3> order{{0, 1, 2}};
  std::array<int64_t, 3> pad{{0, 0, 0}};
  int64_t step = 1;
  int zero_dim = -1;
};

// Memory layout of a 2-D mask: transposed stores [cols][rows]; pad adds elements per logical dim.
struct Layout2 {
  bool transposed = false;
  std::array<int64_t, 2> pad{{0, 0}};
};

// A dtype buffer holding a logical [s0][s1][s2] array in a Layout3.
struct Storage3 {
  std::vector<unsigned char> bytes;
  nsa::Tensor3 view;
};

inline void materialize3(const std::vector<double>& vals, const int64_t size[3], const Layout3& lay, DType dt,
                         Storage3* out) {
  int64_t ext[3], stride[3];
  for (int i = 0; i < 3; ++i) ext[i] = (lay.zero_dim == i) ? 1 : size[i] + lay.pad[i];
  int64_t s = lay.step;
  for (int idx = 2; idx >= 0; --idx) {
    const int dim = lay.order[idx];
    stride[dim] = (lay.zero_dim == dim) ? 0 : s;
    s *= ext[dim];
  }
  const size_t es = nsa::dtype_size(dt);
  out->bytes.assign(static_cast<size_t>(std::max<int64_t>(s, 1)) * es, 0xFF);  // all-ones = NaN in every dtype
  for (int64_t i = 0; i < size[0]; ++i)
    for (int64_t j = 0; j < size[1]; ++j)
      for (int64_t k = 0; k < size[2]; ++k) {
        const double x = vals[static_cast<size_t>((i * size[1] + j) * size[2] + k)];
        nsa::detail::store_f64(out->bytes.data(), i * stride[0] + j * stride[1] + k * stride[2], x, dt);
      }
  out->view.data = out->bytes.data();
  for (int i = 0; i < 3; ++i) {
    out->view.size[i] = size[i];
    out->view.stride[i] = stride[i];
  }
}

struct Storage2 {
  std::vector<uint8_t> bytes;
  nsa::Mask2 view;
};

inline void materialize2(const std::vector<uint8_t>& vals, int64_t rows, int64_t cols, const Layout2& lay,
                         Storage2* out) {
  const int64_t er = rows + lay.pad[0], ec = cols + lay.pad[1];
  out->bytes.assign(static_cast<size_t>(std::max<int64_t>(er * ec, 1)), 0xFF);
  int64_t sr, sc;
  if (lay.transposed) {
    sc = er;
    sr = 1;
  } else {
    sr = ec;
    sc = 1;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out->bytes[static_cast<size_t>(r * sr + c * sc)] = vals[static_cast<size_t>(r * cols + c)];
  out->view.data = out->bytes.data();
  out->view.size[0] = rows;
  out->view.size[1] = cols;
  out->view.stride[0] = sr;
  out->view.stride[1] = sc;
}

}  // namespace nsa_test
