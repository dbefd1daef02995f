// Optimized CPU backend of npu_nsa_compress_attention_infer (docs/spec/decode.md §3).
//
// Units: (batch b, KV head n2), handed to the threads in order; each writes only its own output rows. Per unit,
// with R = q_b * G query rows stacked as row r = i * G + g (token i, head h = n2 * G + g) and C = C_b:
//   1. gather: the C compressed keys and values of KV head n2 are read through the block table (token c at page
//      block_table[b, c / P], row c % P) into packed GEMM panels of the worker (src/cpu/kernels.h layouts: bf16
//      pairs for the vdpbf16ps path, fp32 otherwise), zero padded to cp = C rounded up to 64 tokens; the R query
//      rows likewise into an A operand. Only the batch's own C tokens are touched: work is O(R * C * (D + Dv)).
//   2. S[R][cp] = (Q . K^T) * scale (GEMM, fp32 accumulation, §3 step 2); MTP causality replaces the scores of
//      compressed tokens whose window ends after the query token by -FLT_MAX (step 3); padding columns -inf.
//   3. exact softmax per row (row_max, exp_sum, normalize_row: fp32 P kept in S, P rounded to nearest even into
//      the A operand of P.V, step 4); a fully masked row gets the uniform 1/C from the same formulas.
//   4. O[R][Dv] = rne(P) . V (GEMM, fp32 accumulation), stored rounded to nearest even (step 5).
//   5. selection (step 6): per token, the fp32 P rows of its G heads added in sequence g = 0, 1, ... (the §6 map is
//      linear: equal to summing score_h up to rounding), two box filters (widths N, then M) picked at M(k+1),
//      forced blocks +inf (step 7), top-K in the §3 step 8 order with -1 past Sel'_b.
// Every unit's arithmetic depends only on its data and the ISA path: results are bitwise the same for every thread
// count. fp64 inputs (a testing extension) run the reference.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/numeric.h"
#include "common/status_guard.h"
#include "common/threads.h"
#include "common/topk_order.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "nsa/compress_attention_infer.h"
#include "ops/compress_attention_infer/rows.h"

namespace nsa {
namespace {

using cpu::kPanel;
using cpu::KernelTable;
using cpu::PStore;
using detail::AlignedBuffer;
using detail::round_up;

constexpr int64_t kPvChunk = 256;  // reduction chunk of the P.V GEMM

struct Plan {
  const CompressAttentionInferParams* p = nullptr;
  CompressAttentionInferShape sh;
  DecodeRows rows;
  const KernelTable* kt = nullptr;
  bool bf16_dot = false;
  PStore pstore = PStore::kF32;
  float scale = 1.0f;
  int64_t qk_red = 0;  // reduction length of Q.K^T: pairs (bf16) or elements (fp32)
  int64_t q_lda = 0;   // elements per packed query row
  int64_t d2p = 0;     // Dv rounded up to the panel width
  int64_t cp_max = 0;  // max C_b rounded up to the panel width
  int64_t margin = 0;  // zero floats before a selection row (box filter reads), a multiple of 16
  int64_t sel_len = 0;  // floats of a selection row after the margin: covers [0, M * max Sel' + 1)
  int64_t ld_s = 0;     // floats per score row: margin + max(cp_max, sel_len)
};

struct Scratch {
  AlignedBuffer<uint8_t> kpack, vpack, qa, pa;
  AlignedBuffer<float> s, o, box1, box2, score;
  std::vector<int32_t> topk_work;
  std::vector<int64_t> order;
  std::vector<float> row32;   // one widened key row
  std::vector<float> vrow32;  // two widened value rows of d2p floats (zero past Dv)
};

void init_scratch(const Plan& pl, Scratch& sc) {
  const CompressAttentionInferShape& sh = pl.sh;
  const int64_t R = sh.max_q * sh.G, esz = pl.bf16_dot ? 2 : 4;
  sc.kpack.reset(pl.cp_max * pl.q_lda * esz);
  sc.vpack.reset(pl.cp_max * pl.d2p * esz);
  sc.qa.reset(R * pl.q_lda * esz);
  sc.pa.reset(R * pl.cp_max * esz);
  sc.s.reset(R * pl.ld_s);
  sc.o.reset(R * pl.d2p);
  sc.box1.reset(pl.ld_s);
  sc.box2.reset(pl.ld_s);
  sc.score.reset(sh.max_sel);
  sc.topk_work.resize(static_cast<size_t>(2 * sh.max_sel));
  sc.order.resize(static_cast<size_t>(sh.max_sel));
  sc.row32.resize(static_cast<size_t>(sh.D));
  sc.vrow32.assign(static_cast<size_t>(2 * pl.d2p), 0.0f);
}

// Offset of element (reduction index r < red, column n) of a B operand in its panels (kernels.h layouts).
inline int64_t panel_offset(bool pairs, int64_t red, int64_t r, int64_t n) {
  const int64_t panel = (n / kPanel) * red * kPanel;
  return pairs ? panel + (r / 2) * kPanel * 2 + (n % kPanel) * 2 + r % 2 : panel + r * kPanel + n % kPanel;
}

// Step 1: gather the unit's compressed keys (columns = tokens, reduction over D) and values (reduction over the
// tokens, columns = Dv) from their pages into the packed panels. Rows whose last dimension is contiguous are copied
// row by row: K by 32-bit word transposes where the rows allow it, else per row (bf16 pairs as 32-bit words, other
// dtypes widened with the row kernel); V rows widened and, for bf16 pairs, interleaved two tokens at a time by the
// ISA's pair packer; other views element by element.
// Only the padding the GEMMs read is zeroed: K columns [C, cp) (and the odd pad element of D for pairs), V tokens
// [C, cp) and columns [Dv, d2p).
void gather_kv(const Plan& pl, Scratch& sc, int64_t b, int64_t n2, int64_t C, int64_t cp) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const int32_t* table = p.block_table + b * p.block_table_row_stride;
  const bool pairs = pl.bf16_dot;
  const DType dt = p.dtype;
  const int64_t D = sh.D, Dv = sh.Dv, dsz = static_cast<int64_t>(dtype_size(dt));
  const int64_t kred = pairs ? 2 * pl.qk_red : D;  // reduction elements of K (D padded to even for pairs)
  const size_t esz = pairs ? 2 : 4;
  const bool k_rows = p.key.stride[2] == 1, v_rows = p.value.stride[2] == 1;
  uint8_t* kp = sc.kpack.get();
  uint8_t* vp = sc.vpack.get();
  if (!k_rows || (pairs && D % 2 != 0)) std::memset(kp, 0, static_cast<size_t>(cp * kred) * esz);
  else if (C % kPanel != 0) std::memset(kp + (C / kPanel) * kred * kPanel * esz, 0, static_cast<size_t>(kred * kPanel) * esz);
  if (!v_rows) {
    std::memset(vp, 0, static_cast<size_t>(cp * pl.d2p) * esz);
  } else {
    if (Dv % kPanel != 0) std::memset(vp + (pl.d2p / kPanel - 1) * cp * kPanel * esz, 0, static_cast<size_t>(cp * kPanel) * esz);
    const int64_t first = pairs ? C / 2 * 2 : C;  // tokens from here on are (or share a pair with) padding
    for (int64_t pn = 0; pn < pl.d2p / kPanel; ++pn)
      std::memset(vp + (pn * cp * kPanel + first * kPanel) * esz, 0, static_cast<size_t>((cp - first) * kPanel) * esz);
  }
  // K by transposes of 32-bit words (bf16 pairs, or fp32 elements) over runs of tokens that share a page and a
  // panel, where the rows allow it: (e, c) -> word (e2, c) of its panel, dst[e2 * 64 + c % 64] = src[c][e2]
  const int64_t words = pairs ? D / 2 : D;
  const bool k_transpose = k_rows && (pairs ? D % 2 == 0 && p.key.stride[0] % 2 == 0 && p.key.stride[1] % 2 == 0 &&
                                                  (reinterpret_cast<uintptr_t>(p.key.data) + n2 * D * 2) % 4 == 0
                                            : dt == DType::kF32);
  if (k_transpose) {
    for (int64_t c = 0; c < C;) {
      const int64_t run = std::min({sh.P - c % sh.P, kPanel - c % kPanel, C - c});
      const int64_t kb = table[c / sh.P] * p.key.stride[0] + (c % sh.P) * p.key.stride[1] + n2 * D;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(p.key.data) + kb * dsz);
      uint32_t* dst = reinterpret_cast<uint32_t*>(kp) + (c / kPanel) * words * kPanel + c % kPanel;
      pl.kt->grad.transpose_u32(src, p.key.stride[1] * dsz / 4, run, words, dst, kPanel);
      c += run;
    }
  }
  float* row32 = sc.row32.data();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t page = table[c / sh.P], row = c % sh.P;
    const int64_t kb = page * p.key.stride[0] + row * p.key.stride[1] + n2 * D * p.key.stride[2];
    const int64_t vb = page * p.value.stride[0] + row * p.value.stride[1] + n2 * Dv * p.value.stride[2];
    const int64_t kcol = (c / kPanel) * kred * kPanel + c % kPanel;  // element (e = 0, column c) without pairs
    if (k_transpose) {
      // done above
    } else if (k_rows && pairs) {  // (e, c) at panel + (e / 2) * 128 + (c % 64) * 2 + e % 2: one 32-bit word per pair
      const uint8_t* src = static_cast<const uint8_t*>(p.key.data) + kb * 2;
      uint32_t* dst = reinterpret_cast<uint32_t*>(kp) + (c / kPanel) * kred * kPanel / 2 + c % kPanel;
      for (int64_t e2 = 0; e2 < D / 2; ++e2) std::memcpy(dst + e2 * kPanel, src + e2 * 4, 4);
      if (D % 2) reinterpret_cast<uint16_t*>(dst + (D / 2) * kPanel)[0] = reinterpret_cast<const uint16_t*>(src)[D - 1];
    } else if (k_rows) {  // (e, c) at panel + e * 64 + c % 64
      pl.kt->rows.load_row(static_cast<const uint8_t*>(p.key.data) + kb * dsz, row32, D, dt);
      float* dst = reinterpret_cast<float*>(kp) + kcol;
      for (int64_t e = 0; e < D; ++e) dst[e * kPanel] = row32[e];
    } else {
      for (int64_t e = 0; e < D; ++e) {
        const int64_t off = panel_offset(pairs, kred, e, c), src = kb + e * p.key.stride[2];
        if (pairs) reinterpret_cast<uint16_t*>(kp)[off] = static_cast<const uint16_t*>(p.key.data)[src];
        else reinterpret_cast<float*>(kp)[off] = detail::load_f32(p.key.data, src, dt);
      }
    }
    if (v_rows && pairs) {
      // (c, e) at (e / 64) * cp * 64 + (c / 2) * 128 + (e % 64) * 2 + c % 2: tokens c and c + 1 widened (exactly)
      // into zero-padded fp32 rows and interleaved per panel by the ISA's pair packer (bf16 -> fp32 -> bf16 is exact)
      if (c % 2 == 0) {
        float* a = sc.vrow32.data();
        float* bb = a + pl.d2p;
        pl.kt->rows.load_row(static_cast<const uint16_t*>(p.value.data) + vb, a, Dv, dt);
        if (c + 1 < C) {
          const int64_t page1 = table[(c + 1) / sh.P];
          const int64_t vb1 = page1 * p.value.stride[0] + ((c + 1) % sh.P) * p.value.stride[1] + n2 * Dv;
          pl.kt->rows.load_row(static_cast<const uint16_t*>(p.value.data) + vb1, bb, Dv, dt);
        } else {
          std::fill(bb, bb + Dv, 0.0f);
        }
        uint16_t* dst = reinterpret_cast<uint16_t*>(vp) + (c / 2) * kPanel * 2;
        for (int64_t pn = 0; pn < pl.d2p / kPanel; ++pn)
          pl.kt->grad.pack_rows_bf16(a + pn * kPanel, bb + pn * kPanel, kPanel, dst + pn * cp * kPanel, nullptr, nullptr);
      }
    } else if (v_rows) {  // (c, e) at (e / 64) * cp * 64 + c * 64 + e % 64: contiguous runs of 64
      const uint8_t* src = static_cast<const uint8_t*>(p.value.data) + vb * dsz;
      for (int64_t pn = 0; pn * kPanel < Dv; ++pn)
        pl.kt->rows.load_row(src + pn * kPanel * dsz, reinterpret_cast<float*>(vp) + pn * cp * kPanel + c * kPanel,
                             std::min(kPanel, Dv - pn * kPanel), dt);
    } else {
      for (int64_t e = 0; e < Dv; ++e) {
        const int64_t off = panel_offset(pairs, cp, c, e), src = vb + e * p.value.stride[2];
        if (pairs) reinterpret_cast<uint16_t*>(vp)[off] = static_cast<const uint16_t*>(p.value.data)[src];
        else reinterpret_cast<float*>(vp)[off] = detail::load_f32(p.value.data, src, dt);
      }
    }
  }
}

// The K best of score[0, sel) in the §3 step 8 order into idx[0, Kb).
void top_k(const Plan& pl, Scratch& sc, const float* score, int64_t sel, int64_t Kb, int32_t* idx) {
  if (Kb <= 32) {
    if (!pl.kt->select.top_k(score, sel, static_cast<int>(Kb), idx, sc.topk_work.data()))
      detail::top_k_ordered(score, sel, Kb, idx);  // a NaN score
    return;
  }
  std::iota(sc.order.begin(), sc.order.begin() + sel, int64_t(0));
  std::partial_sort(sc.order.begin(), sc.order.begin() + Kb, sc.order.begin() + sel,
                    [&](int64_t a, int64_t c) { return detail::topk_before(score[a], a, score[c], c); });
  for (int64_t k = 0; k < Kb; ++k) idx[k] = static_cast<int32_t>(sc.order[static_cast<size_t>(k)]);
}

void run_unit(const Plan& pl, Scratch& sc, int64_t b, int64_t n2) {
  const CompressAttentionInferParams& p = *pl.p;
  const CompressAttentionInferShape& sh = pl.sh;
  const DType dt = p.dtype;
  const int64_t C = p.actual_cmp_seq_kvlen.data[b], cp = round_up(C, kPanel), G = sh.G;
  const int64_t q_b = pl.rows.q[static_cast<size_t>(b)], R = q_b * G;
  const size_t esz = pl.bf16_dot ? 2 : 4;
  gather_kv(pl, sc, b, n2, C, cp);

  // the query tile: row r = i*G + g
  for (int64_t i = 0; i < q_b; ++i) {
    const int64_t base = pl.rows.query_offset(p, b, i);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g, hb = base + (n2 * G + g) * p.query_stride[2];
      if (pl.bf16_dot) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(sc.qa.get()) + r * pl.q_lda;
        for (int64_t e = 0; e < sh.D; ++e) dst[e] = static_cast<const uint16_t*>(p.query)[hb + e * p.query_stride[3]];
        for (int64_t e = sh.D; e < pl.q_lda; ++e) dst[e] = 0;
      } else {
        float* dst = reinterpret_cast<float*>(sc.qa.get()) + r * pl.q_lda;
        for (int64_t e = 0; e < sh.D; ++e) dst[e] = detail::load_f32(p.query, hb + e * p.query_stride[3], dt);
      }
    }
  }
  // 2. S = Q.K^T * scale
  float* S = sc.s.get() + pl.margin;  // row r at S + r * ld_s, columns [-margin, ld_s - margin)
  if (pl.bf16_dot)
    pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.qa.get()), pl.q_lda, R,
                     reinterpret_cast<const uint16_t*>(sc.kpack.get()), pl.qk_red * kPanel * 2, 0, cp, pl.qk_red,
                     pl.qk_red, S, pl.ld_s, pl.scale, false);
  else
    pl.kt->gemm.f32(reinterpret_cast<const float*>(sc.qa.get()), pl.q_lda, R,
                    reinterpret_cast<const float*>(sc.kpack.get()), pl.qk_red * kPanel, 0, cp, pl.qk_red, pl.qk_red, S,
                    pl.ld_s, pl.scale, false);
  // 2-3. mask (MTP causality), softmax, rounded P
  const int64_t S_b = sh.mtp ? p.actual_sel_seq_kvlen.data[b] : 0;
  for (int64_t i = 0; i < q_b; ++i) {
    // §3 step 3: c is masked iff c*d + l - 1 > S_b - q_b + i, i.e. c >= first_masked
    int64_t first_masked = C;
    if (sh.mtp) {
      const int64_t pos = S_b - q_b + i;  // >= l - 1 - (q_b - 1 - i) ... any value: clamp below
      const int64_t lim = pos - sh.l + 1;  // c*d <= lim keeps c
      first_masked = lim < 0 ? 0 : std::min(C, lim / sh.d + 1);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* srow = S + (i * G + g) * pl.ld_s;
      for (int64_t c = first_masked; c < C; ++c) srow[c] = -FLT_MAX;
      for (int64_t c = C; c < cp; ++c) srow[c] = -INFINITY;
      const float m = pl.kt->rows.row_max(srow, cp, -INFINITY);
      const float lsum = pl.kt->rows.exp_sum(srow, cp, m);
      pl.kt->rows.normalize_row(srow, cp, lsum, sc.pa.get() + (i * G + g) * cp * esz, pl.pstore);
    }
  }
  // 4. O = rne(P).V
  if (pl.bf16_dot)
    pl.kt->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.pa.get()), cp, R,
                     reinterpret_cast<const uint16_t*>(sc.vpack.get()), (cp / 2) * kPanel * 2, 0, pl.d2p, cp / 2,
                     kPvChunk, sc.o.get(), pl.d2p, 1.0f, false);
  else
    pl.kt->gemm.f32(reinterpret_cast<const float*>(sc.pa.get()), cp, R, reinterpret_cast<const float*>(sc.vpack.get()),
                    cp * kPanel, 0, pl.d2p, cp, kPvChunk, sc.o.get(), pl.d2p, 1.0f, false);
  // 5. outputs and selection per token
  const int64_t M = sh.M, sel = decode_selection_blocks(C, sh.l, sh.d, sh.lp), K = sh.K;
  const int64_t n_sel = round_up(M * sel + 1, 16);  // box outputs [0, n_sel) cover every pick M(k+1), k < sel
  for (int64_t i = 0; i < q_b; ++i) {
    const int64_t orow = pl.rows.out_row(b, i);
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* dst = static_cast<uint8_t*>(p.attention_out) +
                     (orow * sh.N1 + n2 * G + g) * sh.Dv * static_cast<int64_t>(dtype_size(dt));
      pl.kt->rows.store_row(sc.o.get() + (i * G + g) * pl.d2p, dst, sh.Dv, dt);
    }
    // the group sum of the fp32 P rows, in sequence g = 0, 1, ..., into the token's first row; zero margins
    float* sum = S + i * G * pl.ld_s;
    for (int64_t g = 1; g < G; ++g) pl.kt->rows.add_row(sum, S + (i * G + g) * pl.ld_s, cp);
    std::memset(sum - pl.margin, 0, sizeof(float) * static_cast<size_t>(pl.margin));
    if (n_sel > cp) std::memset(sum + cp, 0, sizeof(float) * static_cast<size_t>(n_sel - cp));
    float* q1 = sc.box1.get() + pl.margin;
    float* q2 = sc.box2.get() + pl.margin;
    std::memset(sc.box1.get(), 0, sizeof(float) * static_cast<size_t>(pl.margin));
    pl.kt->rows.box_sum(sum, q1, n_sel, static_cast<int>(sh.N));  // sum_{n<N} P[x - n]
    pl.kt->rows.box_sum(q1, q2, n_sel, static_cast<int>(M));      // then sum_{m<M}: the weights w_i of step 6
    float* score = sc.score.get();
    for (int64_t k = 0; k < sel; ++k) score[k] = q2[M * (k + 1)];
    // step 7: forced blocks
    score[0] = INFINITY;
    if (sel >= 2) score[sel - 2] = INFINITY;
    score[sel - 1] = INFINITY;
    // step 8
    int32_t* idx = p.topk_indices + (orow * sh.N2 + n2) * K;
    const int64_t Kb = std::min(K, sel);
    top_k(pl, sc, score, sel, Kb, idx);
    for (int64_t k = Kb; k < K; ++k) idx[k] = -1;
  }
}

Status forward(const CompressAttentionInferParams& p, const CpuOptions& options) {
  Plan pl;
  Status st = validate_compress_attention_infer(p, &pl.sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  if (!(st = cpu::resolve_isa(options.isa, &isa)).ok()) return st;
  if (p.dtype == DType::kF64) return compress_attention_infer_reference(p);  // testing extension: no fast path
  const CompressAttentionInferShape& sh = pl.sh;
  pl.p = &p;
  pl.rows = decode_rows(p, sh);
  pl.kt = cpu::kernels_for(isa);
  pl.bf16_dot = p.dtype == DType::kBF16 && pl.kt->gemm.bf16 != nullptr;
  pl.pstore = pl.bf16_dot ? PStore::kBf16Bits
              : p.dtype == DType::kBF16 ? PStore::kF32AsBf16
              : p.dtype == DType::kF16  ? PStore::kF32AsF16
                                        : PStore::kF32;
  pl.scale = static_cast<float>(p.scale_value);
  pl.qk_red = pl.bf16_dot ? (sh.D + 1) / 2 : sh.D;
  pl.q_lda = pl.bf16_dot ? 2 * pl.qk_red : sh.D;
  pl.d2p = round_up(sh.Dv, kPanel);
  pl.cp_max = round_up(sh.max_c, kPanel);
  pl.margin = round_up(std::max(sh.M, sh.N), 16);
  pl.sel_len = round_up(sh.M * sh.max_sel + 1, 16);
  pl.ld_s = pl.margin + std::max(pl.cp_max, pl.sel_len);

  const int64_t units = sh.B * sh.N2;
  const int workers = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(cpu::resolve_num_threads(options.num_threads), units)));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));  // allocated before any output is written
  for (Scratch& sc : scratch) init_scratch(pl, sc);
  cpu::parallel_for(units, workers, [&](int64_t u, int worker) {
    run_unit(pl, scratch[static_cast<size_t>(worker)], u / sh.N2, u % sh.N2);
  });
  pl.rows.clear_padding(p, sh);
  return Status::Ok();
}

}  // namespace

Status compress_attention_infer_cpu(const CompressAttentionInferParams& p, const CpuOptions& options) {
  return detail::guarded("compress_attention_infer_cpu", "packed compressed K/V and score rows grow with C_b x q_b x G",
                         [&] { return forward(p, options); });
}

}  // namespace nsa
