// Optimized CPU backend of npu_nsa_compress_infer (docs/spec/decode.md §2).
//
// Units: (eligible batch, head n), handed to the threads in order. A unit's l window rows (raw tokens
// [S_b - l, S_b) of head n, D elements each) are located through the block table; rows whose last dimension is
// contiguous are read in place, other views are first gathered into a packed l x D tile of the worker. The
// compression operator's per-ISA row kernel (compress_kernels::weighted_rows, vectorized over j) then forms
//   cache[slot_mapping[b], n, j] = rne_T( sum_{w<l} weight[w, n] * row_w[j] )
// adding the products in the order w = 0, 1, ..., l-1 without fused multiply-adds: the reference's operations,
// so every ISA path and every thread count writes the reference's bits. Work per call: l * N * D multiply-adds
// per eligible batch, independent of the context length. Each cache row has one writer (slots are distinct, §2).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/numeric.h"
#include "common/threads.h"
#include "cpu/entry.h"
#include "nsa/compress_infer.h"
#include "ops/compress/kernels.h"

namespace nsa {
namespace {

using compress_kernels::KernelTable;
using compress_kernels::Round;

constexpr int64_t kUnitsPerRun = 16;                // units a worker takes at a time
constexpr int64_t kBytesPerWorker = int64_t(1) << 16;  // window bytes that pay for starting one more worker

struct Scratch {
  std::vector<const void*> rows;          // the window's l row pointers
  std::vector<unsigned char> tile;        // l x D gathered elements (views with a strided last dimension)
  std::vector<unsigned char> out;         // D elements (caches with a strided last dimension)
  std::vector<float> wts32;               // weight[:, n] widened
  std::vector<double> wts64;
};

}  // namespace

Status compress_infer_cpu(const CompressInferParams& p, const CpuOptions& options) {
  CompressInferShape sh;
  CpuIsa isa;
  const Status st = cpu::validate_and_resolve(validate_compress_infer, p, options, &sh, &isa);
  if (!st.ok()) return st;
  if (sh.eligible == 0 || sh.N == 0 || sh.D == 0) return Status::Ok();
  const KernelTable* kt = compress_kernels::kernels_for(isa);
  const DType dt = p.dtype;
  const bool f64 = dt == DType::kF64;
  const int64_t esz = static_cast<int64_t>(dtype_size(dt)), l = sh.l, P = sh.P, D = sh.D, N = sh.N;

  std::vector<int64_t> batches;  // the eligible batches, in order
  for (int64_t b = 0; b < sh.B; ++b)
    if (compress_infer_eligible(p.actual_seq_len.data[b], sh.l, sh.d)) batches.push_back(b);
  const int64_t units = static_cast<int64_t>(batches.size()) * N;
  const int64_t bytes = units * l * D * esz;
  const int workers = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(cpu::resolve_num_threads(options.num_threads)), units,
                            std::max<int64_t>(1, bytes / kBytesPerWorker)})));
  const bool gather = p.input_stride[3] != 1, scatter = p.cache_stride[2] != 1;
  std::vector<Scratch> scratch(static_cast<size_t>(workers));  // allocated before anything is written
  for (Scratch& s : scratch) {
    s.rows.resize(static_cast<size_t>(l));
    if (gather) s.tile.resize(static_cast<size_t>(l * D * esz));
    if (scatter) s.out.resize(static_cast<size_t>(D * esz));
    if (f64) s.wts64.resize(static_cast<size_t>(l));
    else s.wts32.resize(static_cast<size_t>(l));
  }

  const unsigned char* in = static_cast<const unsigned char*>(p.input);
  unsigned char* cache = static_cast<unsigned char*>(p.cache);
  cpu::parallel_for_runs(units, workers, kUnitsPerRun, [&](int64_t begin, int64_t end, int worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = batches[static_cast<size_t>(u / N)], n = u % N;
      const int64_t S = p.actual_seq_len.data[b];
      const int32_t* table = p.block_table + b * p.block_table_row_stride;
      // §2: window rows = raw tokens S_b - l + w, token p at input[block_table[b, p / P], p % P]
      for (int64_t w = 0; w < l; ++w) {
        const int64_t pos = S - l + w;
        const unsigned char* row =
            in + (table[pos / P] * p.input_stride[0] + (pos % P) * p.input_stride[1] + n * p.input_stride[2]) * esz;
        if (gather) {
          unsigned char* dst = s.tile.data() + w * D * esz;
          for (int64_t j = 0; j < D; ++j)
            std::memcpy(dst + j * esz, row + j * p.input_stride[3] * esz, static_cast<size_t>(esz));
          row = dst;
        }
        s.rows[static_cast<size_t>(w)] = row;
        const int64_t wo = w * p.weight.stride[0] + n * p.weight.stride[1];
        if (f64) s.wts64[static_cast<size_t>(w)] = static_cast<const double*>(p.weight.data)[wo];
        else s.wts32[static_cast<size_t>(w)] = detail::load_f32(p.weight.data, wo, dt);
      }
      unsigned char* dst = cache + (p.slot_mapping[b] * p.cache_stride[0] + n * p.cache_stride[1]) * esz;
      unsigned char* out = scatter ? s.out.data() : dst;
      if (f64) {  // no rounding (fp64 extension): the same order in double
        double* o = reinterpret_cast<double*>(out);
        for (int64_t j = 0; j < D; ++j) {
          double acc = 0.0;
          for (int64_t w = 0; w < l; ++w)
            acc = acc + s.wts64[static_cast<size_t>(w)] * static_cast<const double*>(s.rows[static_cast<size_t>(w)])[j];
          o[j] = acc;
        }
      } else {
        kt->weighted_rows(dt, s.rows.data(), s.wts32.data(), l, D, out, Round::kEven, 0);  // rne_T (§2)
      }
      if (scatter)
        for (int64_t j = 0; j < D; ++j)
          std::memcpy(dst + j * p.cache_stride[2] * esz, out + j * esz, static_cast<size_t>(esz));
    }
  });
  return Status::Ok();
}

}  // namespace nsa
