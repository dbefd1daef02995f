// Optimized CPU backend of select_attention_infer (docs/spec/decode.md §4). One task per (batch, KV head) unit;
// for each of the unit's query tokens, the positions its slots reach are gathered from the pages into a packed
// tile and attended by the G query heads of the KV head with the per-ISA GEMM kernels (paged.h TileWorker). Work
// and memory are proportional to the selected positions, not to the context. Each output row has one writer and a
// summation order fixed by the shapes and indices: results do not depend on the number of threads.
#include <algorithm>
#include <vector>

#include "common/status_guard.h"
#include "common/threads.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention_infer/paged.h"
#include "ops/select_attention_infer/reference.h"

namespace nsa {

Status select_attention_infer_cpu(const SelectAttentionInferParams& p, const CpuOptions& options) {
  SelectAttentionInferShape sh;
  Status st = validate_select_attention_infer(p, &sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  if (!(st = cpu::resolve_isa(options.isa, &isa)).ok()) return st;
  if (p.dtype == DType::kF64) return select_infer_reference::forward_fp64(p);  // a testing extension
  return detail::guarded("select_attention_infer_cpu", "packed key/value tiles", [&]() -> Status {
    const cpu::KernelTable* kt = cpu::kernels_for(isa);
    paged::Problem pr;
    pr.dtype = p.dtype;
    pr.mode = paged::Mode::kSelect;
    pr.query = p.query;
    pr.key = p.key;
    pr.value = p.value;
    pr.block_table = p.block_table;
    pr.N1 = sh.N1;
    pr.N2 = sh.N2;
    pr.G = sh.G;
    pr.D = sh.D;
    pr.Dv = sh.Dv;
    pr.P = sh.page;
    pr.scale = static_cast<float>(p.scale_value);
    pr.out = p.attention_out;
    const std::vector<select_infer::Batch> batches = select_infer::make_batches(p);
    const int64_t units = sh.B * sh.N2;
    const int threads = static_cast<int>(std::min<int64_t>(cpu::resolve_num_threads(options.num_threads),
                                                           std::max<int64_t>(units, 1)));
    // every allocation before the first output is written: a failure is a Status, not a partial result
    std::vector<paged::TileWorker> workers;
    workers.reserve(static_cast<size_t>(threads));
    for (int w = 0; w < threads; ++w) workers.emplace_back(pr, kt, sh.max_entries);
    std::vector<std::vector<paged::Run>> runs(static_cast<size_t>(threads));
    cpu::parallel_for(units, threads, [&](int64_t u, int w) {
      const int64_t b = u / sh.N2, n2 = u % sh.N2;
      const select_infer::Batch& bt = batches[static_cast<size_t>(b)];
      paged::TileWorker& tw = workers[static_cast<size_t>(w)];
      for (int64_t i = 0; i < bt.rows; ++i) {
        if (i >= bt.q) {  // batch-major rows beyond q_b: zeros (§7 item 7)
          tw.zero_rows(bt.row0 + i, n2);
          continue;
        }
        select_infer::token_runs(p, bt, i, n2, runs[static_cast<size_t>(w)]);
        tw.attend(b, bt.row0 + i, n2, runs[static_cast<size_t>(w)]);
      }
    });
    return Status::Ok();
  });
}

}  // namespace nsa
