// Argument rules of docs/spec/window_attention.md §2, §3, §4 and §9 that the torch-free params carry, for the
// forward and the backward. Every failure names the argument (with torch_npu's Python names: pre_tockens,
// actual_seq_kvlen, ...) and what was expected; nothing is written by any entry point when this fails.
#include <cstring>
#include <vector>
#include <sstream>
#include <string>
#include <utility>

#include "common/arg_checks.h"
#include "nsa/window_attention.h"
#include "ops/window_attention/batches.h"

namespace nsa {

namespace {

using detail::shape_str;
using detail::arg_error;

// The prefix-sum lists of §3: given, B >= 1 entries; up to its last non-zero entry non-decreasing from a value >= 0
// (the zeros after it are the trailing empty batches).
constexpr detail::PrefixSumRules kListRules{
    true, " must be given (the prefix sums of the lengths, one per batch; TND)", " must have at least one element",
    " must start at a value >= 0, got ",
    " must be non-decreasing prefix sums (apart from a trailing run of zeros), but element "};

// The compressed mask of modes 2-4 (§4): [2048, 2048], entry [a][c] set (non-zero) exactly where c > a.
Status check_compressed_mask(const Mask2& m, int64_t mode) {
  constexpr int64_t kN = 2048;
  if (m.size[0] != kN || m.size[1] != kN)
    return arg_error("atten_mask must be the compressed mask of sparse_mode ", mode,
                     ": a [2048, 2048] bool/uint8 tensor equal to triu(ones(2048, 2048), diagonal=1), got shape ",
                     shape_str(m.size, 2));
  // Fast path: a contiguous bool mask (bytes 0/1) equal to the canonical one byte for byte.
  static const std::vector<uint8_t> canonical = [] {
    std::vector<uint8_t> c(static_cast<size_t>(kN * kN), 0);
    for (int64_t a = 0; a < kN; ++a) std::memset(c.data() + a * kN + a + 1, 1, static_cast<size_t>(kN - a - 1));
    return c;
  }();
  if (m.stride[0] == kN && m.stride[1] == 1 && std::memcmp(m.data, canonical.data(), canonical.size()) == 0)
    return Status::Ok();
  for (int64_t a = 0; a < kN; ++a) {
    const uint8_t* row = m.data + a * m.stride[0];
    const int64_t cs = m.stride[1];
    uint8_t any_set = 0, any_clear = 0;
    if (cs == 1) {  // vectorizable reductions
      for (int64_t c = 0; c <= a; ++c) any_set |= row[c];
      for (int64_t c = a + 1; c < kN; ++c) any_clear |= static_cast<uint8_t>(row[c] == 0);
    } else {
      for (int64_t c = 0; c <= a; ++c) any_set |= row[c * cs];
      for (int64_t c = a + 1; c < kN; ++c) any_clear |= static_cast<uint8_t>(row[c * cs] == 0);
    }
    if (any_set || any_clear) {
      int64_t c = 0;
      while (c < kN && ((row[c * cs] != 0) == (c > a))) ++c;
      return arg_error("atten_mask must be the compressed mask of sparse_mode ", mode,
                       ": triu(ones(2048, 2048), diagonal=1) (entry [a][c] set exactly where c > a), but entry [", a,
                       "][", c, "] is ", (row[c * cs] != 0 ? "set" : "0"));
    }
  }
  return Status::Ok();
}

}  // namespace

int64_t window_attention_numels(int64_t head_num, const IntList& q, const IntList& kv) {
  if (q.data == nullptr || kv.data == nullptr) return 0;
  const int64_t n = q.size < kv.size ? q.size : kv.size;
  __int128 acc = 0;
  for (int64_t b = 0; b < n; ++b) {
    const __int128 dq = b == 0 ? q.data[0] : static_cast<__int128>(q.data[b]) - q.data[b - 1];
    const __int128 dk = b == 0 ? kv.data[0] : static_cast<__int128>(kv.data[b]) - kv.data[b - 1];
    acc += dq * dk;
  }
  return static_cast<int64_t>(acc * head_num);
}

Status validate_window_attention(const WindowAttentionParams& p, WindowAttentionShape* out_shape) {
  // §2: every view given and non-empty
  WindowAttentionShape sh;
  Status s = detail::check_qkv(p, {.dv = "Dv", .layout_named = true, .empty_rows = false}, &sh);
  if (!s.ok()) return s;
  if (!(s = detail::check_finite_scale(p.scale, "scale")).ok()) return s;

  if (p.sparse_mode < 0 || p.sparse_mode > 4)
    return arg_error("sparse_mode must be 0, 1, 2, 3 or 4 (defaultMask, allMask, leftUpCausal, rightDownCausal, ",
                     "band); got ", p.sparse_mode, " (other modes of torch_npu are not supported)");
  if (p.inner_precise < 0 || p.inner_precise > 2)
    return arg_error("inner_precise must be 0, 1 or 2, got ", p.inner_precise);
  if (p.softmax_layout != StatsLayout::kPerBatch && p.softmax_layout != StatsLayout::kTnd)
    return arg_error("softmax_layout must be \"\" (per batch) or \"TND\"");
  if (p.compressed_mask_implied) {
    if (p.sparse_mode < 2) return arg_error("compressed_mask_implied needs sparse_mode 2, 3 or 4, got ", p.sparse_mode);
    if (p.atten_mask.data != nullptr) return arg_error("atten_mask must be absent when compressed_mask_implied is set");
  }

  constexpr detail::SeqListWords kWords{"actual_seq_kvlen", "T1 = query.size(0)", "T2 = key.size(0)"};
  if (!(s = detail::check_seq_lists(p.actual_seq_qlen, p.actual_seq_kvlen, sh.T1, sh.T2, kWords, kListRules, &sh.B))
           .ok())
    return s;
  const std::vector<window_detail::WBatch> batches = window_detail::make_batches(p);
  for (int64_t b = 0; b < sh.B; ++b) {
    const window_detail::WBatch& w = batches[static_cast<size_t>(b)];
    if (w.sq > 0 && w.skv == 0)
      return arg_error("actual_seq_kvlen must give every batch with queries at least one key, but batch ", b,
                       " has Sq_b = ", w.sq, " and Skv_b = 0");
    sh.max_sq = w.sq > sh.max_sq ? w.sq : sh.max_sq;
    sh.max_skv = w.skv > sh.max_skv ? w.skv : sh.max_skv;
  }

  // Masks (§4).
  const bool explicit_mask = p.atten_mask.data != nullptr;
  sh.has_mask = explicit_mask || p.compressed_mask_implied;
  if (explicit_mask) {
    if (p.sparse_mode <= 1) {
      if (p.atten_mask.size[0] != sh.max_sq || p.atten_mask.size[1] != sh.max_skv)
        return arg_error("atten_mask must have shape [maxSq, maxSkv] = [", sh.max_sq, ", ", sh.max_skv,
                         "] in sparse_mode ", p.sparse_mode, ", got ", shape_str(p.atten_mask.size, 2));
    } else if (!(s = check_compressed_mask(p.atten_mask, p.sparse_mode)).ok()) {
      return s;
    }
  }

  // Band parameter rules of §4 (exact: 128-bit arithmetic for any int64 pre/next).
  using I = __int128;
  const I pre = p.pre_tockens, next = p.next_tockens;
  if (p.sparse_mode == 3) {
    for (int64_t b = 0; b < sh.B; ++b) {
      const window_detail::WBatch& w = batches[static_cast<size_t>(b)];
      if (w.sq > w.skv)
        return arg_error("sparse_mode 3 (rightDownCausal) needs Sq_b <= Skv_b in every batch (actual_seq_qlen, ",
                         "actual_seq_kvlen), but batch ", b, " has Sq_b = ", w.sq, " > Skv_b = ", w.skv);
    }
  } else if (p.sparse_mode == 4) {
    if (pre < 0) return arg_error("pre_tockens must be >= 0 in sparse_mode 4 (band), got ", p.pre_tockens);
    if (next < 0 && pre + next < 0)
      return arg_error("next_tockens (", p.next_tockens, ") must be >= -pre_tockens (pre_tockens = ", p.pre_tockens,
                       ") in sparse_mode 4 (band): pre_tockens + next_tockens >= 0");
    for (int64_t b = 0; b < sh.B; ++b) {
      const window_detail::WBatch& w = batches[static_cast<size_t>(b)];
      if (w.sq > 0 && w.skv > 0 && static_cast<I>(w.sq) - next > w.skv)
        return arg_error("sparse_mode 4 (band) needs Sq_b - next_tockens <= Skv_b in every batch (actual_seq_qlen, ",
                         "actual_seq_kvlen), or its first rows see no key: batch ", b, " has Sq_b = ", w.sq,
                         ", Skv_b = ", w.skv, ", next_tockens = ", p.next_tockens);
    }
  } else if (p.sparse_mode == 0 && !(pre >= sh.max_sq && next >= sh.max_skv)) {
    if (next < 0)
      return arg_error("next_tockens must be >= 0 in sparse_mode 0 with a restricting band (pre_tockens < maxSq or ",
                       "next_tockens < maxSkv), got ", p.next_tockens);
    if (pre < 0 && next < -pre)
      return arg_error("next_tockens (", p.next_tockens, ") must be >= -pre_tockens (pre_tockens = ", p.pre_tockens,
                       ") in sparse_mode 0 when pre_tockens < 0");
    for (int64_t b = 0; b < sh.B; ++b) {
      const window_detail::WBatch& w = batches[static_cast<size_t>(b)];
      if (w.sq > 0 && static_cast<I>(w.skv) + pre < w.sq)
        return arg_error("pre_tockens (", p.pre_tockens, ") is too small for sparse_mode 0: Skv_b + pre_tockens >= ",
                         "Sq_b ",
                         "is needed in every batch (actual_seq_qlen, actual_seq_kvlen), but batch ", b, " has Sq_b = ",
                         w.sq, ", Skv_b = ", w.skv);
    }
  }

  s = detail::check_not_null({{p.attention_out, "attention_out"}, {p.softmax_max, "softmax_max"},
                              {p.softmax_sum, "softmax_sum"}});
  return detail::publish_shape(s, sh, out_shape);
}

Status validate_window_attention_backward(const WindowAttentionGradParams& p, WindowAttentionShape* shape) {
  // The forward's output pointers play no part in the backward (the header says they are ignored).
  const auto own_rules = [&](const WindowAttentionShape& sh) -> Status {
    Status s;
    for (const auto& [t, name] : {std::pair<const Tensor3*, const char*>{&p.attention_in, "attention_in"},
                                  std::pair<const Tensor3*, const char*>{&p.dy, "dy"}}) {
      if (t->data == nullptr) return arg_error(name, " must be given");
      s = detail::check_sizes3(*t, name, "have the shape of attention_out [T1, N1, Dv]", sh.T1, sh.N1, sh.Dv);
      if (!s.ok()) return s;
    }
    if (p.softmax_max == nullptr) return arg_error("softmax_max must be given");
    if (p.softmax_sum == nullptr) return arg_error("softmax_sum must be given");
    return detail::check_not_null(
        {{p.grad_query, "grad_query"}, {p.grad_key, "grad_key"}, {p.grad_value, "grad_value"}});
  };
  using F = WindowAttentionParams;
  return detail::validate_backward(p.fwd, validate_window_attention, shape, own_rules,
                                   &F::attention_out, &F::softmax_max, &F::softmax_sum);
}

}  // namespace nsa
