// Optimized CPU backend of paged_window_attention (docs/spec/decode.md §9). One task per (batch, KV head) unit; for
// each of the unit's query tokens the window's positions are gathered from the pages into a packed tile and
// attended by the KV head's G query heads with the per-ISA GEMM kernels (select_attention_infer/paged.h
// TileWorker, window mode: P = exp / l rounded rha_T, output rha_T, window_attention.md §5 step 4). Work and memory
// proportional to the window, not the context; results do not depend on the number of threads.
#include <algorithm>
#include <vector>

#include "common/status_guard.h"
#include "common/threads.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops/paged_window_attention/batches.h"
#include "ops/paged_window_attention/reference.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa {

Status paged_window_attention_cpu(const PagedWindowAttentionParams& p, const CpuOptions& options) {
  PagedWindowAttentionShape sh;
  Status st = validate_paged_window_attention(p, &sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  if (!(st = cpu::resolve_isa(options.isa, &isa)).ok()) return st;
  if (p.dtype == DType::kF64) return paged_window_reference::forward_fp64(p);  // a testing extension
  return detail::guarded("paged_window_attention_cpu", "packed key/value tiles", [&]() -> Status {
    const cpu::KernelTable* kt = cpu::kernels_for(isa);
    paged::Problem pr;
    pr.dtype = p.dtype;
    pr.mode = paged::Mode::kWindow;
    pr.query = p.query;
    pr.key = p.key_cache;
    pr.value = p.value_cache;
    pr.block_table = p.block_table;
    pr.N1 = sh.N1;
    pr.N2 = sh.N2;
    pr.G = sh.G;
    pr.D = sh.D;
    pr.Dv = sh.Dv;
    pr.P = sh.page;
    pr.scale = static_cast<float>(p.scale);
    pr.out = p.attention_out;
    const std::vector<paged_window::Batch> batches = paged_window::make_batches(p);
    const int64_t units = sh.B * sh.N2;
    const int threads = static_cast<int>(std::min<int64_t>(cpu::resolve_num_threads(options.num_threads),
                                                           std::max<int64_t>(units, 1)));
    std::vector<paged::TileWorker> workers;  // every allocation before the first output is written
    workers.reserve(static_cast<size_t>(threads));
    for (int w = 0; w < threads; ++w) workers.emplace_back(pr, kt, sh.max_entries);
    std::vector<std::vector<paged::Run>> runs(static_cast<size_t>(threads), std::vector<paged::Run>(1));
    cpu::parallel_for(units, threads, [&](int64_t u, int w) {
      const int64_t b = u / sh.N2, n2 = u % sh.N2;
      const paged_window::Batch& bt = batches[static_cast<size_t>(b)];
      std::vector<paged::Run>& r = runs[static_cast<size_t>(w)];
      for (int64_t i = 0; i < bt.q; ++i) {
        r[0] = paged_window::token_window(bt, i, p.window);
        workers[static_cast<size_t>(w)].attend(b, bt.row0 + i, n2, r);
      }
    });
    return Status::Ok();
  });
}

}  // namespace nsa
