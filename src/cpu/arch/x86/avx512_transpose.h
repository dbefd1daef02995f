// 32-bit word transposes on AVX-512F for the AVX-512 ISA files (included inside their ISA namespace, after
// immintrin.h and cstdint at global scope).
#pragma once

// In-register transpose of a 16 x 16 matrix of 32-bit words (w[row] -> w[column]).
inline void transpose16x16_epi32(__m512i w[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(w[2 * i], w[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(w[2 * i], w[2 * i + 1]);
  }
  // u[4k + j]: rows 4k..4k+3, columns j, j + 4, j + 8, j + 12 (one per 128-bit lane)
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  // t[j], j < 4: rows 0..7, columns j and j + 8 ([r0-3 cj | r0-3 cj+8 | r4-7 cj | r4-7 cj+8]); t[j + 4]: columns
  // j + 4, j + 12; t[8 + ...]: the same for rows 8..15
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_i32x4(u[8 * h + j], u[8 * h + 4 + j], 0x88);
      t[8 * h + 4 + j] = _mm512_shuffle_i32x4(u[8 * h + j], u[8 * h + 4 + j], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    w[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] (r < rows, c < cols) in 16 x 16 blocks of 32-bit words.
inline void transpose_u32_avx512(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst,
                                 int64_t ld_dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t nc = cols - c0 < 16 ? cols - c0 : 16;
    const __mmask16 cm = static_cast<__mmask16>(nc == 16 ? 0xffffu : (1u << nc) - 1u);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
      __m512i w[16];
      for (int r = 0; r < 16; ++r)
        w[r] = r < nr ? _mm512_maskz_loadu_epi32(cm, src + (r0 + r) * ld_src + c0) : _mm512_setzero_si512();
      transpose16x16_epi32(w);
      const __mmask16 rm = static_cast<__mmask16>(nr == 16 ? 0xffffu : (1u << nr) - 1u);
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_epi32(dst + (c0 + c) * ld_dst + r0, rm, w[c]);
    }
  }
}
