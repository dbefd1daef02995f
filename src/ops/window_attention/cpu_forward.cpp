// Optimized CPU forward of docs/spec/window_attention.md §5/§6: tiles of query rows x only the keys their band
// touches, GEMMs of the per-ISA KernelTable, an exact softmax, threads, deterministic.
//
// Tiles and strips (cpu.h): a query tile holds Bq tokens x G heads = R rows (row r = i*G + g); its span is the
// union of its rows' visible key ranges, rounded out to 16 columns. A task is (strip, KV head n2), a strip being
// a run of consecutive tiles of one batch whose keys are packed once for all of them.
//
//   single strips (every tile's span <= chunk_keys, and the strip's union too): K and V of the union are packed
//     once; per tile, over its span only:
//       S[R][w] = (Q_tile . K^T) * scale             gemm (bf16 pairs or fp32), fp32 dot products, §5 step 1
//       invisible keys -> -inf (so exp gives exactly 0), §5 step 2
//       m = row max, l = sum exp(S - m), P = exp(S - m) / l       exact softmax over the whole span, step 3
//       O[R][Dv] = round(P) . V                       gemm; P rounded to the dtype (nearest even), step 4
//   multi strips (tiles whose span exceeds chunk_keys: long causal or full attention): the keys are cut into
//     chunks on a fixed grid of batch-local multiples of chunk_keys; pass 1 runs over the chunks for m and l
//     (online: l is rescaled when the maximum grows), pass 2 recomputes S per chunk and accumulates
//     O += round(P) . V with the final m and l. Memory stays O(R x chunk_keys) per worker.
// attention_out is rounded with rha_T (§5 step 4); statistics are stored 8 times in softmax_layout (§5 step 5).
// Rows without a visible key (§6) take the closed form: inner_precise 0/1 the uniform average
// rha(sum_j rha(1/Skv_b) v_j), computed once per (batch, KV head) before the tasks; 2: zeros.
//
// Determinism: each output element has one writer, and what it computes depends on its tile (Bq from the shape)
// and the chunk grid only, never on strips, tasks or threads: results are bitwise identical for any thread count.
// Workspace: per worker, the packed K/V of one chunk (<= chunk_keys keys), the tile's score and P blocks
// (R x span), its O block (R x Dv, or the strip's rows for multi strips): O(threads x tile); all of it is
// allocated before the first output is written.
#include <cfloat>
#include <cmath>
#include <new>
#include <stdexcept>
#include <string>

#include "common/numeric.h"
#include "common/row_helpers.h"
#include "common/threads.h"
#include "cpu/kernels.h"
#include "cpu/row_load.h"
#include "ops/window_attention/cpu.h"
#include "ops/window_attention/cpu_common.h"
#include "ops/window_attention/reference.h"
#include "ops/window_attention/rounding.h"

namespace nsa::window_cpu {
namespace {

using cpu::KernelTable;
using cpu::kPanel;
using cpu::PStore;
using window_detail::WBatch;

constexpr int64_t kPvChunk = 256;  // reduction chunk of the P.V GEMM (keys or key pairs)
constexpr float kNegInf = -__builtin_inff();

struct Strip {
  size_t t0 = 0, t1 = 0;  // tiles [t0, t1)
  bool multi = false;
  int64_t lo = 0, hi = 0;  // union of the tiles' 16-column spans (lo >= hi: none)
  int64_t rows = 0;        // rows of all its tiles
};

struct Task {
  size_t strip;
  int64_t n2;
  double cost;
};

// Per-worker workspace.
struct Scratch {
  AlignedBuf<uint8_t> kp, vp;  // packed K and V of one chunk (bf16 bits or fp32)
  AlignedBuf<uint32_t> tmp;    // [64][max(Dh words, D)] rows to transpose into K panels
  AlignedBuf<uint8_t> qa;      // query rows: [rows][q_lda] (a tile, or a multi strip's rows)
  AlignedBuf<float> s;         // [R][lds] scores / exp values
  AlignedBuf<uint8_t> pa;      // [R][lds] rounded P (bf16 bits or fp32)
  AlignedBuf<float> o;         // [rows][Dv16] P.V results
  std::vector<float> m, l;     // per row of a multi strip
  std::vector<RowInfo> info;   // per token of a tile / strip
  std::vector<uint16_t> row_a, row_b;  // [Dv] value rows being packed (bf16 pairs)
};

class Forward : CallState {
 public:
  Forward(const WindowAttentionParams& p, const WindowAttentionShape& sh, const KernelTable* kt, int threads,
          const Tuning& tu)
      : CallState(p, sh, kt, threads, tu) {
    dot_ = p.dtype == DType::kBF16 && kt->gemm.bf16 != nullptr;
    pstore_ = dot_ ? PStore::kBf16Bits
              : p.dtype == DType::kBF16 ? PStore::kF32AsBf16
              : p.dtype == DType::kF16  ? PStore::kF32AsF16
                                        : PStore::kF32;
    esz_ = dot_ ? 2 : 4;
    scale_ = static_cast<float>(p.scale);
    G_ = sh.G;
    Bq_ = std::max<int64_t>(1, tu.tile_rows / G_);
    R_ = Bq_ * G_;
    Dh_ = (sh.D + 1) / 2;
    q_lda_ = dot_ ? 2 * Dh_ : sh.D;
    Dv16_ = round_up(sh.Dv, 16);
    Dv64_ = round_up(sh.Dv, kPanel);
    chunk_ = tu.chunk_keys > 0 ? round_up(tu.chunk_keys, kPanel) : default_chunk_keys(sh.D, sh.Dv, esz_);
  }

  void run() {
    tiles_ = plan_tiles(p_, sh_, batches_, vis_, Bq_, threads_);
    plan_strips();
    // Closed form of rows without a visible key, inner_precise 0/1: per (batch, KV head) of a tile with such rows.
    const std::vector<int64_t> need =
        pairs_with_invisible_rows(tiles_, batches_.size(), sh_.N2, sh_.Dv, p_.inner_precise, uniform_);
    // Tasks (strip, KV head), largest first: the order never changes a result.
    std::vector<Task> tasks;
    for (size_t s = 0; s < strips_.size(); ++s) {
      double cost = 0;
      for (size_t t = strips_[s].t0; t < strips_[s].t1; ++t) {
        const Tile& tl = tiles_[t];
        const double rows = static_cast<double>((tl.s1 - tl.s0) * G_);
        cost += rows * (static_cast<double>(std::max<int64_t>(0, tl.hi - tl.lo)) * (strips_[s].multi ? 1.6 : 1.0) + 16);
      }
      for (int64_t n2 = 0; n2 < sh_.N2; ++n2) tasks.push_back({s, n2, cost});
    }
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
    const int workers =
        static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_, static_cast<int64_t>(tasks.size()))));
    std::vector<Scratch> scratch(static_cast<size_t>(workers));
    for (Scratch& sc : scratch) init_scratch(sc);  // before any output is written (bad_alloc -> error)

    cpu::parallel_for(static_cast<int64_t>(need.size()), threads_, [&](int64_t x, int) {
      compute_uniform(need[static_cast<size_t>(x)]);
    });
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t x, int w) {
      const Task& tk = tasks[static_cast<size_t>(x)];
      Scratch& sc = scratch[static_cast<size_t>(w)];
      if (strips_[tk.strip].multi) run_multi(strips_[tk.strip], tk.n2, sc);
      else run_single(strips_[tk.strip], tk.n2, sc);
    });
  }

 private:
  // ---------------------------------------------------------------- plan
  int64_t width(const Tile& t) const { return t.hi > t.lo ? span_hi(t) - span_lo(t) : 0; }
  static int64_t span_lo(const Tile& t) { return round_down(t.lo, 16); }
  int64_t span_hi(const Tile& t) const { return round_up(t.hi, 16); }

  void plan_strips() {
    // Strips of at most st tokens: at least about 4 tasks per thread where the shape allows (strips never
    // change results, only the packing they share).
    int64_t st = sh_.T1 * sh_.N2 / std::max<int64_t>(1, 4 * static_cast<int64_t>(threads_));
    st = std::clamp<int64_t>(round_down(st, Bq_), Bq_, std::max(Bq_, tu_.strip_tokens));
    lds_ = 16;
    max_rows_ = R_;
    max_keys_ = kPanel;
    size_t i = 0;
    while (i < tiles_.size()) {
      Strip s;
      s.t0 = i;
      const Tile& first = tiles_[i];
      s.multi = width(first) > chunk_;
      int64_t tokens = 0;
      s.lo = INT64_MAX;
      s.hi = INT64_MIN;
      size_t j = i;
      while (j < tiles_.size() && tiles_[j].b == first.b) {
        const Tile& t = tiles_[j];
        const int64_t tk = t.s1 - t.s0, w = width(t);
        if (j > i) {
          if ((w > chunk_) != s.multi || tokens + tk > st) break;
          if (s.multi && s.rows + tk * G_ > tu_.strip_rows) break;
          if (!s.multi && w > 0 && std::max(s.hi, span_hi(t)) - std::min(s.lo, span_lo(t)) > chunk_) break;
        }
        tokens += tk;
        s.rows += tk * G_;
        if (w > 0) {
          s.lo = std::min(s.lo, span_lo(t));
          s.hi = std::max(s.hi, span_hi(t));
        }
        ++j;
      }
      s.t1 = j;
      if (s.hi < s.lo) s.lo = s.hi = 0;
      // workspace maxima
      if (s.multi) {
        max_rows_ = std::max(max_rows_, s.rows);
        lds_ = std::max(lds_, chunk_);
        max_keys_ = std::max(max_keys_, chunk_ + kPanel);
      } else {
        for (size_t t = s.t0; t < s.t1; ++t) lds_ = std::max(lds_, width(tiles_[t]));
        max_keys_ = std::max(max_keys_, round_up(s.hi - s.lo, kPanel));
      }
      max_tokens_ = std::max(max_tokens_, tokens);
      strips_.push_back(s);
      i = j;
    }
  }

  void init_scratch(Scratch& sc) const {
    sc.kp.reset(max_keys_ * (dot_ ? 2 * Dh_ : sh_.D) * static_cast<int64_t>(esz_));
    sc.vp.reset(max_keys_ * Dv64_ * static_cast<int64_t>(esz_));
    sc.tmp.reset(kPanel * std::max(Dh_, sh_.D));
    sc.qa.reset(max_rows_ * q_lda_ * static_cast<int64_t>(esz_));
    sc.s.reset(R_ * lds_);
    sc.pa.reset(R_ * lds_ * static_cast<int64_t>(esz_));
    sc.o.reset(max_rows_ * Dv16_);
    sc.m.resize(static_cast<size_t>(max_rows_));
    sc.l.resize(static_cast<size_t>(max_rows_));
    sc.info.resize(static_cast<size_t>(max_tokens_));
    sc.row_a.resize(static_cast<size_t>(sh_.Dv));
    sc.row_b.resize(static_cast<size_t>(sh_.Dv));
  }

  // ---------------------------------------------------------------- closed form of §6
  void compute_uniform(int64_t x) {
    const int64_t b = x / sh_.N2, n2 = x % sh_.N2;
    const WBatch& bi = batches_[static_cast<size_t>(b)];
    float* u = uniform_[static_cast<size_t>(x)].data();
    const float pu = window_detail::round_rha(1.0f / static_cast<float>(bi.skv), p_.dtype);
    const Tensor3& v = p_.value;
    for (int64_t j = 0; j < bi.skv; ++j) {
      const int64_t base = (bi.k0 + j) * v.stride[0] + n2 * v.stride[1];
      for (int64_t e = 0; e < sh_.Dv; ++e) u[e] += pu * detail::load_f32(v.data, base + e * v.stride[2], p_.dtype);
    }
  }

  // ---------------------------------------------------------------- packing
  // K of keys [kbase, kbase + W) (batch-local, kbase a multiple of 16) of (batch, n2) as the B operand of
  // S = Q.K^T: panels of 64 keys; dot: [Dh][64][2] bf16 pairs along D; fp32: [D][64]. Keys past Skv_b are zero.
  void pack_k(const WBatch& bi, int64_t n2, int64_t kbase, int64_t W, Scratch& sc) const {
    const Tensor3& k = p_.key;
    const int64_t D = sh_.D, np = round_up(W, kPanel) / kPanel, valid = std::min(W, bi.skv - kbase);
    const int64_t words = dot_ ? Dh_ : D;  // 32-bit words per key row
    // bf16 rows that are whole 32-bit words in memory (D even, contiguous, even element offsets): a full panel
    // is transposed straight from the key rows, without a copy.
    const bool direct = dot_ && D % 2 == 0 && k.stride[2] == 1 && k.stride[0] % 2 == 0 && k.stride[1] % 2 == 0 &&
                        (reinterpret_cast<uintptr_t>(k.data) & 3) == 0;
    for (int64_t pn = 0; pn < np; ++pn) {
      uint32_t* panel = reinterpret_cast<uint32_t*>(sc.kp.get()) + pn * words * kPanel;
      const int64_t first = (bi.k0 + kbase + pn * kPanel) * k.stride[0] + n2 * k.stride[1];
      if (direct && (pn + 1) * kPanel <= valid && k.stride[0] > 0) {
        kt_->grad.transpose_u32(reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(k.data) + first),
                                k.stride[0] / 2, kPanel, words, panel, kPanel);
        continue;
      }
      uint32_t* tmp = sc.tmp.get();
      std::memset(tmp, 0, sizeof(uint32_t) * static_cast<size_t>(kPanel * words));
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t key = pn * kPanel + c;
        if (key >= valid) break;
        const int64_t base = (bi.k0 + kbase + key) * k.stride[0] + n2 * k.stride[1];
        if (dot_) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(tmp + c * words);
          const uint16_t* src = static_cast<const uint16_t*>(k.data) + base;
          if (k.stride[2] == 1) std::memcpy(dst, src, sizeof(uint16_t) * static_cast<size_t>(D));
          else
            for (int64_t d = 0; d < D; ++d) dst[d] = src[d * k.stride[2]];
        } else {
          float* dst = reinterpret_cast<float*>(tmp + c * words);
          load_f32_row(k, base, D, dst);
        }
      }
      kt_->grad.transpose_u32(tmp, words, kPanel, words, panel, kPanel);
    }
  }

  // V of keys [kbase, kbase + W) as the B operand of O = P.V: panels of 64 value columns over the keys;
  // dot: [Dv64/64][Wp/2][64][2] (pairs along keys); fp32: [Dv64/64][Wp][64].
  void pack_v(const WBatch& bi, int64_t n2, int64_t kbase, int64_t W, Scratch& sc) const {
    const Tensor3& v = p_.value;
    const int64_t Dv = sh_.Dv, Wp = round_up(W, kPanel), valid = std::min(W, bi.skv - kbase);
    std::memset(sc.vp.get(), 0, static_cast<size_t>(Wp * Dv64_ * static_cast<int64_t>(esz_)));
    if (dot_) {
      // word (pair p, column e) = v[2p][e] | v[2p + 1][e] << 16: a loop over e per panel (vectorizes)
      uint32_t* out = reinterpret_cast<uint32_t*>(sc.vp.get());
      const int64_t pstride = (Wp / 2) * kPanel;  // words per value panel
      std::vector<uint16_t>& row_a = sc.row_a;
      std::vector<uint16_t>& row_b = sc.row_b;
      auto load = [&](int64_t c, std::vector<uint16_t>& dst) {
        if (c >= valid) {
          std::fill(dst.begin(), dst.end(), uint16_t(0));
          return;
        }
        const uint16_t* src = static_cast<const uint16_t*>(v.data) + (bi.k0 + kbase + c) * v.stride[0] + n2 * v.stride[1];
        if (v.stride[2] == 1) std::memcpy(dst.data(), src, sizeof(uint16_t) * static_cast<size_t>(Dv));
        else
          for (int64_t e = 0; e < Dv; ++e) dst[static_cast<size_t>(e)] = src[e * v.stride[2]];
      };
      for (int64_t pp = 0; 2 * pp < valid; ++pp) {
        load(2 * pp, row_a);
        load(2 * pp + 1, row_b);
        for (int64_t pn = 0; pn * kPanel < Dv; ++pn) {
          const int64_t n = std::min(kPanel, Dv - pn * kPanel);
          uint32_t* dst = out + pn * pstride + pp * kPanel;
          const uint16_t* a = row_a.data() + pn * kPanel;
          const uint16_t* b = row_b.data() + pn * kPanel;
          for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<uint32_t>(a[e]) | (static_cast<uint32_t>(b[e]) << 16);
        }
      }
    } else {
      float* out = reinterpret_cast<float*>(sc.vp.get());
      for (int64_t c = 0; c < valid; ++c) {
        const int64_t base = (bi.k0 + kbase + c) * v.stride[0] + n2 * v.stride[1];
        for (int64_t pn = 0; pn * kPanel < Dv; ++pn) {
          const int64_t n = std::min(kPanel, Dv - pn * kPanel);
          load_f32_row(v, base + pn * kPanel * v.stride[2], n, out + pn * Wp * kPanel + c * kPanel);
        }
      }
    }
  }

  // n elements of a row starting at element offset `base` of t (element stride t.stride[2]) as fp32.
  void load_f32_row(const Tensor3& t, int64_t base, int64_t n, float* dst) const {
    cpu::load_row_f32(kt_, t.data, base, t.stride[2], n, p_.dtype, dst);
  }

  // Query rows of tile t (head group n2) into qa rows [row0, row0 + rows).
  void load_q(const Tile& t, int64_t n2, int64_t row0, Scratch& sc) const {
    const Tensor3& q = p_.query;
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    const int64_t D = sh_.D;
    for (int64_t i = t.s0; i < t.s1; ++i)
      for (int64_t g = 0; g < G_; ++g) {
        const int64_t r = row0 + (i - t.s0) * G_ + g;
        const int64_t base = (bi.q0 + i) * q.stride[0] + (n2 * G_ + g) * q.stride[1];
        if (dot_) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(sc.qa.get()) + r * q_lda_;
          const uint16_t* src = static_cast<const uint16_t*>(q.data) + base;
          if (q.stride[2] == 1) std::memcpy(dst, src, sizeof(uint16_t) * static_cast<size_t>(D));
          else
            for (int64_t d = 0; d < D; ++d) dst[d] = src[d * q.stride[2]];
          for (int64_t d = D; d < q_lda_; ++d) dst[d] = 0;
        } else {
          load_f32_row(q, base, D, reinterpret_cast<float*>(sc.qa.get()) + r * q_lda_);
        }
      }
  }

  // ---------------------------------------------------------------- tile pieces
  // S[R][n] of tile t against the packed keys: columns [c0, c0 + n) of the packed chunk (multiples of 16).
  void scores(const Tile& t, int64_t row0, int64_t c0, int64_t n, Scratch& sc) const {
    const int64_t rows = (t.s1 - t.s0) * G_;
    if (dot_) {
      kt_->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.qa.get()) + row0 * q_lda_, q_lda_, rows,
                     reinterpret_cast<const uint16_t*>(sc.kp.get()), Dh_ * kPanel * 2, c0, n, Dh_, Dh_, sc.s.get(),
                     lds_, scale_, false);
    } else {
      kt_->gemm.f32(reinterpret_cast<const float*>(sc.qa.get()) + row0 * q_lda_, q_lda_, rows,
                    reinterpret_cast<const float*>(sc.kp.get()), sh_.D * kPanel, c0, n, sh_.D, sh_.D, sc.s.get(), lds_,
                    scale_, false);
    }
  }

  // Invisible keys of the score rows -> -inf (§5 step 2). Column x of the block is batch-local key k0 + x.
  void mask_rows(const Tile& t, int64_t k0, int64_t n, const RowInfo* info, Scratch& sc) const {
    for (int64_t i = t.s0; i < t.s1; ++i) {
      const RowInfo& ri = info[i - t.s0];
      if (ri.kind == kNone) continue;
      const int64_t a = std::clamp<int64_t>(ri.lo - k0, 0, n), e = std::clamp<int64_t>(ri.hi - k0, a, n);
      for (int64_t g = 0; g < G_; ++g) {
        float* srow = sc.s.get() + ((i - t.s0) * G_ + g) * lds_;
        for (int64_t x = 0; x < a; ++x) srow[x] = kNegInf;
        for (int64_t x = e; x < n; ++x) srow[x] = kNegInf;
        if (ri.kind == kMasked)
          for (int64_t x = a; x < e; ++x)
            if (vis_.masked(i, k0 + x)) srow[x] = kNegInf;
      }
    }
  }

  // O[rows][Dv16] (+)= P[rows][n] . V for columns [c0, c0 + n) of the packed chunk (width Wp).
  void pv(int64_t rows, int64_t c0, int64_t n, int64_t Wp, float* o, bool accumulate, Scratch& sc) const {
    if (dot_) {
      kt_->gemm.bf16(reinterpret_cast<const uint16_t*>(sc.pa.get()), lds_, rows,
                     reinterpret_cast<const uint16_t*>(sc.vp.get()) + (c0 / 2) * kPanel * 2, (Wp / 2) * kPanel * 2, 0,
                     Dv16_, n / 2, kPvChunk, o, Dv16_, 1.0f, accumulate);
    } else {
      kt_->gemm.f32(reinterpret_cast<const float*>(sc.pa.get()), lds_, rows,
                    reinterpret_cast<const float*>(sc.vp.get()) + c0 * kPanel, Wp * kPanel, 0, Dv16_, n, kPvChunk, o,
                    Dv16_, 1.0f, accumulate);
    }
  }

  void zero_p_row(int64_t r, int64_t n, Scratch& sc) const {
    std::memset(sc.pa.get() + r * lds_ * static_cast<int64_t>(esz_), 0, static_cast<size_t>(n * static_cast<int64_t>(esz_)));
  }

  // attention_out and statistics of tile t's rows: o rows for rows with keys, the closed form of §6 otherwise.
  void write_tile(const Tile& t, int64_t n2, const RowInfo* info, const float* o, const float* m, const float* l) const {
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    const int64_t N1 = sh_.N1, Dv = sh_.Dv;
    const size_t esz = dtype_size(p_.dtype);
    const std::vector<float>& u = uniform_[static_cast<size_t>(t.b * sh_.N2 + n2)];
    for (int64_t i = t.s0; i < t.s1; ++i) {
      const bool none = info[i - t.s0].kind == kNone;
      for (int64_t g = 0; g < G_; ++g) {
        const int64_t r = (i - t.s0) * G_ + g, h = n2 * G_ + g, tq = bi.q0 + i;
        uint8_t* dst = static_cast<uint8_t*>(p_.attention_out) + (tq * N1 + h) * Dv * static_cast<int64_t>(esz);
        float mm = m[r], ll = l[r];
        if (none) {
          mm = -FLT_MAX;
          if (p_.inner_precise == 2) {
            ll = FLT_MAX;
            std::memset(dst, 0, static_cast<size_t>(Dv) * esz);
          } else {
            ll = static_cast<float>(bi.skv);
            store_rha(u.data(), dst, Dv, p_.dtype, kt_->isa);
          }
        } else {
          store_rha(o + r * Dv16_, dst, Dv, p_.dtype, kt_->isa);
        }
        const int64_t so = window_detail::stat_offset(p_.softmax_layout, N1, bi, h, i);
        std::fill(p_.softmax_max + so, p_.softmax_max + so + 8, mm);
        std::fill(p_.softmax_sum + so, p_.softmax_sum + so + 8, ll);
      }
    }
  }

  void fill_info(const Tile& t, RowInfo* info) const {
    const WBatch& bi = batches_[static_cast<size_t>(t.b)];
    for (int64_t i = t.s0; i < t.s1; ++i) info[i - t.s0] = row_info(vis_, bi, i);
  }

  // ---------------------------------------------------------------- single strips
  void run_single(const Strip& s, int64_t n2, Scratch& sc) const {
    const WBatch& bi = batches_[static_cast<size_t>(tiles_[s.t0].b)];
    const int64_t W = s.hi - s.lo, Wp = round_up(W, kPanel);
    if (W > 0) {
      pack_k(bi, n2, s.lo, W, sc);
      pack_v(bi, n2, s.lo, W, sc);
    }
    for (size_t x = s.t0; x < s.t1; ++x) {
      const Tile& t = tiles_[x];
      const int64_t rows = (t.s1 - t.s0) * G_;
      RowInfo* info = sc.info.data();
      fill_info(t, info);
      const int64_t w = width(t);
      if (w > 0) {
        const int64_t c0 = span_lo(t) - s.lo;
        load_q(t, n2, 0, sc);
        scores(t, 0, c0, w, sc);
        mask_rows(t, span_lo(t), w, info, sc);
        // runs of rows of tokens that see something: maxima and exp sums several rows at a time, then P
        const auto sees = [&](int64_t r) { return info[r / G_].kind != kNone; };
        for (int64_t r = 0; r < rows; ++r)
          if (!sees(r)) zero_p_row(r, w, sc);
        detail::for_each_run(rows, sees, [&](int64_t r0, int64_t r1) {
          kt_->rows.softmax_rows(sc.s.get() + r0 * lds_, lds_, r1 - r0, w, kNegInf, &sc.m[static_cast<size_t>(r0)],
                                 &sc.l[static_cast<size_t>(r0)]);
          for (int64_t r = r0; r < r1; ++r)
            kt_->rows.normalize_row(sc.s.get() + r * lds_, w, sc.l[static_cast<size_t>(r)],
                                    sc.pa.get() + r * lds_ * static_cast<int64_t>(esz_), pstore_);
        });
        pv(rows, c0, w, Wp, sc.o.get(), false, sc);
      }
      write_tile(t, n2, info, sc.o.get(), sc.m.data(), sc.l.data());
    }
  }

  // ---------------------------------------------------------------- multi strips
  void run_multi(const Strip& s, int64_t n2, Scratch& sc) const {
    const WBatch& bi = batches_[static_cast<size_t>(tiles_[s.t0].b)];
    std::fill(sc.m.begin(), sc.m.begin() + s.rows, kNegInf);
    std::fill(sc.l.begin(), sc.l.begin() + s.rows, 0.0f);
    std::fill(sc.o.get(), sc.o.get() + s.rows * Dv16_, 0.0f);
    // query rows of the whole strip, and the row infos of its tokens
    int64_t row0 = 0, tok0 = 0;
    for (size_t x = s.t0; x < s.t1; ++x) {
      const Tile& t = tiles_[x];
      load_q(t, n2, row0, sc);
      fill_info(t, sc.info.data() + tok0);
      row0 += (t.s1 - t.s0) * G_;
      tok0 += t.s1 - t.s0;
    }
    const int64_t c_first = round_down(s.lo, chunk_), c_end = s.hi;
    for (int pass = 1; pass <= 2; ++pass) {
      for (int64_t cb = c_first; cb < c_end; cb += chunk_) {
        const int64_t kb = std::max(cb, s.lo), ke = std::min(cb + chunk_, s.hi), W = ke - kb;
        if (W <= 0) continue;
        pack_k(bi, n2, kb, W, sc);
        if (pass == 2) pack_v(bi, n2, kb, W, sc);
        row0 = 0;
        tok0 = 0;
        for (size_t x = s.t0; x < s.t1; ++x) {
          const Tile& t = tiles_[x];
          const int64_t rows = (t.s1 - t.s0) * G_;
          const RowInfo* info = sc.info.data() + tok0;
          const int64_t a = std::max(kb, span_lo(t)), e = std::min(ke, span_hi(t)), n = e - a;
          if (width(t) > 0 && n > 0) {
            scores(t, row0, a - kb, n, sc);
            mask_rows(t, a, n, info, sc);
            for (int64_t r = 0; r < rows; ++r) {
              float* srow = sc.s.get() + r * lds_;
              float& m = sc.m[static_cast<size_t>(row0 + r)];
              float& l = sc.l[static_cast<size_t>(row0 + r)];
              if (pass == 1) {
                if (info[r / G_].kind == kNone) continue;
                const float mc = kt_->rows.row_max(srow, n, kNegInf);
                if (mc == kNegInf) continue;  // no visible key of this row in the chunk
                if (mc > m) {
                  l = m == kNegInf ? 0.0f : l * std::exp(m - mc);
                  m = mc;
                }
                l += kt_->rows.exp_sum(srow, n, m);
              } else if (m == kNegInf) {
                zero_p_row(r, n, sc);
              } else {
                kt_->rows.exp_sum(srow, n, m);
                kt_->rows.normalize_row(srow, n, l, sc.pa.get() + r * lds_ * static_cast<int64_t>(esz_), pstore_);
              }
            }
            if (pass == 2) pv(rows, a - kb, n, round_up(W, kPanel), sc.o.get() + row0 * Dv16_, true, sc);
          }
          row0 += rows;
          tok0 += t.s1 - t.s0;
        }
      }
    }
    row0 = 0;
    tok0 = 0;
    for (size_t x = s.t0; x < s.t1; ++x) {
      const Tile& t = tiles_[x];
      write_tile(t, n2, sc.info.data() + tok0, sc.o.get() + row0 * Dv16_, sc.m.data() + row0, sc.l.data() + row0);
      row0 += (t.s1 - t.s0) * G_;
      tok0 += t.s1 - t.s0;
    }
  }

  bool dot_ = false;
  PStore pstore_ = PStore::kF32;
  size_t esz_ = 4;
  float scale_ = 1.0f;
  int64_t G_ = 1, Bq_ = 1, R_ = 1, Dh_ = 1, q_lda_ = 1, Dv16_ = 16, Dv64_ = 64, chunk_ = 64;
  int64_t lds_ = 16, max_rows_ = 1, max_keys_ = 64, max_tokens_ = 1;
  std::vector<Tile> tiles_;
  std::vector<Strip> strips_;
  std::vector<std::vector<float>> uniform_;  // [b * N2 + n2][Dv] closed form of §6 (inner_precise 0/1)
};

}  // namespace

Status forward(const WindowAttentionParams& p, const CpuOptions& options, const Tuning& tuning) {
  return run_entry<Forward>("window_attention_cpu", "packed keys/values and per-thread tiles",
                            validate_window_attention, window_reference::forward_fp64, p, options, tuning);
}

}  // namespace nsa::window_cpu
