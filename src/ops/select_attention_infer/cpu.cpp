// Optimized CPU backend of select_attention_infer (docs/spec/decode.md §4). One task per (batch, KV head) unit;
// for each of the unit's query tokens, the positions its slots reach are gathered from the pages into a packed
// tile (or, for contiguous bf16 rows on the avx512bf16 path, read where they lie) and attended by the G query heads
// of the KV head with the per-ISA GEMM kernels (paged.h TileWorker). Work and memory are proportional to the selected
// positions, not to the context. Each output row has one writer and a summation order fixed by the shapes and
// indices: results do not depend on the number of threads.
#include <vector>

#include "ops/select_attention_infer/batches.h"
#include "ops/select_attention_infer/paged.h"
#include "ops/select_attention_infer/reference.h"

namespace nsa {

Status select_attention_infer_cpu(const SelectAttentionInferParams& p, const CpuOptions& options) {
  return paged::run_paged_entry(
      "select_attention_infer_cpu", validate_select_attention_infer, select_infer_reference::forward_fp64,
      select_infer::make_batches, p, options, paged::Mode::kSelect, p.query, p.key, p.value, p.block_table,
      p.scale_value, p.attention_out,
      [&](const select_infer::Batch& bt, int64_t b, int64_t n2, paged::TileWorker& tw, std::vector<paged::Run>& runs) {
        for (int64_t i = 0; i < bt.rows; ++i) {
          if (i >= bt.q) {  // batch-major rows beyond q_b: zeros (§7 item 7)
            tw.zero_rows(bt.row0 + i, n2);
            continue;
          }
          select_infer::token_runs(p, bt, i, n2, runs);
          tw.attend(b, bt.row0 + i, n2, runs);
        }
      });
}

}  // namespace nsa
