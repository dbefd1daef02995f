// AVX-512F vector traits for kernels_impl.h (included by the AVX-512 ISA files only).
#pragma once
// (immintrin.h, cstdint and cpu/arch/x86/vectors.h are included at global scope by the including .cpp)

struct V : nsa::cpu::Avx512Vector<V> {
  static constexpr int kSliceVectors = 4;  // 64 columns: the whole panel
  static constexpr int kMaxRows = 6;       // 24 accumulators + 4 B vectors + broadcast
  static constexpr bool kStream = true;
  static void stream_fence() { _mm_sfence(); }
  // One 64-byte line of a row store: src[0..64 / element size) rounded to dt as store_row does (bf16 / fp16 nearest
  // even, fp32 as is), assembled in a register and written with one non-temporal store to dst (64-byte aligned).
  static void stream_line(void* dst, const float* src, nsa::DType dt) {
    __m512i line;
    if (dt == nsa::DType::kBF16) {
      line = bf16_bits2(load(src), load(src + 16));
    } else if (dt == nsa::DType::kF16) {
      const __m256i a = _mm512_cvtps_ph(load(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i b = _mm512_cvtps_ph(load(src + 16), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      line = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    } else {
      line = _mm512_castps_si512(load(src));
    }
    _mm512_stream_si512(static_cast<__m512i*>(dst), line);
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // VectorBase::max_lanes as a tree of vmaxps: the same value except for the sign of a zero maximum, which depends on
  // the order, so a zero is left to the lane-order loop.
  static float max_lanes(F v, float init) {
    // (maskz with all lanes is plain vmaxps; GCC 12 warns about the unmasked intrinsic's undefined pass-through)
    constexpr __mmask16 all = 0xffff;
    F t = _mm512_maskz_max_ps(all, v, set1(init));
    t = _mm512_maskz_max_ps(all, t, swap_lanes<8>(t));
    t = _mm512_maskz_max_ps(all, t, swap_lanes<4>(t));
    t = _mm512_maskz_max_ps(all, t, swap_lanes<2>(t));
    t = _mm512_maskz_max_ps(all, t, swap_lanes<1>(t));
    const float r = t[0];
    return r == 0.0f ? nsa::cpu::VectorBase<F, V>::max_lanes(v, init) : r;
  }
  // VectorBase::sum16 in registers: the same additions of the same pairs (lane j + 8 onto lane j, then + 4, + 2,
  // + 1; the other lanes hold the mirrored sums, unused).
  static float sum16(const F* acc) {
    F t = acc[0];
    t = t + swap_lanes<8>(t);
    t = t + swap_lanes<4>(t);
    t = t + swap_lanes<2>(t);
    t = t + swap_lanes<1>(t);
    return t[0];
  }
  // lane j of the result = lane j ^ S of t (S a power of two): the partner of each lane at distance S
  template <int S>
  static F swap_lanes(F t) {
    return __builtin_shufflevector(t, t, 0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S, 4 ^ S, 5 ^ S, 6 ^ S, 7 ^ S, 8 ^ S, 9 ^ S, 10 ^ S,
                                   11 ^ S, 12 ^ S, 13 ^ S, 14 ^ S, 15 ^ S);
  }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F rint(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale2(F p, F n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, one rounding
  static F keep_nan(F x, F r) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x); }
  static F inf_above(F x, F hi, F r) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), r, _mm512_set1_ps(__builtin_inff()));
  }
  static __m512i bf16_round_bits(F x) {  // float bits rounded to nearest even at bit 16
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  }
  static F round_bf16(F x) { return keep_nan(x, _mm512_castsi512_ps(bf16_round_bits(x))); }
  static F round_f16(F x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  // The bf16 bits of x rounded as round_bf16 does (nearest even, a NaN kept as the upper half of its bits): 16 values.
  static __m256i bf16_bits(F x) {
#ifdef __AVX512BF16__
    // vcvtneps2bf16 rounds to nearest even too, but reads subnormal inputs as zero and quiets NaN: it serves vectors
    // with neither (where its bits equal the integer rounding's on every input: checked on all 2^32 floats)
    if (_mm512_fpclass_ps_mask(x, kSubnormalOrNan) == 0) return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#endif
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(x)), 16));
  }
  // bf16_bits of a (elements 0..15) and b (16..31) in one register
  static __m512i bf16_bits2(F a, F b) {
#ifdef __AVX512BF16__
    if ((_mm512_fpclass_ps_mask(a, kSubnormalOrNan) | _mm512_fpclass_ps_mask(b, kSubnormalOrNan)) == 0)
      return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
#endif
    return _mm512_inserti64x4(_mm512_castsi256_si512(bf16_bits(a)), bf16_bits(b), 1);
  }
  // vfpclassps categories: quiet NaN (0x01), subnormal (0x20), signalling NaN (0x80)
  static constexpr int kSubnormalOrNan = 0x01 | 0x20 | 0x80;
  // store_bf16_bits(p, round_bf16(x))
  static void store_bf16(uint16_t* p, F x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(x)); }
  static void store_bf16_bits(uint16_t* p, F v) {
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  static void store_f16(uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // number of p[0..16) >= v (a NaN on either side never counts)
  static int count_ge(const float* p, float v) {
    return __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(load(p), set1(v), _CMP_GE_OQ)));
  }
  // VectorBase::kth_largest32 with the 32 counts in two registers: for each value x, every lane y with x >= y counts
  // one more; then the largest lane whose count reaches K.
  static float kth_largest32(const float* gm, int K) {
    const F a = load(gm), b = load(gm + 16);
    __m512i ca = _mm512_setzero_si512(), cb = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int i = 0; i < 32; ++i) {
      const F x = set1(gm[i]);
      ca = _mm512_mask_add_epi32(ca, _mm512_cmp_ps_mask(x, a, _CMP_GE_OQ), ca, one);
      cb = _mm512_mask_add_epi32(cb, _mm512_cmp_ps_mask(x, b, _CMP_GE_OQ), cb, one);
    }
    const __m512i kv = _mm512_set1_epi32(K);
    const F none = set1(-__builtin_inff());
    const F qa = _mm512_mask_mov_ps(none, _mm512_cmpge_epi32_mask(ca, kv), a);
    const F qb = _mm512_mask_mov_ps(none, _mm512_cmpge_epi32_mask(cb, kv), b);
    return _mm512_reduce_max_ps(_mm512_max_ps(qa, qb));
  }
  // VectorBase::compact_gt, 16 scores at a time: the lanes above t compressed in order (vpcompressd into a register)
  // and stored under a mask of their count, so nothing past idx[count) / bits[count) is written.
  static int64_t compact_gt(const float* p, int64_t n, float t, int32_t* idx, int32_t* bits) {
    const __m512 tv = set1(t);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 valid = n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, p + i);
      const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, v, tv, _CMP_GT_OQ);
      const int c = __builtin_popcount(static_cast<unsigned>(m));
      const __mmask16 out = static_cast<__mmask16>((1u << c) - 1);
      _mm512_mask_storeu_epi32(idx + count, out, _mm512_maskz_compress_epi32(m, iv));
      _mm512_mask_storeu_epi32(bits + count, out, _mm512_maskz_compress_epi32(m, _mm512_castps_si512(v)));
      count += c;
      iv = _mm512_add_epi32(iv, _mm512_set1_epi32(16));
    }
    return count;
  }
  // top_k's step 3 (kernels_impl.h) for na <= 32 candidates, counted the other way round: cand[0..32) (A's scores in
  // index order, -inf pads from na on, no NaN) in two registers, one rank per lane; for each member b, every lane a
  // with v_a < v_b, or v_a == v_b and a > b, counts one more (vcmpps, the tie compare masked to the lanes after b,
  // one masked add), so rank(a) = #{b : v_b > v_a} + #{b before a : v_b == v_a} with no branch on ties; then
  // top[rank] = index[a] for rank < K (ranks >= K, and the pads' ranks, are not used: the pads are never a b).
  static bool rank_top32(const float* cand, int64_t na, const int32_t* index, int K, int32_t* top) {
    if (na > 32) return false;
    if (na <= 16) {
      rank_top_v<1>(cand, na, index, K, top);
    } else {
      rank_top_v<2>(cand, na, index, K, top);
    }
    return true;
  }
  template <int NV>  // candidate vectors: na <= 16 NV
  static void rank_top_v(const float* cand, int64_t na, const int32_t* index, int K, int32_t* top) {
    F c[NV];
    __m512i r[NV];
    for (int v = 0; v < NV; ++v) {
      c[v] = load(cand + 16 * v);
      r[v] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t b = 0; b < na; ++b) {
      const F vb = set1(cand[b]);
      const uint64_t after = ~uint64_t{0} << (b + 1);  // lanes a > b (b + 1 <= 32)
      for (int v = 0; v < NV; ++v) {
        const __mmask16 later = static_cast<__mmask16>(after >> (16 * v));
        const __mmask16 below = _mm512_cmp_ps_mask(c[v], vb, _CMP_LT_OQ) |
                                _mm512_mask_cmp_ps_mask(later, c[v], vb, _CMP_EQ_OQ);
        r[v] = _mm512_mask_add_epi32(r[v], below, r[v], one);
      }
    }
    alignas(64) int32_t rank[16 * NV];
    for (int v = 0; v < NV; ++v) _mm512_store_si512(rank + 16 * v, r[v]);
    for (int64_t a = 0; a < na; ++a) top[rank[a] < K ? rank[a] : K] = index[a];  // the spare slot top[K] takes the rest
  }
  // number of p[0..16) > v (a NaN on either side never counts)
  static int count_gt(const float* p, float v) {
    return __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(load(p), set1(v), _CMP_GT_OQ)));
  }
  // x where keep[i] != 0, else +0 (backward: masked entries of a tile pair); reads 16 bytes
  static F keep_bytes(F x, const uint8_t* keep) {
    const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep));
    return _mm512_maskz_mov_ps(_mm_test_epi8_mask(k, k), x);
  }
  // value where b[i] != 0, else x (forced selection blocks); reads 16 bytes
  static F set_where_bytes(F x, const uint8_t* b, float value) {
    const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    return _mm512_mask_blend_ps(_mm_test_epi8_mask(k, k), x, set1(value));
  }
  // KernelTable::select.block_scores for M = 2, 4, 8, 16 scores at a time. Their blocks cover the 16 M positions
  // x0 + i (x0 = M k + 1, block j at x0 + M j .. x0 + M j + M - 1), held as M vectors of b (N shifted loads each,
  // added in order n = 0, 1, ...). Phase f of the 16 blocks, b[x0 + M j + f] for j < 16, comes from the vector
  // pairs (b[2q], b[2q + 1]) by one vpermt2ps each (lane j from pair q = M j / 32, element (M j + f) % 32); the
  // phases are added from f = M - 1 down (m = M - 1 - f). The last, partial step loads only the positions up to
  // M k1 (masked loads: nothing past them is read) and stores only its scores.
  static bool block_scores(const float* p, int64_t k0, int64_t k1, int M, int N, float* score) {
    switch (M) {
      case 2: block_scores_m<2>(p, k0, k1, N, score); return true;
      case 4: block_scores_m<4>(p, k0, k1, N, score); return true;
      case 8: block_scores_m<8>(p, k0, k1, N, score); return true;
      default: return false;
    }
  }
  template <int M>
  static void block_scores_m(const float* p, int64_t k0, int64_t k1, int N, float* score) {
    constexpr int kPairs = M / 2;          // vector pairs spanned by 16 blocks (16 M positions = M vectors)
    constexpr int kLanesPerPair = 16 / kPairs;  // consecutive blocks (lanes) gathered from one pair
    // phase[f] lane j = (M j + f) % 32, as vector arithmetic on constants (folded at compile time)
    const __m512i lane_m = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(M));
    __m512i phase[M];
    for (int f = 0; f < M; ++f)
      phase[f] = _mm512_and_si512(_mm512_add_epi32(lane_m, _mm512_set1_epi32(f)), _mm512_set1_epi32(31));
    const int64_t last = M * k1;  // the highest position any score reads
    for (int64_t k = k0; k < k1; k += 16) {
      const int64_t x0 = M * k + 1;
      __m512 b[M];
      for (int i = 0; i < M; ++i) {
        const int64_t first = x0 + 16 * i, valid = last - first + 1;  // positions first + lane <= last
        const __mmask16 mask = valid >= 16 ? __mmask16(0xffff)
                               : valid <= 0 ? __mmask16(0)
                                            : static_cast<__mmask16>((1u << valid) - 1);
        F acc = _mm512_maskz_loadu_ps(mask, p + first);
        for (int n = 1; n < N; ++n) acc = add(acc, _mm512_maskz_loadu_ps(mask, p + first - n));
        b[i] = acc;
      }
      F s = zero();
      for (int f = M - 1; f >= 0; --f) {
        F e = _mm512_permutex2var_ps(b[0], phase[f], b[1]);
        for (int q = 1; q < kPairs; ++q) {
          const __mmask16 lanes = static_cast<__mmask16>(((1u << kLanesPerPair) - 1) << (q * kLanesPerPair));
          e = _mm512_mask_mov_ps(e, lanes, _mm512_permutex2var_ps(b[2 * q], phase[f], b[2 * q + 1]));
        }
        s = f == M - 1 ? e : add(s, e);
      }
      const int64_t left = k1 - k;
      _mm512_mask_storeu_ps(score + k, left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1), s);
    }
  }
};
