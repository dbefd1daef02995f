// Shared pieces of the window-attention CPU backend (see cpu.h).
#include "ops/window_attention/cpu.h"

#include "common/threads.h"
#include "ops/window_attention/rounding.h"

namespace nsa::window_cpu {

std::vector<Tile> plan_tiles(const WindowAttentionParams& p, const WindowAttentionShape& sh,
                             const std::vector<window_detail::WBatch>& batches, const window_detail::Visibility& vis,
                             int64_t Bq, int threads) {
  (void)p;
  (void)sh;
  std::vector<Tile> tiles;
  for (size_t b = 0; b < batches.size(); ++b)
    for (int64_t s0 = 0; s0 < batches[b].sq; s0 += Bq) {
      Tile t;
      t.b = static_cast<int64_t>(b);
      t.s0 = s0;
      t.s1 = std::min(batches[b].sq, s0 + Bq);
      tiles.push_back(t);
    }
  // Spans: O(1) per row for the band modes, a scan of the row's mask entries in modes 0/1 with a mask.
  constexpr int64_t kPer = 16;  // tiles per work item
  const int64_t n = static_cast<int64_t>(tiles.size());
  cpu::parallel_for((n + kPer - 1) / kPer, vis.mask_bits() ? threads : 1, [&](int64_t item, int) {
    for (int64_t x = item * kPer; x < std::min(n, (item + 1) * kPer); ++x) {
      Tile& t = tiles[static_cast<size_t>(x)];
      const window_detail::WBatch& bi = batches[static_cast<size_t>(t.b)];
      int64_t lo = INT64_MAX, hi = INT64_MIN;
      for (int64_t i = t.s0; i < t.s1; ++i) {
        const RowInfo ri = row_info(vis, bi, i);
        if (ri.kind == kNone) {
          t.any_none = true;
          continue;
        }
        lo = std::min(lo, ri.lo);
        hi = std::max(hi, ri.hi);
      }
      if (hi > lo) {
        t.lo = lo;
        t.hi = hi;
      }
    }
  });
  return tiles;
}

// The rha row store compiled three times: baseline flags, and (x86) for AVX2 and AVX-512BW through target
// attributes, so that the compiler vectorizes the same integer sequence with wider registers (identical results:
// integer operations and exact float conversions only). The path follows the call's resolved ISA.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) static void store_rha_avx2(const float* src, void* dst, int64_t n,
                                                                     DType dt) {
  window_detail::store_row_rha(src, dst, n, dt);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) static void store_rha_avx512(
    const float* src, void* dst, int64_t n, DType dt) {
  window_detail::store_row_rha(src, dst, n, dt);
}
#endif

void store_rha(const float* src, void* dst, int64_t n, DType dt, CpuIsa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa >= CpuIsa::kAvx512) return store_rha_avx512(src, dst, n, dt);
  if (isa == CpuIsa::kAvx2) return store_rha_avx2(src, dst, n, dt);
#else
  (void)isa;
#endif
  window_detail::store_row_rha(src, dst, n, dt);
}

}  // namespace nsa::window_cpu
