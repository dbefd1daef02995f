// Rows of a tensor of the storage dtypes widened to float32 for the CPU drivers (internal).
#pragma once

#include <cstdint>

#include "common/numeric.h"
#include "cpu/kernels.h"
#include "nsa/common.h"

namespace nsa::cpu {

// out[k] = float(element off + k step of data), k < n (offsets and step in elements of dt; exact widening).
// Contiguous rows (step 1) go through the ISA's KernelTable::rows.load_row, others element by element.
inline void load_row_f32(const KernelTable* kt, const void* data, int64_t off, int64_t step, int64_t n, DType dt,
                         float* out) {
  if (step == 1) {
    kt->rows.load_row(static_cast<const char*>(data) + off * static_cast<int64_t>(dtype_size(dt)), out, n, dt);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = detail::load_f32(data, off + k * step, dt);
  }
}

}  // namespace nsa::cpu
