// Internal entry points of the selected-attention CPU backend with its tiling knobs exposed, for tests that must
// reach every code path on small shapes (several tiles per batch, several pieces per key block) and for tuning.
// The public entry points (nsa/select_attention.h) use the defaults (every field 0).
#pragma once

#include <cstdint>

#include "nsa/select_attention.h"

namespace nsa::select_cpu {

struct Tuning {
  int64_t fwd_tile_rows = 0;    // forward: GEMM rows (query rows x G) of a query tile (default 64)
  int64_t bwd_tile_rows = 0;    // backward phase A: GEMM rows of a query tile (default 64)
  int64_t bwd_chunk_rows = 0;   // backward phase B: GEMM rows (entries x G) of a chunk of a key block's list (128)
  int64_t bwd_piece_rows = 0;   // backward phase B: GEMM rows of a piece of a key block's list (8192; grown while
                                // the pieces' partials exceed 64 MB)
};

Status forward(const SelectAttentionParams& p, const CpuOptions& options, const Tuning& tuning);
Status backward(const SelectAttentionGradParams& p, const CpuOptions& options, const Tuning& tuning);

}  // namespace nsa::select_cpu
