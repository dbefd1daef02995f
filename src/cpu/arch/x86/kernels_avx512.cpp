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
  static const KernelTable table = {
      .isa = CpuIsa::kAvx512,
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
