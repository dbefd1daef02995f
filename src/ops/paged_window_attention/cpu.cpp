// Optimized CPU backend of paged_window_attention (docs/spec/decode.md §9). One task per (batch, KV head) unit; for
// each of the unit's query tokens the window's positions are gathered from the pages into a packed tile and
// attended by the KV head's G query heads with the per-ISA GEMM kernels (select_attention_infer/paged.h
// TileWorker, window mode: P = exp / l rounded rha_T, output rha_T, window_attention.md §5 step 4). Work and memory
// proportional to the window, not the context; results do not depend on the number of threads.
#include <vector>

#include "ops/paged_window_attention/batches.h"
#include "ops/paged_window_attention/reference.h"
#include "ops/select_attention_infer/paged.h"

namespace nsa {

Status paged_window_attention_cpu(const PagedWindowAttentionParams& p, const CpuOptions& options) {
  return paged::run_paged_entry(
      "paged_window_attention_cpu", validate_paged_window_attention, paged_window_reference::forward_fp64,
      paged_window::make_batches, p, options, paged::Mode::kWindow, p.query, p.key_cache, p.value_cache,
      p.block_table, p.scale, p.attention_out,
      [&](const paged_window::Batch& bt, int64_t b, int64_t n2, paged::TileWorker& tw, std::vector<paged::Run>& runs) {
        for (int64_t i = 0; i < bt.q; ++i) {
          runs.assign(1, paged_window::token_window(bt, i, p.window));  // the one run (§9)
          tw.attend(b, bt.row0 + i, n2, runs);
        }
      });
}

}  // namespace nsa
