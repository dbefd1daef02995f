// Internal pieces of the CPU backend of sliding-window attention (docs/spec/window_attention.md), shared by
// cpu_forward.cpp and cpu_backward.cpp: tuning, workspace, per-row visibility, the query-tile plan, packing of
// key/value tiles into the GEMM panel layouts of src/cpu/kernels.h, and the rha row stores.
//
// Decomposition (both directions). The rows of a query tile are (query token, head of the group) pairs: Bq
// tokens x G heads = R rows, token-major (row r = i*G + g), so every row of a token shares its visible keys. The
// visible keys of a row form a range [lo, hi) of batch-local key indices (§4), with the mask bits read inside it
// in modes 0/1 with an explicit mask; a tile's span is the union of its rows' ranges. Work runs on the span only
// (rounded to 16 columns), so it is proportional to the band, not to the sequence.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/aligned_buffer.h"
#include "cpu/kernels.h"
#include "nsa/window_attention.h"
#include "ops/window_attention/batches.h"

namespace nsa::window_cpu {

// Sizes of the decomposition. Results do not depend on strip sizes or thread counts (see the drivers); they
// depend on tile_rows and chunk_keys only through fp32 summation order. Tests shrink them to reach every path.
struct Tuning {
  int64_t tile_rows = 64;       // target rows (tokens x G) of a query tile
  int64_t chunk_keys = 0;       // keys packed at once (multiple of 64); 0: from a byte budget (default_chunk_keys)
  int64_t strip_tokens = 4096;  // most query tokens in one forward / dQ task
  int64_t strip_keys = 2048;    // most keys in one dK/dV task (multiple of 64)
  int64_t strip_rows = 2048;    // most rows of a forward task whose tiles span more than chunk_keys
};

// Keys per packed chunk: 8 MiB of packed key + value panels, a multiple of 64 in [64, 16384].
inline int64_t default_chunk_keys(int64_t D, int64_t Dv, int64_t esz) {
  const int64_t per_key = (D + Dv + 2) * esz;
  return std::clamp<int64_t>((int64_t(8) << 20) / per_key / 64 * 64, 64, 16384);
}

Status forward(const WindowAttentionParams& p, const CpuOptions& options, const Tuning& tuning);
Status backward(const WindowAttentionGradParams& p, const CpuOptions& options, const Tuning& tuning);

// ---------------------------------------------------------------- helpers shared by the drivers
using detail::round_up;
inline int64_t round_down(int64_t x, int64_t m) { return x / m * m; }

// 64-byte aligned buffer (common/aligned_buffer.h); std::bad_alloc when memory runs out (the entry points turn it
// into a Status).
template <typename T>
using AlignedBuf = detail::AlignedBuffer<T>;

// Visible keys of one row (§4): kind kRange: every key of [lo, hi); kMasked: the keys of [lo, hi) whose mask
// entry is 0 (lo and hi are the first and last such key + 1); kNone: no key (§6).
enum RowKind : uint8_t { kRange = 0, kMasked = 1, kNone = 2 };
struct RowInfo {
  int64_t lo = 0, hi = 0;
  RowKind kind = kNone;
};

inline RowInfo row_info(const window_detail::Visibility& vis, const window_detail::WBatch& bi, int64_t i) {
  RowInfo ri;
  int64_t lo, hi;
  vis.range(bi, i, &lo, &hi);
  if (lo >= hi) return ri;
  if (!vis.mask_bits()) {
    ri.lo = lo;
    ri.hi = hi;
    ri.kind = kRange;
    return ri;
  }
  int64_t first = -1, last = -1, count = 0;
  for (int64_t j = lo; j < hi; ++j)
    if (!vis.masked(i, j)) {
      if (first < 0) first = j;
      last = j;
      ++count;
    }
  if (count == 0) return ri;
  ri.lo = first;
  ri.hi = last + 1;
  ri.kind = count == ri.hi - ri.lo ? kRange : kMasked;
  return ri;
}

// A query tile: tokens [s0, s1) of batch b; [lo, hi) the union of its rows' visible ranges (lo >= hi: no row sees
// anything); any_none: some row sees nothing.
struct Tile {
  int64_t b = 0, s0 = 0, s1 = 0;
  int64_t lo = 0, hi = 0;
  bool any_none = false;
};

// Every query tile of every batch (Bq tokens each), in batch and token order.
std::vector<Tile> plan_tiles(const WindowAttentionParams& p, const WindowAttentionShape& sh,
                             const std::vector<window_detail::WBatch>& batches, const window_detail::Visibility& vis,
                             int64_t Bq, int threads);

// Stores rows of float values in the dtype with rha_T (§5 step 4, §7), vectorized for the call's ISA.
void store_rha(const float* src, void* dst, int64_t n, DType dt, CpuIsa isa);

}  // namespace nsa::window_cpu
