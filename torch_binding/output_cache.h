// Allocation of the operators' large CPU outputs (internal to the binding).
//
// torch's CPU allocator hands large blocks back to the system when their tensor is freed (glibc maps every block
// above 32 MiB afresh), so every call of an operator writes its large outputs into new pages: the kernel zeroes each
// page at its first write, which costs as much as the operator itself for the memory-bound ones (the compression
// backward's input_grad, 50 MB on bench-64k: about 1.5 ms of page faults against a 2 ms kernel).
//
// empty_output allocates CPU outputs of at least kCachedMinBytes from a cache of blocks of whole 2 MiB pages
// (madvise MADV_HUGEPAGE: transparent huge pages where the system allows them). A freed block goes back to the cache
// and is reused by the next output of the same rounded size; the cache keeps at most NSA_CPU_OUTPUT_CACHE_MB MiB of
// free blocks (default 256; 0 disables it, and every block is then returned to the system when freed), the oldest
// freed first. Smaller outputs and other devices come from at::empty. Values are never affected: every output is
// written in full by its operator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace nsa_torch {

constexpr int64_t kCachedMinBytes = int64_t(4) << 20;

// An uninitialised contiguous tensor of `sizes` with `options` (dtype, device), as at::empty gives.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheStats {
  int64_t limit_bytes = 0;   // NSA_CPU_OUTPUT_CACHE_MB, in bytes
  int64_t cached_bytes = 0;  // free blocks held now
  int64_t cached_blocks = 0;
  int64_t live_blocks = 0;   // blocks held by tensors now
  int64_t hits = 0;          // allocations served by a cached block
  int64_t misses = 0;        // allocations that took new memory
};
OutputCacheStats output_cache_stats();
// Returns every free block to the system (blocks held by tensors return to the cache when freed, as before).
void output_cache_clear();

}  // namespace nsa_torch
