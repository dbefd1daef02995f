// Reference of npu_nsa_compress_infer: docs/spec/decode.md §2 in plain loops (single-threaded). The oracle of the
// tests; the CPU backend (cpu.cpp) equals it bit for bit.
#include <cstdint>

#include "common/numeric.h"
#include "common/reference_entry_defs.h"
#include "common/reference_rows.h"
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
        acc = acc + ref::load2_at<Acc>(p.weight, w, n, p.dtype) * ref::load_as<Acc>(p.input, xo, p.dtype);
      }
      // cache[slot_mapping[b], n, j] = rne_T(acc)
      detail::store_f64(p.cache, slot * p.cache_stride[0] + n * p.cache_stride[1] + j * p.cache_stride[2],
                        static_cast<double>(acc), p.dtype);
    }
}

}  // namespace

template <>
template <typename Acc>
void detail::ReferenceEntry<validate_compress_infer>::run(const Params& p, const Shape& sh, DType /*p.dtype*/) {
  for (int64_t b = 0; b < sh.B; ++b) {
    // §2: only batches with S_b >= l and (S_b - l) % d == 0 write; every other batch is untouched
    if (compress_infer_eligible(p.actual_seq_len.data[b], sh.l, sh.d)) compress_batch<Acc>(p, sh, b);
  }
}

template struct detail::ReferenceEntry<validate_compress_infer>;

Status compress_infer_reference(const CompressInferParams& p) {
  return detail::ReferenceEntry<validate_compress_infer>::for_dtype(p);
}

}  // namespace nsa
