// Generic kernel bodies, instantiated once per ISA. Include this file INSIDE a namespace unique to
// the ISA, after defining `struct V` (the vector traits below) in that namespace, so nothing here
// is shared between translation units compiled with different flags (no ODR mixing). The including file
// includes cpu/kernels.h and common/group_sum.h at global scope first.
//
// V must provide: type F, constexpr int W (fp32 lanes), zero(), load(p), store(p, v), set1(x),
// fma(a, b, c) = a*b + c (fused), add, sub, mul, div, max(a, b) (returns b when either is NaN),
// min(a, b), rint(x) (nearest even), scale2(p, n) (p * 2^n rounded once, p in [0.5, 2], integral n in
// [-160, 128]), add_row-friendly loads/stores, kStream / stream_line(dst, src, dtype) (one 64-byte
// line of src rounded as store_row does, written with non-temporal stores to 64-byte aligned dst) / stream_fence(),
// keep_nan(x, r) (x where x is NaN, else r), round_bf16(x), round_f16(x) (float -> dtype -> float,
// nearest even), store_bf16_bits(uint16_t*, v) (v already bf16-representable), store_bf16(uint16_t*, x) (x rounded
// as round_bf16, then its bits stored),
// count_ge(p, v) (number of p[0..W) >= v, NaN never counting).
// Optional: V::kHasBf16Dot with a gemm_bf16 provided by the ISA file.

// ------------------------------------------------------------------ exp
// exp(x) for float32 with Cephes-style range reduction and polynomial (about 1 ulp); exact 0 for
// x < -110 (and -inf), +inf for x > 88.72, NaN kept. The same sequence of fused operations on every
// ISA, so every path gives bitwise identical results.
// exp of xc in [-110, 88.72] (already clamped): range reduction, polynomial, p * 2^n.
inline V::F vexp_clamped(V::F xc) {
  const V::F n = V::rint(V::mul(xc, V::set1(1.44269504088896341f)));
  V::F r = V::fma(n, V::set1(-0.693359375f), xc);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  V::F p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  const V::F r2 = V::mul(r, r);
  p = V::fma(p, r2, V::add(r, V::set1(1.0f)));
  return V::scale2(p, n);  // p * 2^n rounded once (gradual underflow down to n = -159)
}
constexpr float kExpLow = -110.0f, kExpHigh = 88.7228391f;
inline V::F vexp(V::F x) {
  const V::F hi = V::set1(kExpHigh);
  V::F res = vexp_clamped(V::min(V::max(x, V::set1(kExpLow)), hi));  // (max: a NaN x gives the low bound)
  res = V::inf_above(x, hi, res);  // x > 88.72 -> inf
  return V::keep_nan(x, res);
}
// vexp for x <= 0 or NaN (a softmax's x - max): the same bits with the upper clamp and the overflow select left
// out, which cannot apply there (x <= 0 < 88.72; a NaN x compares false with both).
inline V::F vexp_nonpositive(V::F x) {
  return V::keep_nan(x, vexp_clamped(V::max(x, V::set1(kExpLow))));
}

// ------------------------------------------------------------------ row operations
// row_max for RB rows at once (row a at x + a * ld), init and the result of row a in m[a]: the RB maxima are
// independent chains, interleaved column by column so that their latencies overlap.
template <int RB>
inline void row_max_block(const float* x, int64_t ld, int64_t n, float init, float* m) {
  V::F mx[RB];
  for (int a = 0; a < RB; ++a) mx[a] = V::set1(init);
  for (int64_t i = 0; i < n; i += V::W)
    for (int a = 0; a < RB; ++a) mx[a] = V::max(V::load(x + a * ld + i), mx[a]);
  // (a lane is NaN only when init is: max keeps its second operand on NaN)
  for (int a = 0; a < RB; ++a) m[a] = V::max_lanes(mx[a], init);
}
// exp_sum for RB rows at once (row a at x + a * ld with its maximum m[a]; its sum into l[a]), interleaved as above:
// accumulators so that lane j of accumulator k holds the elements i % 16 == k W + j, then the canonical sum.
template <int RB>
inline void exp_sum_block(float* x, int64_t ld, int64_t n, const float* m, float* l) {
  constexpr int NA = 16 / V::W;
  V::F vm[RB], acc[RB][NA];
  for (int a = 0; a < RB; ++a) {
    vm[a] = V::set1(m[a]);
    for (int k = 0; k < NA; ++k) acc[a][k] = V::zero();
  }
  for (int64_t i = 0; i < n; i += 16)
    for (int a = 0; a < RB; ++a)
      for (int k = 0; k < NA; ++k) {
        float* p = x + a * ld + i + k * V::W;
        const V::F e = vexp_nonpositive(V::sub(V::load(p), vm[a]));  // x[i] <= m (see kernels.h)
        V::store(p, e);
        acc[a][k] = V::add(acc[a][k], e);
      }
  for (int a = 0; a < RB; ++a) l[a] = V::sum16(acc[a]);
}

inline float row_max_impl(const float* x, int64_t n, float init) {
  float m;
  row_max_block<1>(x, 0, n, init, &m);
  return m;
}
inline float exp_sum_impl(float* x, int64_t n, float m) {
  float l;
  exp_sum_block<1>(x, 0, n, &m, &l);
  return l;
}
// row_max then exp_sum per row, RB rows per block (the scalar path keeps one: 16 accumulators per row)
inline void softmax_rows_impl(float* x, int64_t ld, int64_t rows, int64_t n, float init, float* m, float* l) {
  constexpr int RB = V::W >= 8 ? 4 : 1;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    row_max_block<RB>(x + r * ld, ld, n, init, m + r);
    exp_sum_block<RB>(x + r * ld, ld, n, m + r, l + r);
  }
  for (; r < rows; ++r) {
    row_max_block<1>(x + r * ld, ld, n, init, m + r);
    exp_sum_block<1>(x + r * ld, ld, n, m + r, l + r);
  }
}

inline void normalize_row_impl(float* x, int64_t n, float l_sum, void* out, nsa::cpu::PStore store) {
  const V::F vl = V::set1(l_sum);
  using nsa::cpu::PStore;
  for (int64_t i = 0; i < n; i += V::W) {
    const V::F p = V::div(V::load(x + i), vl);
    V::store(x + i, p);
    switch (store) {
      case PStore::kBf16Bits: V::store_bf16(static_cast<uint16_t*>(out) + i, p); break;
      case PStore::kF32AsBf16: V::store(static_cast<float*>(out) + i, V::round_bf16(p)); break;
      case PStore::kF32AsF16: V::store(static_cast<float*>(out) + i, V::round_f16(p)); break;
      case PStore::kF32: V::store(static_cast<float*>(out) + i, p); break;
    }
  }
}

// P rounded as `store` asks, into out at element offset i (uint16 bits for kBf16Bits, float otherwise)
template <nsa::cpu::PStore S>
inline void store_p(void* out, int64_t i, V::F p) {
  using nsa::cpu::PStore;
  if constexpr (S == PStore::kBf16Bits) V::store_bf16(static_cast<uint16_t*>(out) + i, p);
  else if constexpr (S == PStore::kF32AsBf16) V::store(static_cast<float*>(out) + i, V::round_bf16(p));
  else if constexpr (S == PStore::kF32AsF16) V::store(static_cast<float*>(out) + i, V::round_f16(p));
  else V::store(static_cast<float*>(out) + i, p);
}

// The G rows of one token at once: P_g = x_g / l[g] (as normalize_row, stored rounded into out row g) and,
// 16 columns at a time in registers, their pairwise group sum (§3.6: level by level, sum[a] = v[2a] + v[2a+1],
// an odd last element carried up) into sum_out. x row g at x + g * ldx; out row g at out + g * ld_out elements
// (uint16 for kBf16Bits, float otherwise); sum_out may be x (row 0): each 16-column chunk is read before it
// is written. The fp32 P itself is not kept. n % 16 == 0, 1 <= G <= kMaxFusedGroup.
// GT > 0: G == GT known at compile time, so the G quotients and their sum tree stay in registers; GT == 0: any G.
template <int GT, nsa::cpu::PStore S>
inline void normalize_group_t(const float* x, int64_t ldx, int G, const float* l, int64_t n, void* out,
                              int64_t ld_out, float* sum_out) {
  constexpr int CAP = GT > 0 ? GT : nsa::cpu::kMaxFusedGroup;
  const int g_count = GT > 0 ? GT : G;
  const size_t esz = S == nsa::cpu::PStore::kBf16Bits ? 2 : 4;
  for (int64_t i = 0; i < n; i += 16) {
    for (int half = 0; half < 16 / V::W; ++half) {
      const int64_t c = i + half * V::W;
      // (one pointer per operand, bumped row by row: G row pointers of each would not fit the registers; l[g]
      // broadcast from memory at each use)
      const float* xg = x + c;
      char* og = static_cast<char*>(out) + c * esz;
      if constexpr (GT > 0 && (GT & (GT - 1)) == 0) {
        // G a power of two: the tree built as the quotients come, part[k] holding the sum of the last 2^k of them
        // (row g closes the levels k below the lowest zero bit of g: part[k] + the new sum, left operand first,
        // which are the additions of the level-by-level tree), so that log2(G) + 1 vectors stay live
        V::F part[__builtin_ctz(GT) + 1];
#pragma GCC unroll 16
        for (int g = 0; g < GT; ++g) {
          V::F p = V::div(V::load(xg), V::set1(l[g]));
          store_p<S>(og, 0, p);
          xg += ldx;
          og += ld_out * esz;
          int k = 0;
          for (int bits = g; bits & 1; bits >>= 1, ++k) p = V::add(part[k], p);
          part[k] = p;
        }
        V::store(sum_out + c, part[__builtin_ctz(GT)]);
      } else {
        V::F v[CAP];
        for (int g = 0; g < g_count; ++g) {
          v[g] = V::div(V::load(xg), V::set1(l[g]));
          store_p<S>(og, 0, v[g]);
          xg += ldx;
          og += ld_out * esz;
        }
        V::store(sum_out + c, nsa::detail::pairwise_reduce(v, g_count, [](V::F a, V::F b) { return V::add(a, b); }));
      }
    }
  }
}
template <nsa::cpu::PStore S>
inline void normalize_group_s(const float* x, int64_t ldx, int G, const float* l, int64_t n, void* out,
                              int64_t ld_out, float* sum_out) {
  switch (G) {
    case 1: normalize_group_t<1, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case 2: normalize_group_t<2, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case 4: normalize_group_t<4, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case 8: normalize_group_t<8, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case 16: normalize_group_t<16, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    default: normalize_group_t<0, S>(x, ldx, G, l, n, out, ld_out, sum_out); break;
  }
}
inline void normalize_group_impl(const float* x, int64_t ldx, int G, const float* l, int64_t n, void* out,
                                 int64_t ld_out, nsa::cpu::PStore store, float* sum_out) {
  using nsa::cpu::PStore;
  switch (store) {
    case PStore::kBf16Bits: normalize_group_s<PStore::kBf16Bits>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case PStore::kF32AsBf16: normalize_group_s<PStore::kF32AsBf16>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case PStore::kF32AsF16: normalize_group_s<PStore::kF32AsF16>(x, ldx, G, l, n, out, ld_out, sum_out); break;
    case PStore::kF32: normalize_group_s<PStore::kF32>(x, ldx, G, l, n, out, ld_out, sum_out); break;
  }
}

inline void box_sum_impl(const float* in, float* out, int64_t n, int width) {
  for (int64_t i = 0; i < n; i += V::W) {
    V::F acc = V::load(in + i);
    for (int j = 1; j < width; ++j) acc = V::add(acc, V::load(in + i - j));
    V::store(out + i, acc);
  }
}

inline void add_row_impl(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += V::W) V::store(x + i, V::add(V::load(x + i), V::load(y + i)));
}

// ------------------------------------------------------------------ top-k (KernelTable::top_k)
// Top-K of score[0..sel) in §3.8 order (score descending, ties by smaller index) into idx[0..K), in three
// steps (scratch: work, 2 * sel ints; 1 <= K <= 32, K <= sel):
//   1. lane maxima gm[j] = max_{i % 32 == j} score[i] (32 >= K lanes); the K-th largest of them, t, is a
//      lower bound of the K-th largest score (K lanes have a member >= t); 32 lanes rather than 16 make t
//      tighter, so fewer candidates reach step 3 (for sel = 128, K = 16: about a quarter less top-k time);
//   2. A = {i : score[i] > t} in index order, with their scores (branch-free compaction); every other score is
//      <= t and ranks below every member of A;
//   3. each member's rank in A by counting: rank(a) = #{b : v_b > v_a} + #{b before a : v_b == v_a}, the §3.8
//      order, with vector comparisons over A's scores; the members of rank < K go to idx[rank]; if |A| < K, the
//      first K - |A| scores equal to t (index order) follow them (at least K scores are >= t).
// For sel <= 16, A is every score (steps 1 and 2 skipped). Where V has rank_top32 (AVX-512) and |A| <= 32, step 3
// counts the ranks the other way round (a rank per lane, one pass over the members; no branch on ties).
// Returns false, idx untouched, when a score is NaN (the caller's general top-k orders NaN). Fixed-length
// loops (NG lanes) so that they vectorize with the ISA's flags. For sel = 128 (bench-8k's selection blocks),
// K = 16, normal scores, one Zen 4 core: about 0.85 us per call with a sorted insertion buffer in step 3 and a
// branch per lane for t; about 0.20 us with the ranks counted, t by V::kth_largest32 and the candidates compacted
// by V::compact_gt (both vectorized on AVX-512).
inline bool top_k_impl(const float* score, int64_t sel, int K, int32_t* idx, int32_t* work) {
  // A: indices in above[0..na), their scores in cand[0..na): up to kPadded of them on the stack, padded with -inf to
  // whole vectors and to at least 32 scores (V::rank_top32 loads 32) (no member of A is below -inf; a member equal
  // to -inf, possible when t = -inf, counts the pads in ge only, which sends it to the tie count over A's members),
  // else in work[sel..sel + na) (written and read as float through memcpy and the vector loads, which may alias),
  // the last partial vector compared one at a time
  int32_t* above = work;
  constexpr int64_t kPadded = 256;
  alignas(64) float padded[kPadded + V::W];
  const float* cand = padded;
  int64_t na = 0;
  float t = -__builtin_inff();
  int nan = 0;
  if (sel <= 16) {
    // every score in A (t = -inf; |A| = sel >= K): steps 1 and 2 would cost more than they remove (sel = K = 16,
    // Zen 5: 280 -> 200 cycles per call without them; at sel = 32 they pay for themselves, 430 -> 325)
    for (int64_t i = 0; i < sel; ++i) {
      const float v = score[i];
      nan |= v != v;
      padded[i] = v;
      above[i] = static_cast<int32_t>(i);
    }
    if (nan) return false;
    na = sel;
  } else {
    constexpr int NG = 32;
    alignas(64) float gm[NG];
    for (int j = 0; j < NG; ++j) gm[j] = -__builtin_inff();
    int64_t i = 0;
    for (; i + NG <= sel; i += NG)
      for (int j = 0; j < NG; ++j) {
        const float v = score[i + j];
        nan |= v != v;
        gm[j] = v > gm[j] ? v : gm[j];
      }
    for (int j = 0; i < sel; ++i, ++j) {
      const float v = score[i];
      nan |= v != v;
      gm[j] = v > gm[j] ? v : gm[j];
    }
    if (nan) return false;
    // t = the K-th largest lane maximum = the largest gm[j] with at least K lane maxima >= it (any larger
    // value has at most K - 1 maxima >= it)
    // (V::kth_largest32: selects rather than a branch, which mispredicted about half the time)
    static_assert(NG == 32, "kth_largest32 takes 32 lane maxima");
    t = V::kth_largest32(gm, K);
    na = V::compact_gt(score, sel, t, above, work + sel);
    const float* vals = reinterpret_cast<const float*>(work + sel);
    if (na <= kPadded) std::memcpy(padded, vals, static_cast<size_t>(na) * sizeof(float));
    else cand = vals;
  }
  auto val = [&](int64_t b) {
    float v;
    std::memcpy(&v, cand + b, sizeof(float));
    return v;
  };
  int64_t nfull = na / V::W * V::W;  // cand[0..nfull) compared as whole vectors
  if (cand == padded) {
    nfull = (na + V::W - 1) / V::W * V::W;
    for (int64_t b = na; b < std::max<int64_t>(nfull, 32); ++b) padded[b] = -__builtin_inff();
  }
  int32_t top[33];  // the K entries, then a spare slot
  const bool ranked = cand == padded && V::rank_top32(padded, na, above, K, top);
  for (int64_t a = 0; !ranked && a < na; ++a) {
    const float v = val(a);
    int64_t gt = 0, ge = 0;
    for (int64_t c = 0; c < nfull; c += V::W) {
      gt += V::count_gt(cand + c, v);
      ge += V::count_ge(cand + c, v);
    }
    for (int64_t b = nfull; b < na; ++b) {
      const float u = val(b);
      gt += u > v;
      ge += u >= v;
    }
    int64_t rank = gt;
    if (ge - gt > 1)  // v occurs more than once in A (or pads tie with it): the earlier indices rank first
      for (int64_t b = 0; b < a; ++b) rank += val(b) == v;
    top[rank < K ? rank : K] = above[a];  // ranks >= K land in the spare slot (a select, not a branch)
  }
  // |A| < K: the first K - |A| scores equal to t (index order) complete the top K (at least that many exist)
  for (int64_t k = 0, n = na; n < K; ++k)
    if (score[k] == t) top[n++] = static_cast<int32_t>(k);
  for (int k = 0; k < K; ++k) idx[k] = top[k];
  return true;
}

inline bool block_scores_impl(const float* p, int64_t k0, int64_t k1, int M, int N, float* score) {
  return V::block_scores(p, k0, k1, M, N, score);
}
inline void force_impl(float* score, const uint8_t* forced, int64_t n) {
  constexpr float kForced = 3.40282347e38f;  // FLT_MAX
  int64_t k = 0;
  for (; k + V::W <= n; k += V::W) V::store(score + k, V::set_where_bytes(V::load(score + k), forced + k, kForced));
  for (; k < n; ++k) score[k] = forced[k] != 0 ? kForced : score[k];
}

// ------------------------------------------------------------------ row conversions
// Full vectors first; the tail goes through a zero-padded stack buffer so no ISA-specific scalar
// code is needed.
inline void store_vec(const float* src, void* dst, int64_t i, nsa::DType dt) {
  const V::F x = V::load(src + i);
  switch (dt) {
    case nsa::DType::kBF16: V::store_bf16(static_cast<uint16_t*>(dst) + i, x); break;
    case nsa::DType::kF16: V::store_f16(static_cast<uint16_t*>(dst) + i, x); break;
    default: V::store(static_cast<float*>(dst) + i, x); break;
  }
}
inline void store_row_impl(const float* src, void* dst, int64_t n, nsa::DType dt) {
  const int64_t full = n / V::W * V::W;
  for (int64_t i = 0; i < full; i += V::W) store_vec(src, dst, i, dt);
  if (full < n) {
    alignas(64) float in[V::W] = {};
    alignas(64) float out[V::W];  // big enough for W floats or W uint16
    const size_t esz = (dt == nsa::DType::kBF16 || dt == nsa::DType::kF16) ? 2 : 4;
    __builtin_memcpy(in, src + full, sizeof(float) * static_cast<size_t>(n - full));
    store_vec(in, out, 0, dt);
    __builtin_memcpy(static_cast<char*>(dst) + full * esz, out, esz * static_cast<size_t>(n - full));
  }
}
// Rows of 64-byte lines to 64-byte aligned memory: each line assembled in registers and written with non-temporal
// stores (V::stream_line) where the ISA has them, else store_row.
inline void store_row_stream_impl(const float* src, void* dst, int64_t n, nsa::DType dt) {
  const int64_t esz = (dt == nsa::DType::kBF16 || dt == nsa::DType::kF16) ? 2 : 4;
  if (!V::kStream || (reinterpret_cast<uintptr_t>(dst) & 63) != 0 || (n * esz) % 64 != 0)
    return store_row_impl(src, dst, n, dt);
  const int64_t per_line = 64 / esz;
  for (int64_t i = 0; i < n; i += per_line) V::stream_line(static_cast<char*>(dst) + i * esz, src + i, dt);
}
inline void stream_fence_impl() { V::stream_fence(); }

inline V::F load_vec(const void* src, int64_t i, nsa::DType dt) {
  switch (dt) {
    case nsa::DType::kBF16: return V::load_bf16(static_cast<const uint16_t*>(src) + i);
    case nsa::DType::kF16: return V::load_f16(static_cast<const uint16_t*>(src) + i);
    default: return V::load(static_cast<const float*>(src) + i);
  }
}
inline void load_row_impl(const void* src, float* dst, int64_t n, nsa::DType dt) {
  const int64_t full = n / V::W * V::W;
  for (int64_t i = 0; i < full; i += V::W) V::store(dst + i, load_vec(src, i, dt));
  if (full < n) {
    alignas(64) float in[V::W] = {};
    const size_t esz = (dt == nsa::DType::kBF16 || dt == nsa::DType::kF16) ? 2 : 4;
    __builtin_memcpy(in, static_cast<const char*>(src) + full * esz, esz * static_cast<size_t>(n - full));
    alignas(64) float out[V::W];
    V::store(out, load_vec(in, 0, dt));
    __builtin_memcpy(dst + full, out, sizeof(float) * static_cast<size_t>(n - full));
  }
}

// ------------------------------------------------------------------ fp32 GEMM
// Where the rows of A and C are, as four fields f0..f3 (the micro-kernels take them as four arguments: a 32-byte
// struct would be passed through the stack, its fields stored and read back with one wide load, which stalls on
// store forwarding):
//   StridedRows  row r of A at f0 + r f1, of C at f2 + r f3;
//   PointerRows  row r of A at f0[r] + f1, of C at f2[r] + f3 (gathered rows, GemmKernels::f32_gather).
// at(r) is the view from row r on, shifted(a, c) the view with A moved by a elements and C by c.
template <typename T>
struct StridedRows {
  using F0 = const T*;
  using F2 = float*;
  F0 f0;
  int64_t f1;
  F2 f2;
  int64_t f3;
  const T* a(int r) const { return f0 + r * f1; }
  float* c(int r) const { return f2 + r * f3; }
  StridedRows at(int64_t r) const { return {f0 + r * f1, f1, f2 + r * f3, f3}; }
  StridedRows shifted(int64_t da, int64_t dc) const { return {f0 + da, f1, f2 + dc, f3}; }
};
template <typename T>
struct PointerRows {
  using F0 = const T* const*;
  using F2 = float* const*;
  F0 f0;
  int64_t f1;
  F2 f2;
  int64_t f3;
  const T* a(int r) const { return f0[r] + f1; }
  float* c(int r) const { return f2[r] + f3; }
  PointerRows at(int64_t r) const { return {f0 + r, f1, f2 + r, f3}; }
  PointerRows shifted(int64_t da, int64_t dc) const { return {f0, f1 + da, f2, f3 + dc}; }
};

// Micro-kernel: C[MR][NV*W] (+)= alpha * A[MR][P] . B[P][ldb], one column slice of a panel; rows (f0..f3) as Rows.
template <int MR, int NV, typename Rows>
inline void ukernel_f32(typename Rows::F0 f0, int64_t f1, typename Rows::F2 f2, int64_t f3, const float* B, int64_t P,
                        float alpha, bool accumulate) {
  const Rows rows{f0, f1, f2, f3};
  // every loop over r and j unrolled: the accumulators stay in registers (no stack copy to set up or spill)
  V::F c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) c[r][j] = V::zero();
  for (int64_t p = 0; p < P; ++p) {
    V::F b[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) b[j] = V::load(B + p * nsa::cpu::kPanel + j * V::W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V::F a = V::set1(rows.a(r)[p]);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) c[r][j] = V::fma(a, b[j], c[r][j]);
    }
  }
  // alpha * acc (skipped for alpha = 1, where it is exact), then + C when accumulating
  if (alpha != 1.0f) {
    const V::F va = V::set1(alpha);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) c[r][j] = V::mul(c[r][j], va);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* dst = rows.c(r);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      V::F v = c[r][j];
      if (accumulate) v = V::add(V::load(dst + j * V::W), v);
      V::store(dst + j * V::W, v);
    }
  }
}
// ukernel_f32 on a row view
template <int MR, int NV, typename Rows>
inline void ukernel_f32_on(const Rows& r, const float* B, int64_t P, float alpha, bool acc) {
  ukernel_f32<MR, NV, Rows>(r.f0, r.f1, r.f2, r.f3, B, P, alpha, acc);
}

template <int NV, int MRMAX, typename Rows>
inline void gemm_rows_f32(const Rows& rows, int64_t R, const float* B, int64_t P, float alpha, bool acc) {
  int64_t r = 0;
  for (; r + MRMAX <= R; r += MRMAX) ukernel_f32_on<MRMAX, NV>(rows.at(r), B, P, alpha, acc);
  const int64_t rest = R - r;
  const Rows tail = rows.at(r);
  switch (rest) {
    case 0: break;
    case 1: ukernel_f32_on<1, NV>(tail, B, P, alpha, acc); break;
    case 2: if constexpr (MRMAX > 2) ukernel_f32_on<2, NV>(tail, B, P, alpha, acc); break;
    case 3: if constexpr (MRMAX > 3) ukernel_f32_on<3, NV>(tail, B, P, alpha, acc); break;
    case 4: if constexpr (MRMAX > 4) ukernel_f32_on<4, NV>(tail, B, P, alpha, acc); break;
    case 5: if constexpr (MRMAX > 5) ukernel_f32_on<5, NV>(tail, B, P, alpha, acc); break;
    default: break;
  }
}

// A column slice of `nv` vectors (nv * W columns, a multiple of 16) inside one panel.
template <typename Rows>
inline void gemm_slice_f32(int nv, const Rows& rows, int64_t R, const float* B, int64_t P, float alpha, bool acc) {
  constexpr int NV = V::kSliceVectors;
  switch (nv) {
    case NV: gemm_rows_f32<NV, V::kMaxRows>(rows, R, B, P, alpha, acc); break;
    case (NV >= 2 ? NV / 2 : NV): if constexpr (NV >= 2 && (NV / 2) * V::W % 16 == 0)
        gemm_rows_f32<NV / 2, V::kMaxRows>(rows, R, B, P, alpha, acc);
      break;
    case (NV >= 4 ? NV / 4 : -1): if constexpr (NV >= 4 && (NV / 4) * V::W % 16 == 0)
        gemm_rows_f32<NV / 4, V::kMaxRows>(rows, R, B, P, alpha, acc);
      break;
    case (NV == 4 && V::W == 16 ? 3 : -2): if constexpr (NV == 4 && V::W == 16)
        gemm_rows_f32<3, V::kMaxRows>(rows, R, B, P, alpha, acc);
      break;
    default: break;
  }
}

// The blocks of a packed-panel GEMM (the contract of GemmKernels): the reduction in chunks [p0, p0 + pk) of kc
// (kc <= 0: one chunk), the first chunk computing C (or adding to it when `accumulate`), the later ones adding;
// in each chunk, the columns [col0, col0 + ncols) in runs of at most `slice` that never cross a panel (slice
// divides 64). body(p0, pk, c, w, acc) computes columns [c, c + w) of chunk p0.
template <typename Body>
inline void for_each_block(int64_t P, int64_t kc, int64_t col0, int64_t ncols, int64_t slice, bool accumulate,
                           Body&& body) {
  constexpr int64_t PANEL = nsa::cpu::kPanel;
  if (kc <= 0) kc = P;
  for (int64_t p0 = 0; p0 < P; p0 += kc) {
    const int64_t pk = P - p0 < kc ? P - p0 : kc;
    const bool acc = accumulate || p0 > 0;
    for (int64_t c = col0; c < col0 + ncols;) {
      const int64_t panel_end = (c / PANEL + 1) * PANEL;
      const int64_t end = panel_end < col0 + ncols ? panel_end : col0 + ncols;
      const int64_t w = end - c < slice ? end - c : slice;
      body(p0, pk, c, w, acc);
      c += w;
    }
  }
}

// Columns [col0, col0 + ncols) of the panel matrix (both multiples of 16), into C[:, 0..ncols).
template <typename Rows>
inline void gemm_f32_blocks(const Rows& rows, int64_t R, const float* B, int64_t panel_stride, int64_t col0,
                            int64_t ncols, int64_t P, int64_t kc, float alpha, bool accumulate) {
  constexpr int64_t PANEL = nsa::cpu::kPanel;
  for_each_block(P, kc, col0, ncols, V::kSliceVectors * V::W, accumulate,
                 [&](int64_t p0, int64_t pk, int64_t c, int64_t w, bool acc) {
                   const float* Bs = B + (c / PANEL) * panel_stride + p0 * PANEL + (c % PANEL);
                   gemm_slice_f32(static_cast<int>(w / V::W), rows.shifted(p0, c - col0), R, Bs, pk, alpha, acc);
                 });
}
inline void gemm_f32_impl(const float* A, int64_t lda, int64_t R, const float* B, int64_t panel_stride,
                          int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha,
                          bool accumulate) {
  gemm_f32_blocks(StridedRows<float>{A, lda, C, ldc}, R, B, panel_stride, col0, ncols, P, kc, alpha, accumulate);
}
inline void gemm_f32_gather_impl(const float* const* a_rows, int64_t R, const float* B, int64_t panel_stride,
                                 int64_t col0, int64_t ncols, int64_t P, int64_t kc, float* const* c_rows, float alpha,
                                 bool accumulate) {
  gemm_f32_blocks(PointerRows<float>{a_rows, 0, c_rows, 0}, R, B, panel_stride, col0, ncols, P, kc, alpha,
                  accumulate);
}

// ------------------------------------------------------------------ backward (docs/spec/compress_attention.md §7)
// P and dS of one row of a tile pair (KernelTable::softmax_grad_row). V::keep_bytes(x, keep) is x where
// keep[i] != 0 and +0 elsewhere, so a masked entry gives exactly P = 0 whatever its score.
inline void softmax_grad_row_impl(float* s, float* dp, const uint8_t* keep, int64_t n, float m, float il,
                                  float dlt) {
  const V::F vm = V::set1(m), vil = V::set1(il), vd = V::set1(dlt);
  for (int64_t i = 0; i < n; i += V::W) {
    const V::F p = V::keep_bytes(V::mul(vexp(V::sub(V::load(s + i), vm)), vil), keep + i);
    V::store(s + i, p);
    V::store(dp + i, V::mul(p, V::sub(V::load(dp + i), vd)));
  }
}

// Plain blocked transpose (8 x 8 blocks).
template <typename T>
inline void transpose_blocked(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  constexpr int64_t B = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t r1 = r0 + B < rows ? r0 + B : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t c1 = c0 + B < cols ? c0 + B : cols;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}
inline void transpose_u16_impl(const uint16_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint16_t* dst,
                               int64_t ld_dst) {
  transpose_blocked(src, ld_src, rows, cols, dst, ld_dst);
}
inline void transpose_u32_impl(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst,
                               int64_t ld_dst) {
  transpose_blocked(src, ld_src, rows, cols, dst, ld_dst);
}

// ------------------------------------------------------------------ the table
// This ISA's KernelTable (src/cpu/kernels.h): every kernel above, plus what only some ISA files provide (null
// where the ISA has none): the bf16 dot-product GEMM, its P/dS packing and in-place P.V, and transposes of its own.
inline constexpr nsa::cpu::KernelTable make_table(
    nsa::CpuIsa isa, decltype(nsa::cpu::GemmKernels::bf16) gemm_bf16 = nullptr,
    decltype(nsa::cpu::GradKernels::pack_rows_bf16) pack_rows_bf16 = nullptr,
    decltype(nsa::cpu::GradKernels::transpose_u16) transpose_u16 = transpose_u16_impl,
    decltype(nsa::cpu::GradKernels::transpose_u32) transpose_u32 = transpose_u32_impl,
    decltype(nsa::cpu::GemmKernels::pv_bf16) pv_bf16 = nullptr,
    decltype(nsa::cpu::GemmKernels::bf16_gather) gemm_bf16_gather = nullptr) {
  nsa::cpu::KernelTable t{};
  t.isa = isa;
  t.gemm = {.f32 = gemm_f32_impl, .f32_gather = gemm_f32_gather_impl, .bf16 = gemm_bf16,
            .bf16_gather = gemm_bf16_gather, .pv_bf16 = pv_bf16};
  t.rows = {.row_max = row_max_impl, .exp_sum = exp_sum_impl, .softmax_rows = softmax_rows_impl,
            .normalize_row = normalize_row_impl,
            .normalize_group = normalize_group_impl, .box_sum = box_sum_impl, .add_row = add_row_impl,
            .store_row = store_row_impl, .store_row_stream = store_row_stream_impl, .stream_fence = stream_fence_impl,
            .load_row = load_row_impl};
  t.select = {.top_k = top_k_impl, .block_scores = block_scores_impl, .force = force_impl};
  t.grad = {.softmax_grad_row = softmax_grad_row_impl, .pack_rows_bf16 = pack_rows_bf16,
            .transpose_u16 = transpose_u16, .transpose_u32 = transpose_u32};
  return t;
}
