// Reference of npu_nsa_compress_infer: docs/spec/decode.md §2 in plain loops (single-threaded). The oracle of the
// tests; the CPU backend (cpu.cpp) equals it bit for bit.
#include <cstdint>

#include "common/numeric.h"
#include "nsa/compress_infer.h"

namespace nsa {
namespace {

// §2 step by step for one eligible batch b, in Acc arithmetic (float; double for fp64 inputs).
template <typename Acc>
void compress_batch(const CompressInferParams& p, const CompressInferShape& sh, int64_t b) {
  const int64_t S = p.actual_seq_len.data[b], l = sh.l, P = sh.P;
  const int32_t* table = p.block_table + b * p.block_table_row_stride;
  const int64_t slot = p.slot_mapping[b];
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t j = 0; j < sh.D; ++j) {
      // acc[n, j] = sum_{w<l} f32(weight[w, n]) * f32(token S_b - l + w)[n, j], fp32 accumulation, w = 0, 1, ...
      Acc acc = 0;
      for (int64_t w = 0; w < l; ++w) {
        const int64_t pos = S - l + w;                         // raw token of batch b
        const int64_t page = table[pos / P], row = pos % P;    // stored at input[block_table[b, p / P], p % P]
        const int64_t xo = page * p.input_stride[0] + row * p.input_stride[1] + n * p.input_stride[2] +
                           j * p.input_stride[3];
        const int64_t wo = w * p.weight.stride[0] + n * p.weight.stride[1];
        Acc wt, x;
        if constexpr (sizeof(Acc) == 8) {
          wt = detail::load_f64(p.weight.data, wo, p.dtype);
          x = detail::load_f64(p.input, xo, p.dtype);
        } else {
          wt = detail::load_f32(p.weight.data, wo, p.dtype);
          x = detail::load_f32(p.input, xo, p.dtype);
        }
        acc = acc + wt * x;
      }
      // cache[slot_mapping[b], n, j] = rne_T(acc)
      detail::store_f64(p.cache, slot * p.cache_stride[0] + n * p.cache_stride[1] + j * p.cache_stride[2],
                        static_cast<double>(acc), p.dtype);
    }
}

}  // namespace

Status compress_infer_reference(const CompressInferParams& p) {
  CompressInferShape sh;
  const Status st = validate_compress_infer(p, &sh);
  if (!st.ok()) return st;
  for (int64_t b = 0; b < sh.B; ++b) {
    // §2: only batches with S_b >= l and (S_b - l) % d == 0 write; every other batch is untouched
    if (!compress_infer_eligible(p.actual_seq_len.data[b], sh.l, sh.d)) continue;
    if (p.dtype == DType::kF64) compress_batch<double>(p, sh, b);
    else compress_batch<float>(p, sh, b);
  }
  return Status::Ok();
}

}  // namespace nsa
