// Per-batch bookkeeping and the visibility rule of docs/spec/window_attention.md (§3, §4, §5), shared by the
// reference and the CPU backend. Everything here assumes a validated call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/arg_checks.h"
#include "common/reference_rows.h"
#include "nsa/window_attention.h"

namespace nsa::window_detail {

struct WBatch {
  int64_t q0 = 0;   // q0_b: first query row (in T1)
  int64_t sq = 0;   // Sq_b
  int64_t k0 = 0;   // k0_b: first key/value row (in T2)
  int64_t skv = 0;  // Skv_b
};

// The last non-zero entry of a prefix-sum list: the entries after it are the trailing run of zeros of §3 (empty
// batches).
using detail::last_nonzero;

// Batch b's length and start from a prefix-sum list with the trailing-zero convention (§3).
inline void batch_extent(const IntList& l, int64_t last_nz, int64_t b, int64_t* begin, int64_t* len) {
  if (b > last_nz) {  // trailing empty batch
    *begin = last_nz >= 0 ? l.data[last_nz] : 0;
    *len = 0;
    return;
  }
  *begin = b > 0 ? l.data[b - 1] : 0;
  *len = l.data[b] - *begin;
}

inline std::vector<WBatch> make_batches(const WindowAttentionParams& p) {
  const int64_t B = p.actual_seq_qlen.size;
  const int64_t lq = last_nonzero(p.actual_seq_qlen), lk = last_nonzero(p.actual_seq_kvlen);
  std::vector<WBatch> out(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    WBatch& w = out[static_cast<size_t>(b)];
    batch_extent(p.actual_seq_qlen, lq, b, &w.q0, &w.sq);
    batch_extent(p.actual_seq_kvlen, lk, b, &w.k0, &w.skv);
  }
  return out;
}

// Float offset of the first of the 8 copies of the statistic of (batch bi, local row i, head h) (§5).
inline int64_t stat_offset(StatsLayout layout, int64_t N1, const WBatch& bi, int64_t h, int64_t i) {
  if (layout == StatsLayout::kTnd) return ((bi.q0 + i) * N1 + h) * 8;
  return 8 * N1 * bi.q0 + (h * bi.sq + i) * 8;
}

// Which keys a query sees (§4): for local row i of a batch, the keys [lo, hi) that the mode and band allow (every
// key of the batch when no mask applies); in modes 0 and 1 with an explicit mask, a key of that range is visible
// iff its mask entry is 0 (masked() false).
class Visibility {
 public:
  Visibility(const WindowAttentionParams& p, const WindowAttentionShape& sh)
      : mode_(p.sparse_mode), has_mask_(sh.has_mask), mask_(p.atten_mask), pre_(p.pre_tockens), next_(p.next_tockens) {
    mask_bits_ = has_mask_ && (mode_ == 0 || mode_ == 1);
  }

  // Whether mask entries must be read inside range() (modes 0 and 1 with an explicit mask).
  bool mask_bits() const { return mask_bits_; }
  bool masked(int64_t i, int64_t j) const { return mask_.data[i * mask_.stride[0] + j * mask_.stride[1]] != 0; }

  // Keys [lo, hi) of row i allowed by the mode (lo >= hi: none). Exact in 128-bit arithmetic for any int64 band.
  void range(const WBatch& bi, int64_t i, int64_t* lo, int64_t* hi) const {
    using I = __int128;
    I a = 0, e = bi.skv;  // [a, e)
    if (has_mask_) {
      const I o = static_cast<I>(bi.skv) - bi.sq;
      switch (mode_) {
        case 0:
          a = static_cast<I>(i) - pre_;
          e = static_cast<I>(i) + next_ + 1;
          break;
        case 2: e = static_cast<I>(i) + 1; break;
        case 3: e = static_cast<I>(i) + o + 1; break;
        case 4:
          a = static_cast<I>(i) + o - pre_;
          e = static_cast<I>(i) + o + next_ + 1;
          break;
        default: break;  // mode 1: the mask alone
      }
    }
    a = std::max<I>(a, 0);
    e = std::min<I>(e, bi.skv);
    if (e < a) e = a;
    *lo = static_cast<int64_t>(a);
    *hi = static_cast<int64_t>(e);
  }

  bool visible(const WBatch& bi, int64_t i, int64_t j) const {
    int64_t lo, hi;
    range(bi, i, &lo, &hi);
    return j >= lo && j < hi && !(mask_bits_ && masked(i, j));
  }

 private:
  int64_t mode_;
  bool has_mask_;
  bool mask_bits_ = false;
  Mask2 mask_;
  int64_t pre_, next_;
};

// The query rows the forward and the backward reference visit, one by one: f(bi, i, keys) for row i of every batch
// bi (query row q0_b + i, i ascending), keys its visible keys j < Skv_b (the band and the mask, §4) ascending; keys
// may be empty (§6).
template <typename F>
void for_each_row_keys(const WindowAttentionParams& p, const WindowAttentionShape& sh, F&& f) {
  const Visibility vis(p, sh);
  std::vector<int64_t> keys;
  ref::for_each_query_row(make_batches(p), [&](const WBatch& bi, int64_t i) {
    keys.clear();
    for (int64_t j = 0; j < bi.skv; ++j)
      if (vis.visible(bi, i, j)) keys.push_back(j);
    f(bi, i, keys);
  });
}

}  // namespace nsa::window_detail
