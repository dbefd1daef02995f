// AVX-512F kernels (fp32 FMA GEMM). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq.
#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace nsa::cpu::isa_avx512 {
#include "cpu/arch/x86/avx512_traits.h"
#include "cpu/kernels_impl.h"
}  // namespace nsa::cpu::isa_avx512

namespace nsa::cpu {
const KernelTable* kernels_avx512() {
  namespace k = isa_avx512;
  static const KernelTable table = {CpuIsa::kAvx512, k::gemm_f32_impl, nullptr, k::row_max_impl,
                                    k::exp_sum_impl, k::normalize_row_impl, k::box_sum_impl, k::add_row_impl,
                                    k::store_row_impl, k::load_row_impl,
                                    k::softmax_grad_row_impl, nullptr, k::transpose_u16_impl,
                                    k::transpose_u32_impl, k::normalize_group_impl, k::store_row_stream_impl, k::stream_fence_impl,
                                    k::top_k_impl};
  return &table;
}
}  // namespace nsa::cpu
