// Pieces of the window-attention CPU drivers that cpu_forward.cpp and cpu_backward.cpp run the same way
// (internal; the decomposition itself is in cpu.h): the entry point's steps and the list of (batch, KV head) pairs
// that need the closed form of rows without a visible key (docs/spec/window_attention.md §6 / §7).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/threads.h"
#include "cpu/entry.h"
#include "cpu/kernels.h"
#include "nsa/window_attention.h"
#include "ops/window_attention/cpu.h"

namespace nsa::window_cpu {

// What both drivers hold of a validated call (their base): the forward's params, the shape, the per-batch sizes,
// the rows' visible key ranges, the ISA's kernels, the thread count and the tuning.
struct CallState {
  CallState(const WindowAttentionParams& p, const WindowAttentionShape& sh, const cpu::KernelTable* kt, int threads,
            const Tuning& tu)
      : p_(p), sh_(sh), batches_(window_detail::make_batches(p)), vis_(p, sh), kt_(kt), threads_(threads), tu_(tu) {}
  const WindowAttentionParams& p_;
  WindowAttentionShape sh_;
  std::vector<window_detail::WBatch> batches_;
  window_detail::Visibility vis_;
  const cpu::KernelTable* kt_;
  int threads_;
  Tuning tu_;
};

// The (batch, KV head) pairs x = b N2 + n2 whose batch has a query tile with rows without a visible key
// (Tile::any_none), in ascending x, for inner_precise 0/1; none for inner_precise 2 (such rows are zeros there).
// per_pair gets B N2 entries: Dv zeros for each listed pair (its closed-form row, filled by the caller), empty for
// the others.
inline std::vector<int64_t> pairs_with_invisible_rows(const std::vector<Tile>& tiles, size_t batches, int64_t N2,
                                                      int64_t Dv, int inner_precise,
                                                      std::vector<std::vector<float>>& per_pair) {
  per_pair.assign(batches * static_cast<size_t>(N2), {});
  std::vector<int64_t> need;
  if (inner_precise == 2) return need;
  std::vector<uint8_t> has(batches, 0);
  for (const Tile& t : tiles) has[static_cast<size_t>(t.b)] |= t.any_none ? 1 : 0;
  for (size_t b = 0; b < batches; ++b)
    if (has[b])
      for (int64_t n2 = 0; n2 < N2; ++n2) {
        const int64_t x = static_cast<int64_t>(b) * N2 + n2;
        per_pair[static_cast<size_t>(x)].assign(static_cast<size_t>(Dv), 0.0f);
        need.push_back(x);
      }
  return need;
}

// The entry point of either direction (cpu::run_entry: validation, ISA, the fp64 reference `fp64` for fp64 inputs,
// exceptions as an error naming `entry`), whose optimized path refuses sizes whose 64-bit workspace arithmetic
// could overflow (only reachable with stride-0 views of a small buffer), then runs
// Driver(params, shape, kernels, threads, tuning).
template <typename Driver, typename Params>
inline Status run_entry(const char* entry, const char* workspace,
                        Status (*validate)(const Params&, WindowAttentionShape*), Status (*fp64)(const Params&),
                        const Params& p, const CpuOptions& options, const Tuning& tuning) {
  return cpu::run_entry(entry, workspace, validate, fp64, p, options,
                        [&](const WindowAttentionShape& sh, CpuIsa isa) {
                          constexpr int64_t kMaxTokens = int64_t(1) << 40, kMaxDim = int64_t(1) << 20;
                          if (sh.T1 > kMaxTokens || sh.T2 > kMaxTokens || sh.D > kMaxDim || sh.N1 > kMaxDim)
                            return Status::Error(std::string(entry) +
                                                 ": sizes too large for the CPU backend's 64-bit workspace "
                                                 "arithmetic (T1, T2 < 2^40; D, N1 < 2^20)");
                          Driver(p, sh, cpu::kernels_for(isa), cpu::resolve_num_threads(options.num_threads), tuning)
                              .run();
                          return Status::Ok();
                        });
}

}  // namespace nsa::window_cpu
