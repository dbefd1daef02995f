// Generic kernel bodies, instantiated once per ISA. Include this file INSIDE a namespace unique to
// the ISA, after defining `struct V` (the vector traits below) in that namespace, so nothing here
// is shared between translation units compiled with different flags (no ODR mixing).
//
// V must provide: type F, constexpr int W (fp32 lanes), zero(), load(p), store(p, v), set1(x),
// fma(a, b, c) = a*b + c (fused), add, sub, mul, div, max(a, b) (returns b when either is NaN),
// min(a, b), rint(x) (nearest even), pow2(n) (2^n for integral-valued float n in [-126, 127]),
// keep_nan(x, r) (x where x is NaN, else r), round_bf16(x), round_f16(x) (float -> dtype -> float,
// nearest even), store_bf16_bits(uint16_t*, v) (v already bf16-representable), reduce_max(v, init).
// Optional: V::kHasBf16Dot with a gemm_bf16 provided by the ISA file.

// ------------------------------------------------------------------ exp
// exp(x) for float32 with Cephes-style range reduction and polynomial (about 1 ulp); exact 0 for
// x < -110 (and -inf), +inf for x > 88.72, NaN kept. The same sequence of fused operations on every
// ISA, so every path gives bitwise identical results.
inline V::F vexp(V::F x) {
  const V::F lo = V::set1(-110.0f), hi = V::set1(88.7228391f);
  V::F xc = V::min(V::max(x, lo), hi);
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
  // 2^n split in two factors so that n down to -159 underflows gracefully (gradual underflow).
  const V::F n1 = V::rint(V::mul(n, V::set1(0.5f)));
  const V::F n2 = V::sub(n, n1);
  V::F res = V::mul(V::mul(p, V::pow2(n1)), V::pow2(n2));
  // x > 88.72 -> inf
  res = V::inf_above(x, hi, res);
  return V::keep_nan(x, res);
}

// ------------------------------------------------------------------ row operations
inline float row_max_impl(const float* x, int64_t n, float init) {
  V::F m = V::set1(init);
  for (int64_t i = 0; i < n; i += V::W) m = V::max(V::load(x + i), m);
  return V::reduce_max(m, init);
}

inline float canonical_sum16(float* part) {
  for (int s = 8; s >= 1; s /= 2)
    for (int j = 0; j < s; ++j) part[j] = part[j] + part[j + s];
  return part[0];
}

inline float exp_sum_impl(float* x, int64_t n, float m) {
  constexpr int NA = 16 / V::W;  // accumulators so that lane j of accumulator a holds i % 16 == a*W + j
  V::F acc[NA];
  for (int a = 0; a < NA; ++a) acc[a] = V::zero();
  const V::F vm = V::set1(m);
  for (int64_t i = 0; i < n; i += 16) {
    for (int a = 0; a < NA; ++a) {
      const V::F e = vexp(V::sub(V::load(x + i + a * V::W), vm));
      V::store(x + i + a * V::W, e);
      acc[a] = V::add(acc[a], e);
    }
  }
  alignas(64) float part[16];
  for (int a = 0; a < NA; ++a) V::store(part + a * V::W, acc[a]);
  return canonical_sum16(part);
}

inline void normalize_row_impl(float* x, int64_t n, float l_sum, void* out, nsa::cpu::PStore store) {
  const V::F vl = V::set1(l_sum);
  using nsa::cpu::PStore;
  for (int64_t i = 0; i < n; i += V::W) {
    const V::F p = V::div(V::load(x + i), vl);
    V::store(x + i, p);
    switch (store) {
      case PStore::kBf16Bits: V::store_bf16_bits(static_cast<uint16_t*>(out) + i, V::round_bf16(p)); break;
      case PStore::kF32AsBf16: V::store(static_cast<float*>(out) + i, V::round_bf16(p)); break;
      case PStore::kF32AsF16: V::store(static_cast<float*>(out) + i, V::round_f16(p)); break;
      case PStore::kF32: V::store(static_cast<float*>(out) + i, p); break;
    }
  }
}

inline void box_sum_impl(const float* in, float* out, int64_t n, int width) {
  for (int64_t i = 0; i < n; i += V::W) {
    V::F acc = V::load(in + i);
    for (int j = 1; j < width; ++j) acc = V::add(acc, V::load(in + i - j));
    V::store(out + i, acc);
  }
}

// ------------------------------------------------------------------ fp32 GEMM
// Micro-kernel: C[MR][NV*W] (+)= alpha * A[MR][P] . B[P][ldb], one column slice of a panel.
template <int MR, int NV>
inline void ukernel_f32(const float* A, int64_t lda, const float* B, int64_t P, float* C, int64_t ldc,
                        float alpha, bool accumulate) {
  V::F c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = V::zero();
  for (int64_t p = 0; p < P; ++p) {
    V::F b[NV];
    for (int j = 0; j < NV; ++j) b[j] = V::load(B + p * nsa::cpu::kPanel + j * V::W);
    for (int r = 0; r < MR; ++r) {
      const V::F a = V::set1(A[r * lda + p]);
      for (int j = 0; j < NV; ++j) c[r][j] = V::fma(a, b[j], c[r][j]);
    }
  }
  const V::F va = V::set1(alpha);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      float* dst = C + r * ldc + j * V::W;
      V::F v = V::mul(c[r][j], va);
      if (accumulate) v = V::add(V::load(dst), v);
      V::store(dst, v);
    }
}

template <int NV, int MRMAX>
inline void gemm_rows_f32(const float* A, int64_t lda, int64_t R, const float* B, int64_t P, float* C,
                          int64_t ldc, float alpha, bool acc) {
  int64_t r = 0;
  for (; r + MRMAX <= R; r += MRMAX) ukernel_f32<MRMAX, NV>(A + r * lda, lda, B, P, C + r * ldc, ldc, alpha, acc);
  const int64_t rest = R - r;
  A += r * lda;
  C += r * ldc;
  switch (rest) {
    case 0: break;
    case 1: ukernel_f32<1, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 2: if constexpr (MRMAX > 2) ukernel_f32<2, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 3: if constexpr (MRMAX > 3) ukernel_f32<3, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 4: if constexpr (MRMAX > 4) ukernel_f32<4, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    case 5: if constexpr (MRMAX > 5) ukernel_f32<5, NV>(A, lda, B, P, C, ldc, alpha, acc); break;
    default: break;
  }
}

inline void gemm_f32_impl(const float* A, int64_t lda, int64_t R, const float* B, int64_t panel_stride,
                          int64_t n_panels, int64_t P, int64_t kc, float* C, int64_t ldc, float alpha,
                          bool accumulate) {
  constexpr int NV = V::kSliceVectors;           // vectors per column slice
  constexpr int64_t SLICE = NV * V::W;           // columns per slice
  if (kc <= 0) kc = P;
  for (int64_t p0 = 0; p0 < P; p0 += kc) {
    const int64_t pk = P - p0 < kc ? P - p0 : kc;
    const bool acc = accumulate || p0 > 0;
    for (int64_t pn = 0; pn < n_panels; ++pn)
      for (int64_t s = 0; s < nsa::cpu::kPanel; s += SLICE)
        gemm_rows_f32<NV, V::kMaxRows>(A + p0, lda, R, B + pn * panel_stride + p0 * nsa::cpu::kPanel + s, pk,
                                       C + pn * nsa::cpu::kPanel + s, ldc, alpha, acc);
  }
}
