// Generic bodies of the compression kernels (kernels.h), instantiated once per ISA. Include this file INSIDE a
// namespace unique to the ISA, after defining `struct V` (the vector traits) in that namespace and after
// <cstdint>, <cstring>, <type_traits>, <utility>, "common/rounding.h" and "ops/compress/kernels.h" at global scope, so nothing
// here is shared between translation units compiled with different flags.
//
// V: a vector of the ISA layer (src/cpu/arch/scalar/scalar_vector.h, src/cpu/arch/x86/vectors.h; F: W fp32 lanes,
// 16 % W == 0; zero, set1, add, mul, load, store, and load_bf16 / load_f16: exact widenings of W bf16 / fp16 values).
// Stores to bf16 / fp16 apply common/rounding.h's formulas (bf16_bits_of, f16_bits_of) to all W lanes at once.
// Elements past the last whole vector of a row are handled by the scalar code below, with the same operations.
// weighted_rows on bf16 rows (W > 1) reads whole pairs of vectors as even / odd columns (weighted_pairs_bf16), then
// single vectors, then scalars. In-cache forward (bench-8k-keys, C++ loop, 2 threads of a Zen 4): 0.30-0.42 ms with
// one vector at a time, 0.22-0.29 ms with the pairs.

using nsa::DType;
using nsa::compress_kernels::Round;

// ------------------------------------------------------------------ rounded stores of W lanes
// The fp32 bit patterns of V::F's lanes: uint32_t (W = 1) or a GCC vector of W uint32 (HalfVector: W uint16).
typedef uint32_t LanesVector __attribute__((vector_size(sizeof(V::F))));
typedef uint16_t HalfVector __attribute__((vector_size(sizeof(V::F) / 2)));
using Lanes = std::conditional_t<V::W == 1, uint32_t, LanesVector>;

inline Lanes lane_bits(V::F v) {
  Lanes u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

// p[0..W) = the low 16 bits of each lane (the lanes hold values <= 0xffff): one value, or a vector narrowed lane by
// lane.
inline void store_low16(uint16_t* p, uint32_t h) { *p = static_cast<uint16_t>(h); }
template <typename L>
inline void store_low16(uint16_t* p, L h) {
  const HalfVector n = __builtin_convertvector(h, HalfVector);
  std::memcpy(p, &n, sizeof(n));
}

// The sizeof(T) bytes of a vector value stored at p: with a non-temporal store (written to memory without reading
// the line into the caches first) where STREAM and the ISA has one for that width (64 bytes under AVX-512F, 32 under
// AVX), else a plain store. p must then be aligned to sizeof(T); the caller fences (KernelTable::store_fence).
template <bool STREAM, typename T>
inline void store_vector_bytes(void* p, const T& v) {
#if defined(__AVX512F__)
  if constexpr (STREAM && sizeof(T) == 64) {
    __m512i x;
    std::memcpy(&x, &v, sizeof(x));
    _mm512_stream_si512(static_cast<__m512i*>(p), x);
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (STREAM && sizeof(T) == 32) {
    __m256i x;
    std::memcpy(&x, &v, sizeof(x));
    _mm256_stream_si256(static_cast<__m256i*>(p), x);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof(T));
}

inline void store_fence_impl() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------ scalar element access
template <DType DT>
inline float load1(const void* row, int64_t j) {
  if constexpr (DT == DType::kBF16) return nsa::detail::bf16_to_f32(static_cast<const uint16_t*>(row)[j]);
  else if constexpr (DT == DType::kF16) return nsa::detail::f16_to_f32(static_cast<const uint16_t*>(row)[j]);
  else return static_cast<const float*>(row)[j];
}

template <DType DT>
inline V::F loadv(const void* row, int64_t j) {
  if constexpr (DT == DType::kBF16) return V::load_bf16(static_cast<const uint16_t*>(row) + j);
  else if constexpr (DT == DType::kF16) return V::load_f16(static_cast<const uint16_t*>(row) + j);
  else return V::load(static_cast<const float*>(row) + j);
}

template <DType DT>
inline void store1(void* out, int64_t j, float x, bool away) {
  const uint32_t u = nsa::detail::f32_bits(x);
  uint16_t* o16 = static_cast<uint16_t*>(out) + j;
  if constexpr (DT == DType::kBF16) *o16 = static_cast<uint16_t>(nsa::detail::bf16_bits_of(u, away));
  else if constexpr (DT == DType::kF16) *o16 = static_cast<uint16_t>(nsa::detail::f16_bits_of(u, away));
  else static_cast<float*>(out)[j] = x;
}

template <DType DT>
inline void storev(void* out, int64_t j, V::F x, bool away) {
  uint16_t* o16 = static_cast<uint16_t*>(out) + j;
  if constexpr (DT == DType::kBF16) store_low16(o16, nsa::detail::bf16_bits_of(lane_bits(x), away));
  else if constexpr (DT == DType::kF16) store_low16(o16, nsa::detail::f16_bits_of(lane_bits(x), away));
  else V::store(static_cast<float*>(out) + j, x);
}

// Two vectors rounded to bf16 and stored as 2W consecutive values (W > 1): each lane's 16 bits are formed in the high
// half of its 32-bit lane (bf16_bits_high_of) and the high halves of a's then b's lanes are gathered by one shuffle,
// instead of narrowing each vector on its own.
typedef uint16_t PairHalves __attribute__((vector_size(sizeof(V::F))));

template <size_t... I>
inline PairHalves high_halves(PairHalves a, PairHalves b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I + 1)...);
}

template <bool STREAM = false>
inline void store_pair_bf16(uint16_t* p, V::F a, V::F b, bool away) {
#if defined(__AVX512BF16__)
  // rne by vcvtne2ps2bf16 (b's lanes in the high half), the same bits as the formula for every input but a denormal
  if (!away && (_mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20)) == 0) {  // 0x20: denormal
    const __m512bh h = _mm512_cvtne2ps_pbh(b, a);
    store_vector_bytes<STREAM>(p, h);
    return;
  }
#endif
  if constexpr (V::W == 1) {
    storev<DType::kBF16>(p, 0, a, away);
    storev<DType::kBF16>(p, V::W, b, away);
  } else {
    const Lanes ra = nsa::detail::bf16_bits_high_of(lane_bits(a), away);
    const Lanes rb = nsa::detail::bf16_bits_high_of(lane_bits(b), away);
    PairHalves ha, hb;
    std::memcpy(&ha, &ra, sizeof(ha));
    std::memcpy(&hb, &rb, sizeof(hb));
    const PairHalves h = high_halves(ha, hb, std::make_index_sequence<2 * V::W>{});
    store_vector_bytes<STREAM>(p, h);
  }
}

// NV vectors of dt stored at out + j0 (elements), rounded as `away` says: bf16 in pairs of vectors. STREAM: the bf16
// pairs and the fp32 vectors by non-temporal stores (store_vector_bytes; fp16's half-width stores stay plain).
template <DType DT, int NV, bool STREAM = false>
inline void store_tile(void* out, int64_t j0, const V::F* acc, bool away) {
  int v = 0;
  if constexpr (DT == DType::kBF16) {
#pragma GCC unroll 16
    for (; v + 2 <= NV; v += 2)
      store_pair_bf16<STREAM>(static_cast<uint16_t*>(out) + j0 + v * V::W, acc[v], acc[v + 1], away);
  }
  if constexpr (DT == DType::kF32 && STREAM) {
#pragma GCC unroll 16
    for (; v < NV; ++v) store_vector_bytes<true>(static_cast<float*>(out) + j0 + v * V::W, acc[v]);
  }
#pragma GCC unroll 16
  for (; v < NV; ++v) storev<DT>(out, j0 + v * V::W, acc[v], away);
}

// Prefetch of `bytes` bytes at row + pf (pf == 0: none). The address is formed as an integer: it may lie past the
// tensor (prefetches never fault).
inline void prefetch_span(const void* row, int64_t pf, int64_t bytes) {
  if (pf == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(row) + static_cast<uintptr_t>(pf);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(a + static_cast<uintptr_t>(o)), 0, 3);
}

template <DType DT>
constexpr int64_t elem_bytes() {
  return DT == DType::kF32 ? 4 : 2;
}

// ------------------------------------------------------------------ weighted_rows
// NV vectors of columns [j0, j0 + NV*W): accumulators in registers across the m rows.
// (The first tile of a row also prefetches the row pf bytes further: a later window's row, as the driver chose.)
template <DType DT, int NV>
inline void weighted_tile(const void* const* rows, const float* wts, int64_t m, int64_t j0, void* out, bool away,
                          int64_t pf, int64_t pf_bytes) {
  V::F acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  for (int64_t i = 0; i < m; ++i) {
    const V::F wv = V::set1(wts[i]);
    const void* row = rows[i];
    prefetch_span(row, pf, pf_bytes);
    for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::mul(wv, loadv<DT>(row, j0 + v * V::W)));
  }
  store_tile<DT, NV>(out, j0, acc, away);
}

constexpr int kTileVectors = 8;  // accumulators per tile (8 of the 16 / 32 vector registers)

// The last n < kTileVectors vectors of a row as one tile: tile.template operator()<n>() (nothing for n = 0).
template <typename Tile>
inline void with_tail_vectors(int64_t n, Tile&& tile) {
  static_assert(kTileVectors == 8, "one case per tail width below kTileVectors");
  switch (n) {
    case 1: tile.template operator()<1>(); break;
    case 2: tile.template operator()<2>(); break;
    case 3: tile.template operator()<3>(); break;
    case 4: tile.template operator()<4>(); break;
    case 5: tile.template operator()<5>(); break;
    case 6: tile.template operator()<6>(); break;
    case 7: tile.template operator()<7>(); break;
    default: break;
  }
}

// bf16 rows in pairs of vectors: 2W consecutive bf16 values read as W 32-bit lanes u hold column 2k in the low
// half and column 2k+1 in the high half of lane k, so u << 16 is the fp32 value of the even column and
// u & 0xffff0000 that of the odd one: two exact widenings with one integer operation each, instead of a
// zero-extending shuffle and a shift per vector. Each column still gets the same products added in the same order;
// at the store, the two rounded halves are put back in column order.
inline void widen_pair_bf16(const uint16_t* p, V::F& even, V::F& odd) {
  Lanes u;
  std::memcpy(&u, p, sizeof(u));
  const Lanes ue = u << 16, uo = u & 0xffff0000u;
  std::memcpy(&even, &ue, sizeof(even));
  std::memcpy(&odd, &uo, sizeof(odd));
}

// The even and odd columns' sums rounded and stored back in column order at p (2W values).
inline void store_pair_columns_bf16(uint16_t* p, V::F even, V::F odd, bool away) {
  const Lanes r = nsa::detail::bf16_bits_of(lane_bits(even), away) |
                  (nsa::detail::bf16_bits_of(lane_bits(odd), away) << 16);
  std::memcpy(p, &r, sizeof(r));
}

// NP pairs of vectors (columns [j0, j0 + 2 NP W)) of one window (TWO = false: rows [0, l) into out_a) or of two
// windows d rows apart (TWO = true: window A sums rows [0, l), window B rows [d, d + l), both with wts[0 .. l)).
// With two, each row is loaded and widened once and multiplied by the weight of each window it belongs to; each
// accumulator still receives its window's products in row order, so both outputs are weighted_rows' bits.
// 2 NP (one window) or 4 NP (two) accumulators in registers.
template <int NP, bool TWO>
inline void weighted_pairs_bf16(const void* const* rows, const float* wts, int64_t l, int64_t d, int64_t j0,
                                void* out_a, void* out_b, bool away, int64_t pf, int64_t pf_bytes) {
  V::F ea[NP], oa[NP], eb[NP], ob[NP];
#pragma GCC unroll 16
  for (int k = 0; k < NP; ++k) ea[k] = oa[k] = eb[k] = ob[k] = V::zero();
  const auto step = [&](int64_t i, bool in_a, bool in_b) __attribute__((always_inline)) {
    const V::F wa = V::set1(wts[in_a ? i : 0]);
    const V::F wb = V::set1(wts[in_b ? i - d : 0]);
    const uint16_t* row = static_cast<const uint16_t*>(rows[i]) + j0;
    prefetch_span(rows[i], pf, pf_bytes);
#pragma GCC unroll 16
    for (int k = 0; k < NP; ++k) {
      V::F fe, fo;
      widen_pair_bf16(row + 2 * k * V::W, fe, fo);
      if (in_a) {
        ea[k] = V::add(ea[k], V::mul(wa, fe));
        oa[k] = V::add(oa[k], V::mul(wa, fo));
      }
      if (in_b) {
        eb[k] = V::add(eb[k], V::mul(wb, fe));
        ob[k] = V::add(ob[k], V::mul(wb, fo));
      }
    }
  };
  int64_t i = 0;
  if constexpr (TWO) {  // rows [0, d): A only; [d, l): A and B; [l, l + d): B only
    for (; i < d; ++i) step(i, true, false);
    for (; i < l; ++i) step(i, true, true);
    for (; i < l + d; ++i) step(i, false, true);
  } else {
    for (; i < l; ++i) step(i, true, false);
  }
#pragma GCC unroll 16
  for (int k = 0; k < NP; ++k) {
    store_pair_columns_bf16(static_cast<uint16_t*>(out_a) + j0 + 2 * k * V::W, ea[k], oa[k], away);
    if constexpr (TWO) store_pair_columns_bf16(static_cast<uint16_t*>(out_b) + j0 + 2 * k * V::W, eb[k], ob[k], away);
  }
}

// Pairs per register tile: one window 2 NP accumulators (16 of the 32 zmm / 8 of the 16 ymm registers), two windows
// 4 NP and the temporaries (24 of 32 zmm, 8 of 16 ymm).
template <bool TWO>
constexpr int kTilePairs = TWO ? (V::W >= 16 ? 6 : 2) : (V::W >= 16 ? 8 : 4);

// The last `left` < kTilePairs<TWO> pairs as one tile of exactly that many.
template <bool TWO, int NP = kTilePairs<TWO> - 1>
inline void weighted_pairs_tail(int64_t left, const void* const* rows, const float* wts, int64_t l, int64_t d,
                                int64_t j0, void* out_a, void* out_b, bool away, int64_t pf, int64_t pf_bytes) {
  if constexpr (NP > 0) {
    if (left == NP) weighted_pairs_bf16<NP, TWO>(rows, wts, l, d, j0, out_a, out_b, away, pf, pf_bytes);
    else weighted_pairs_tail<TWO, NP - 1>(left, rows, wts, l, d, j0, out_a, out_b, away, pf, pf_bytes);
  }
}

// Pair tiles over the first D / (2W) * 2W columns of bf16 rows (W > 1) for one window (TWO = false: rows [0, l)
// into out_a) or two (weighted_pairs_bf16); returns the number of columns done.
template <bool TWO>
inline int64_t weighted_rows_bf16_pairs(const void* const* rows, const float* wts, int64_t l, int64_t d, int64_t D,
                                        void* out_a, void* out_b, bool away, int64_t pf) {
  if constexpr (V::W == 1) {
    return 0;
  } else {
    constexpr int T = kTilePairs<TWO>;
    const int64_t npairs = D / (2 * V::W), row_bytes = D * 2;
    int64_t k0 = 0;
    // the first tile prefetches whole rows, the others none
    for (; k0 + T <= npairs; k0 += T)
      weighted_pairs_bf16<T, TWO>(rows, wts, l, d, 2 * k0 * V::W, out_a, out_b, away, k0 == 0 ? pf : 0, row_bytes);
    if (k0 < npairs)
      weighted_pairs_tail<TWO>(npairs - k0, rows, wts, l, d, 2 * k0 * V::W, out_a, out_b, away, k0 == 0 ? pf : 0,
                               row_bytes);
    return npairs * 2 * V::W;
  }
}

// Columns [j_start, D) of weighted_rows (j_start a multiple of W): tiles of single vectors, then the last D % W
// columns one at a time.
template <DType DT>
inline void weighted_rows_rest(const void* const* rows, const float* wts, int64_t m, int64_t D, void* out, bool away,
                               int64_t pf, int64_t j_start) {
  const int64_t nvec = D / V::W;
  const int64_t row_bytes = D * elem_bytes<DT>();
  int64_t v0 = j_start / V::W;
  if (v0 > 0) pf = 0;  // prefetched by the first columns' tiles
  // the first tile prefetches whole rows, the others none
  for (; v0 + kTileVectors <= nvec; v0 += kTileVectors)
    weighted_tile<DT, kTileVectors>(rows, wts, m, v0 * V::W, out, away, v0 == 0 ? pf : 0, row_bytes);
  const int64_t j0 = v0 * V::W, tp = v0 == 0 ? pf : 0;
  with_tail_vectors(nvec - v0,
                    [&]<int NV>() { weighted_tile<DT, NV>(rows, wts, m, j0, out, away, tp, row_bytes); });
  for (int64_t j = nvec * V::W; j < D; ++j) {  // the last D % W columns, same operations one at a time
    float acc = 0.0f;
    for (int64_t i = 0; i < m; ++i) acc = acc + wts[i] * load1<DT>(rows[i], j);
    store1<DT>(out, j, acc, away);
  }
}

template <DType DT>
inline void weighted_rows_t(const void* const* rows, const float* wts, int64_t m, int64_t D, void* out, bool away,
                            int64_t pf) {
  int64_t j = 0;
  if constexpr (DT == DType::kBF16) j = weighted_rows_bf16_pairs<false>(rows, wts, m, 0, D, out, nullptr, away, pf);
  weighted_rows_rest<DT>(rows, wts, m, D, out, away, pf, j);
}

inline void weighted_rows_impl(DType dt, const void* const* rows, const float* wts, int64_t m, int64_t D, void* out,
                               Round mode, int64_t pf) {
  const bool away = mode == Round::kAway;
  switch (dt) {
    case DType::kBF16: weighted_rows_t<DType::kBF16>(rows, wts, m, D, out, away, pf); break;
    case DType::kF16: weighted_rows_t<DType::kF16>(rows, wts, m, D, out, away, pf); break;
    default: weighted_rows_t<DType::kF32>(rows, wts, m, D, out, away, pf); break;
  }
}

// ------------------------------------------------------------------ weighted_rows2
inline void weighted_rows2_impl(DType dt, const void* const* rows, const float* wts, int64_t l, int64_t d, int64_t D,
                                void* out_a, void* out_b, Round mode, int64_t pf) {
  const bool away = mode == Round::kAway;
  if constexpr (V::W > 1) {
    if (dt == DType::kBF16) {  // pairs of vectors for both windows in one pass, then the rest of each
      const int64_t j = weighted_rows_bf16_pairs<true>(rows, wts, l, d, D, out_a, out_b, away, pf);
      if (j < D) {
        weighted_rows_rest<DType::kBF16>(rows, wts, l, D, out_a, away, j == 0 ? pf : 0, j);
        weighted_rows_rest<DType::kBF16>(rows + d, wts, l, D, out_b, away, j == 0 ? pf : 0, j);
      }
      return;
    }
  }
  weighted_rows_impl(dt, rows, wts, l, D, out_a, mode, pf);
  weighted_rows_impl(dt, rows + d, wts, l, D, out_b, mode, 0);
}

// ------------------------------------------------------------------ weighted_rows_shared
// Tokens [0, P) of a run, vectors [j0 / W, j0 / W + NV) of their rows: sum over the m covering windows of the
// token's weight times the window's widened grad row. M > 0: m == M, known at compile time (the window loop unrolled,
// its row and weight pointers held in registers over the tokens: 5 % of the bench-8k-keys backward); M = 0: any m.
template <DType DT, int NV, int M, bool STREAM>
inline void shared_tile(const float* const* rows32, const float* const* wts, int64_t P, int64_t m, int64_t j0,
                        void* out, int64_t out_stride, bool away) {
  if constexpr (M > 0) {
    const float* row[M];
    const float* wt[M];
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      row[i] = rows32[i] + j0;
      wt[i] = wts[i];
    }
    for (int64_t p = 0; p < P; ++p) {
      V::F acc[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[v] = V::zero();
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) {
        const V::F wv = V::set1(wt[i][p]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::mul(wv, V::load(row[i] + v * V::W)));
      }
      store_tile<DT, NV, STREAM>(out, p * out_stride + j0, acc, away);
    }
    return;
  }
  for (int64_t p = 0; p < P; ++p) {
    V::F acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V::zero();
    for (int64_t i = 0; i < m; ++i) {
      const V::F wv = V::set1(wts[i][p]);
      const float* row = rows32[i] + j0;
      for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::mul(wv, V::load(row + v * V::W)));
    }
    store_tile<DT, NV, STREAM>(out, p * out_stride + j0, acc, away);
  }
}

// The whole vectors of a run's rows: tiles of kTileVectors, then one tile of the rest (shared_tile).
template <DType DT, int M, bool STREAM>
inline void shared_tiles(const float* const* rows32, const float* const* wts, int64_t P, int64_t m, int64_t nvec,
                         void* out, int64_t out_stride, bool away) {
  int64_t v0 = 0;
  for (; v0 + kTileVectors <= nvec; v0 += kTileVectors)
    shared_tile<DT, kTileVectors, M, STREAM>(rows32, wts, P, m, v0 * V::W, out, out_stride, away);
  const int64_t j0 = v0 * V::W;
  with_tail_vectors(nvec - v0,
                    [&]<int NV>() { shared_tile<DT, NV, M, STREAM>(rows32, wts, P, m, j0, out, out_stride, away); });
}

template <DType DT, bool STREAM>
inline void weighted_rows_shared_t(const float* const* rows32, const float* const* wts, int64_t P, int64_t m, int64_t D, void* out,
                                   int64_t out_stride, bool away) {
  const int64_t nvec = D / V::W;
  if (m == 2) shared_tiles<DT, 2, STREAM>(rows32, wts, P, m, nvec, out, out_stride, away);  // l = 2d, the common case
  else shared_tiles<DT, 0, STREAM>(rows32, wts, P, m, nvec, out, out_stride, away);
  for (int64_t j = nvec * V::W; j < D; ++j)  // the last D % W columns, same operations one at a time
    for (int64_t p = 0; p < P; ++p) {
      float acc = 0.0f;
      for (int64_t i = 0; i < m; ++i) acc = acc + wts[i][p] * rows32[i][j];
      store1<DT>(out, p * out_stride + j, acc, away);
    }
}

template <bool STREAM>
inline void weighted_rows_shared_dt(DType dt, const float* const* rows32, const float* const* wts, int64_t P, int64_t m,
                                    int64_t D, void* out, int64_t out_stride, bool away) {
  switch (dt) {
    case DType::kBF16: weighted_rows_shared_t<DType::kBF16, STREAM>(rows32, wts, P, m, D, out, out_stride, away); break;
    case DType::kF16: weighted_rows_shared_t<DType::kF16, STREAM>(rows32, wts, P, m, D, out, out_stride, away); break;
    default: weighted_rows_shared_t<DType::kF32, STREAM>(rows32, wts, P, m, D, out, out_stride, away); break;
  }
}

inline void weighted_rows_shared_impl(DType dt, const float* const* rows32, const float* const* wts, int64_t P, int64_t m, int64_t D,
                                      void* out, int64_t out_stride, Round mode, bool stream) {
  const bool away = mode == Round::kAway;
  if (stream) weighted_rows_shared_dt<true>(dt, rows32, wts, P, m, D, out, out_stride, away);
  else weighted_rows_shared_dt<false>(dt, rows32, wts, P, m, D, out, out_stride, away);
}

// ------------------------------------------------------------------ dot_lanes
constexpr int kLaneVectors = 16 / V::W;  // vectors holding the 16 partial sums of one row
constexpr int kDotRows = 4;              // rows per pass: independent dependency chains

// NR rows of one window (IN_A: g = ga into lanes_a) or of two windows d rows apart (dot_lanes2: each row widened once
// and multiplied by ga into lanes_a, its window-A position, and / or gb into lanes_b, its window-B position): the
// lanes in registers over the whole groups of 16 columns, then the last D % 16 columns added to lanes j % 16 one at a
// time. The lane sets are distinct (dot_lanes_range keeps NR <= d where both windows are updated), so each lane
// still receives its products in increasing j, row after row.
template <DType DT, int NR, bool IN_A, bool IN_B>
inline void dot_lanes_group(const float* ga, const float* gb, const void* const* rows, int64_t D, float* lanes_a,
                             float* lanes_b) {
  V::F acc_a[NR][kLaneVectors], acc_b[NR][kLaneVectors];
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < kLaneVectors; ++a) {
      if (IN_A) acc_a[r][a] = V::load(lanes_a + r * 16 + a * V::W);
      if (IN_B) acc_b[r][a] = V::load(lanes_b + r * 16 + a * V::W);
    }
  const int64_t d16 = D / 16 * 16;
  for (int64_t j = 0; j < d16; j += 16) {
    for (int a = 0; a < kLaneVectors; ++a) {
      const V::F gav = IN_A ? V::load(ga + j + a * V::W) : V::zero();
      const V::F gbv = IN_B ? V::load(gb + j + a * V::W) : V::zero();
      for (int r = 0; r < NR; ++r) {
        const V::F x = loadv<DT>(rows[r], j + a * V::W);
        if (IN_A) acc_a[r][a] = V::add(acc_a[r][a], V::mul(gav, x));
        if (IN_B) acc_b[r][a] = V::add(acc_b[r][a], V::mul(gbv, x));
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int a = 0; a < kLaneVectors; ++a) {
      if (IN_A) V::store(lanes_a + r * 16 + a * V::W, acc_a[r][a]);
      if (IN_B) V::store(lanes_b + r * 16 + a * V::W, acc_b[r][a]);
    }
    for (int64_t j = d16; j < D; ++j) {
      const float x = load1<DT>(rows[r], j);
      if (IN_A) lanes_a[r * 16 + (j - d16)] = lanes_a[r * 16 + (j - d16)] + ga[j] * x;
      if (IN_B) lanes_b[r * 16 + (j - d16)] = lanes_b[r * 16 + (j - d16)] + gb[j] * x;
    }
  }
}

// Rows [u0, u1) (of the two windows' l + d rows, or of one window's l), kDotRows at a time (fewer where both windows
// are updated and d is smaller: the rows of one group must not update a lane set that another of its rows updates
// through the other window).
template <DType DT, bool IN_A, bool IN_B>
inline void dot_lanes_range(const float* ga, const float* gb, const void* const* rows, int64_t u0, int64_t u1,
                             int64_t d, int64_t D, float* lanes) {
  // lane sets of row u: window A's position u, window B's u - d (only formed where the row belongs to that window)
  const auto lanes_a = [&](int64_t u) { return IN_A ? lanes + u * 16 : nullptr; };
  const auto lanes_b = [&](int64_t u) { return IN_B ? lanes + (u - d) * 16 : nullptr; };
  int64_t u = u0;
  if (!(IN_A && IN_B) || d >= kDotRows)
    for (; u + kDotRows <= u1; u += kDotRows)
      dot_lanes_group<DT, kDotRows, IN_A, IN_B>(ga, gb, rows + u, D, lanes_a(u), lanes_b(u));
  for (; u < u1; ++u) dot_lanes_group<DT, 1, IN_A, IN_B>(ga, gb, rows + u, D, lanes_a(u), lanes_b(u));
}

template <DType DT>
inline void dot_lanes2_t(const float* ga, const float* gb, const void* const* rows, int64_t l, int64_t d, int64_t D,
                         float* lanes) {
  dot_lanes_range<DT, true, false>(ga, gb, rows, 0, d, d, D, lanes);      // window A only
  dot_lanes_range<DT, true, true>(ga, gb, rows, d, l, d, D, lanes);       // both
  dot_lanes_range<DT, false, true>(ga, gb, rows, l, l + d, d, D, lanes);  // window B only
}

inline void dot_lanes2_impl(DType dt, const float* ga, const float* gb, const void* const* rows, int64_t l, int64_t d,
                            int64_t D, float* lanes) {
  switch (dt) {
    case DType::kBF16: dot_lanes2_t<DType::kBF16>(ga, gb, rows, l, d, D, lanes); break;
    case DType::kF16: dot_lanes2_t<DType::kF16>(ga, gb, rows, l, d, D, lanes); break;
    default: dot_lanes2_t<DType::kF32>(ga, gb, rows, l, d, D, lanes); break;
  }
}

inline void dot_lanes_impl(DType dt, const float* g, const void* const* rows, int64_t m, int64_t D, float* lanes) {
  switch (dt) {  // one window: rows [0, m) into lanes + i * 16
    case DType::kBF16: dot_lanes_range<DType::kBF16, true, false>(g, nullptr, rows, 0, m, 0, D, lanes); break;
    case DType::kF16: dot_lanes_range<DType::kF16, true, false>(g, nullptr, rows, 0, m, 0, D, lanes); break;
    default: dot_lanes_range<DType::kF32, true, false>(g, nullptr, rows, 0, m, 0, D, lanes); break;
  }
}

// ------------------------------------------------------------------ widen
template <DType DT>
inline void widen_t(const void* src, int64_t D, float* dst) {
  int64_t j = 0;
  for (; j + V::W <= D; j += V::W) V::store(dst + j, loadv<DT>(src, j));
  for (; j < D; ++j) dst[j] = load1<DT>(src, j);
}

inline void widen_impl(DType dt, const void* src, int64_t D, float* dst) {
  switch (dt) {
    case DType::kBF16: widen_t<DType::kBF16>(src, D, dst); break;
    case DType::kF16: widen_t<DType::kF16>(src, D, dst); break;
    default: widen_t<DType::kF32>(src, D, dst); break;
  }
}

// ------------------------------------------------------------------ the table of this ISA
inline const nsa::compress_kernels::KernelTable* make_table(nsa::CpuIsa isa) {
  static const nsa::compress_kernels::KernelTable t{isa, &weighted_rows_impl, &weighted_rows2_impl,
                                                    &weighted_rows_shared_impl, &dot_lanes_impl, &dot_lanes2_impl,
                                                    &widen_impl, &store_fence_impl};
  return &t;
}
