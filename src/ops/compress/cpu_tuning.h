// Work-splitting knobs of the compression CPU backend (internal). They change only how the work is cut into
// tasks and how many worker threads start, never a result (each output element has one writer and a fixed order;
// the weight gradient's chunks depend on R only). Tests lower them to run many tasks on many workers with small
// shapes.
#pragma once

#include <cstdint>

namespace nsa::compress_detail {

struct CpuTuning {
  int64_t task_bytes = 64 << 10;         // bytes of input (forward) / input_grad (backward) a task aims to cover
  int64_t bytes_per_worker = 512 << 10;  // bytes moved per worker thread started (fewer workers for small calls)
  // Calls reading more input than stream_bytes (larger than most L2 caches and a good part of an L3) read each task's
  // input rows in one sequential pass before walking them window by window (cpu.cpp, stream_in), with tasks of
  // about stream_task_bytes of input.
  int64_t stream_bytes = 8 << 20;
  int64_t stream_task_bytes = 256 << 10;
  // The backward writes input_grad with non-temporal stores (no read of each line before it is written, the lines not
  // kept in the caches) when input_grad is larger than stream_out_bytes, its rows are whole 64-byte lines and the
  // table has such stores for the dtype (KernelTable::weighted_rows_shared). bench-64k-keys backward (50 MB of
  // input_grad), 2 threads of a Zen 5, the output buffer reused: 2.17 -> 1.85 ms.
  int64_t stream_out_bytes = 16 << 20;
};

CpuTuning cpu_tuning();
// Not synchronized with running calls: set it before calling, from one thread.
void set_cpu_tuning(const CpuTuning& t);

}  // namespace nsa::compress_detail
