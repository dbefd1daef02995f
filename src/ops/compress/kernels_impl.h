// Generic bodies of the compression kernels (kernels.h), instantiated once per ISA. Include this file INSIDE a
// namespace unique to the ISA, after defining `struct V` (the vector traits) in that namespace and after
// <cstdint>, "ops/compress/kernels.h" and "ops/compress/rounding.h" at global scope, so nothing here is shared
// between translation units compiled with different flags.
//
// V provides: type F (W fp32 lanes, 16 % W == 0), zero(), set1(x), add(a, b), mul(a, b),
// load_f32(const float*), load_bf16(const uint16_t*), load_f16(const uint16_t*) (exact widening),
// store_f32(float*, F), store_bf16(uint16_t*, F, bool away), store_f16(uint16_t*, F, bool away) (the
// roundings of rounding.h lane by lane: away = rha, else rne), and reduce16(const F* v): the canonical tree of
// kernels.h over the 16 lanes held by v[0 .. 16/W) (lane k of the 16 = lane k % W of v[k / W]).
// Elements past the last whole vector of a row are handled by the scalar code below, with the same operations.

using nsa::DType;
using nsa::compress_kernels::Round;

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
  else return V::load_f32(static_cast<const float*>(row) + j);
}

template <DType DT>
inline void store1(void* out, int64_t j, float x, bool away) {
  namespace cd = nsa::compress_detail;
  if constexpr (DT == DType::kBF16)
    static_cast<uint16_t*>(out)[j] = away ? cd::f32_to_bf16_rha(x) : cd::f32_to_bf16_rne(x);
  else if constexpr (DT == DType::kF16)
    static_cast<uint16_t*>(out)[j] = away ? cd::f32_to_f16_rha(x) : cd::f32_to_f16_rne(x);
  else static_cast<float*>(out)[j] = x;
}

template <DType DT>
inline void storev(void* out, int64_t j, V::F x, bool away) {
  if constexpr (DT == DType::kBF16) V::store_bf16(static_cast<uint16_t*>(out) + j, x, away);
  else if constexpr (DT == DType::kF16) V::store_f16(static_cast<uint16_t*>(out) + j, x, away);
  else V::store_f32(static_cast<float*>(out) + j, x);
}

// ------------------------------------------------------------------ weighted_rows
// NV vectors of columns [j0, j0 + NV*W): accumulators in registers across the m rows.
template <DType DT, int NV>
inline void weighted_tile(const void* const* rows, const float* wts, int64_t m, int64_t j0, void* out, bool away) {
  V::F acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  for (int64_t i = 0; i < m; ++i) {
    const V::F wv = V::set1(wts[i]);
    const void* row = rows[i];
    for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::mul(wv, loadv<DT>(row, j0 + v * V::W)));
  }
  for (int v = 0; v < NV; ++v) storev<DT>(out, j0 + v * V::W, acc[v], away);
}

constexpr int kTileVectors = 8;  // accumulators per tile (8 of the 16 / 32 vector registers)

template <DType DT>
inline void weighted_rows_t(const void* const* rows, const float* wts, int64_t m, int64_t D, void* out, bool away) {
  const int64_t nvec = D / V::W;
  int64_t v0 = 0;
  for (; v0 + kTileVectors <= nvec; v0 += kTileVectors) weighted_tile<DT, kTileVectors>(rows, wts, m, v0 * V::W, out, away);
  const int64_t j0 = v0 * V::W;
  switch (nvec - v0) {
    case 1: weighted_tile<DT, 1>(rows, wts, m, j0, out, away); break;
    case 2: weighted_tile<DT, 2>(rows, wts, m, j0, out, away); break;
    case 3: weighted_tile<DT, 3>(rows, wts, m, j0, out, away); break;
    case 4: weighted_tile<DT, 4>(rows, wts, m, j0, out, away); break;
    case 5: weighted_tile<DT, 5>(rows, wts, m, j0, out, away); break;
    case 6: weighted_tile<DT, 6>(rows, wts, m, j0, out, away); break;
    case 7: weighted_tile<DT, 7>(rows, wts, m, j0, out, away); break;
    default: break;
  }
  for (int64_t j = nvec * V::W; j < D; ++j) {  // the last D % W columns, same operations one at a time
    float acc = 0.0f;
    for (int64_t i = 0; i < m; ++i) acc = acc + wts[i] * load1<DT>(rows[i], j);
    store1<DT>(out, j, acc, away);
  }
}

inline void weighted_rows_impl(DType dt, const void* const* rows, const float* wts, int64_t m, int64_t D, void* out,
                               Round mode) {
  const bool away = mode == Round::kAway;
  switch (dt) {
    case DType::kBF16: weighted_rows_t<DType::kBF16>(rows, wts, m, D, out, away); break;
    case DType::kF16: weighted_rows_t<DType::kF16>(rows, wts, m, D, out, away); break;
    default: weighted_rows_t<DType::kF32>(rows, wts, m, D, out, away); break;
  }
}

// ------------------------------------------------------------------ row_dots
constexpr int kLaneVectors = 16 / V::W;  // vectors holding the 16 canonical partial sums
constexpr int kDotRows = 4;              // rows per pass: independent dependency chains

// Scalar form of the canonical reduction (tails and the scalar table).
inline float canonical16(float* part) {
  for (int s = 8; s >= 1; s /= 2)
    for (int k = 0; k < s; ++k) part[k] = part[k] + part[k + s];
  return part[0];
}

// The 16 partial sums of NR rows: whole groups of 16 columns in vectors, the last D % 16 columns added to their
// lanes one at a time (lane k = j % 16), then the canonical tree.
template <DType DT, int NR>
inline void dots_group(const float* g, const void* const* rows, int64_t D, float* dots) {
  V::F acc[NR][kLaneVectors];
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < kLaneVectors; ++a) acc[r][a] = V::zero();
  const int64_t d16 = D / 16 * 16;
  for (int64_t j = 0; j < d16; j += 16) {
    for (int a = 0; a < kLaneVectors; ++a) {
      const V::F gv = V::load_f32(g + j + a * V::W);
      for (int r = 0; r < NR; ++r) acc[r][a] = V::add(acc[r][a], V::mul(gv, loadv<DT>(rows[r], j + a * V::W)));
    }
  }
  for (int r = 0; r < NR; ++r) {
    if (d16 == D) {
      dots[r] = V::reduce16(acc[r]);
      continue;
    }
    alignas(64) float part[16];
    for (int a = 0; a < kLaneVectors; ++a) V::store_f32(part + a * V::W, acc[r][a]);
    for (int64_t j = d16; j < D; ++j) part[j - d16] = part[j - d16] + g[j] * load1<DT>(rows[r], j);
    dots[r] = canonical16(part);
  }
}

template <DType DT>
inline void row_dots_t(const float* g, const void* const* rows, int64_t m, int64_t D, float* dots) {
  int64_t i = 0;
  for (; i + kDotRows <= m; i += kDotRows) dots_group<DT, kDotRows>(g, rows + i, D, dots + i);
  for (; i < m; ++i) dots_group<DT, 1>(g, rows + i, D, dots + i);
}

inline void row_dots_impl(DType dt, const float* g, const void* const* rows, int64_t m, int64_t D, float* dots) {
  switch (dt) {
    case DType::kBF16: row_dots_t<DType::kBF16>(g, rows, m, D, dots); break;
    case DType::kF16: row_dots_t<DType::kF16>(g, rows, m, D, dots); break;
    default: row_dots_t<DType::kF32>(g, rows, m, D, dots); break;
  }
}

// ------------------------------------------------------------------ widen
template <DType DT>
inline void widen_t(const void* src, int64_t D, float* dst) {
  int64_t j = 0;
  for (; j + V::W <= D; j += V::W) V::store_f32(dst + j, loadv<DT>(src, j));
  for (; j < D; ++j) dst[j] = load1<DT>(src, j);
}

inline void widen_impl(DType dt, const void* src, int64_t D, float* dst) {
  switch (dt) {
    case DType::kBF16: widen_t<DType::kBF16>(src, D, dst); break;
    case DType::kF16: widen_t<DType::kF16>(src, D, dst); break;
    default: widen_t<DType::kF32>(src, D, dst); break;
  }
}
