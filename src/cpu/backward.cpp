// CPU backward (SPEC §7): fused tiles in FlashAttention-2 order, multithreaded, deterministic.
//
// Decomposition. The rows of a tile are (query token, head of the group) pairs: a query tile holds
// Bq tokens x G heads = R rows (R ~ 64, token-major, so the G heads of a token are adjacent as in
// memory); a key tile holds Bc = 64 compressed tokens. For a tile pair (i, j) the work is
//   S  = Q_i K_j^T (fp32 dot products), P = exp(S*scale - m) / l_sum from the saved statistics,
//        P = 0 where atten_mask removes the entry (or the column is past C_b);
//   dP = dO_i V_j^T,  dS = P (dP - Dlt),  Dlt = rowsum(dO * O) with O = attention_out as returned;
//   dV_j^T += dO_i^T P,  dK_j^T += Q_i^T dS,  dQ_i += dS K_j   (dK and dQ times scale at the end).
// dK and dV are accumulated transposed ([D][64]) so that P and dS serve as B operands as they are
// (no per-pair transposes); Q^T and dO^T are built once per query tile load.
// Each output element has exactly one writer and one fixed summation order:
//   dK_j / dV_j accumulate over query tiles i = 0, 1, ... (ascending),
//   dQ_i accumulates over key tiles j = 0, 1, ... (ascending),
// and S, P, dP, dS of a pair are computed by the same code whatever task computes them. Two kinds of
// schedule respect this and give bitwise identical results:
//   one-pass  : a task owns a (batch, KV head): for i: for j: all five products (no recomputation),
//               every key tile of the batch converted once into the worker's cache;
//   two-pass  : "kv" tasks own (batch, KV head, key tile j) and iterate i (dK_j, dV_j); "dq" tasks own
//               (batch, KV head, query tile i) and iterate j (dQ_i), recomputing S and dP.
// The schedule is chosen per call from the shape and the thread count (an LPT estimate of both; two-pass
// costs (4D+3D2)/(3D+2D2) more FLOPs but has more, smaller tasks); results never depend on it.
//
// Masks. A plan per batch records, for every tile pair, whether anything is visible (else it is
// skipped) and the 16-column window [w0, w1) of the key tile that holds every visible entry of its
// rows: all five products run on the window only (a causal mask leaves on average half of the last
// tile of a row visible). A fully masked row (§5) has P = 1/l_sum = 1/C_b on every column and
// contributes only to dV (§7): its share u = sum over such rows of dO / l_sum is added to every dV row
// of the batch after the tile contributions; inside tiles its entries are masked (P = 0), so its dQ is
// zero and it adds nothing to dK.
//
// Precision. All arithmetic in fp32 (fp64 for fp64 inputs): P and dS are not rounded to the input
// dtype (§7 allows either); exp is a Cody-Waite + degree-6 polynomial (about 1 ulp).
// Workspace: per-worker tiles (O(R*(D+D2) + Bc*(D+D2)) floats), plus, in one-pass mode, the key-tile
// cache and dK/dV accumulators of one (batch, KV head): O(maxC*(2D+2D2)). Nothing grows with T x C
// except the plan (3 bytes per tile pair).
//
// GEMM. Every product is one call of gemm_panels with the B operand in the packed panel layout and
// the (col0, ncols) column range of KernelTable::gemm_f32 (src/cpu/kernels.h: [panels][K][64], zero
// padded), so the per-ISA micro-kernels can replace it call for call. gemm_panels itself is portable
// C++ with 16-byte generic vectors (SSE2 at the baseline flags this file is built with).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/batches.h"
#include "core/numeric.h"
#include "cpu/isa.h"
#include "cpu/threads.h"

namespace nsa::cpu {
namespace {

using detail::BatchInfo;

constexpr int64_t kBc = 64;      // compressed tokens of a key tile (= one B panel)
constexpr int64_t kPan = 64;     // width of a packed B panel
constexpr int64_t kRowsTarget = 64;  // rows (token x head) of a query tile

// ---------------------------------------------------------------- element types
struct EBf16 {
  using Raw = uint16_t;
  using Acc = float;
  static float get(Raw v) { return detail::bf16_to_f32(v); }
  static Raw put(float x) { return detail::f32_to_bf16(x); }
};
struct EF16 {
  using Raw = uint16_t;
  using Acc = float;
  static float get(Raw v) { return detail::f16_to_f32(v); }
  static Raw put(float x) { return detail::f32_to_f16(x); }
};
struct EF32 {
  using Raw = float;
  using Acc = float;
  static float get(Raw v) { return v; }
  static Raw put(float x) { return x; }
};
struct EF64 {
  using Raw = double;
  using Acc = double;
  static double get(Raw v) { return v; }
  static Raw put(double x) { return x; }
};

// out[k] = element (base + off + k*stride), k < n, converted to Acc.
template <class E>
inline void load_row(const void* base, int64_t off, int64_t stride, int64_t n, typename E::Acc* out) {
  const typename E::Raw* src = static_cast<const typename E::Raw*>(base) + off;
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) out[k] = E::get(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = E::get(src[k * stride]);
  }
}

// ---------------------------------------------------------------- portable GEMM on packed panels
// C[m][n - col0] (+)= sum_{k<K} A[m*lda + k] * B[(n/64)*panel_stride + k*64 + n%64], m < M,
// n in [col0, col0 + ncols) (col0, ncols multiples of 16: the contract of KernelTable::gemm_f32).
// Each C element is summed in k order starting from C (accumulate) or 0, whatever its position in the
// blocking: the result does not depend on M or on which rows are blocked together.
// Written with GCC/Clang generic 16-byte vectors (SSE2 / NEON width, the baseline of this file) so that
// the MR x NR accumulators stay in registers; plain nested loops are not reliably register-blocked by GCC.
template <typename T>
struct Vec16 {
  typedef T type __attribute__((vector_size(16)));
  static constexpr int kLanes = 16 / sizeof(T);
};

template <int MR, int NV, typename T>
inline void micro(const T* __restrict A, int64_t lda, const T* __restrict B, int64_t K, T* __restrict C,
                  int64_t ldc, bool accumulate) {
  using V = typename Vec16<T>::type;
  constexpr int L = Vec16<T>::kLanes;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) {
      if (accumulate) std::memcpy(&acc[i][j], C + i * ldc + j * L, sizeof(V));
      else acc[i][j] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], B + k * kPan + j * L, sizeof(V));
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) std::memcpy(C + i * ldc + j * L, &acc[i][j], sizeof(V));
}

template <typename T>
void gemm_panels(const T* A, int64_t lda, int64_t M, const T* B, int64_t panel_stride, int64_t col0, int64_t ncols,
                 int64_t K, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = 4, NV = 2, NR = NV * Vec16<T>::kLanes;  // 8 accumulators + 2 B registers
  for (int64_t n0 = col0; n0 < col0 + ncols; n0 += NR) {
    const T* Bp = B + (n0 / kPan) * panel_stride + n0 % kPan;
    T* Cp = C + (n0 - col0);
    int64_t m = 0;
    for (; m + MR <= M; m += MR) micro<MR, NV>(A + m * lda, lda, Bp, K, Cp + m * ldc, ldc, accumulate);
    for (; m < M; ++m) micro<1, NV>(A + m * lda, lda, Bp, K, Cp + m * ldc, ldc, accumulate);
  }
}

// ---------------------------------------------------------------- exp
// exp(x) for x <= ~88, 0 below -87.3 (where expf is at most 1.2e-38). Branch-free so that loops over it
// vectorize: Cody-Waite reduction by ln 2, degree-6 polynomial on [-ln2/2, ln2/2], 2^n from the bits.
inline float exp_poly(float x) {
  float xc = x > -87.3f ? x : -87.3f;  // NaN -> -87.3 here; the NaN is returned at the end
  xc = xc < 88.0f ? xc : 88.0f;
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = (q * r) * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale2;
  std::memcpy(&scale2, &bits, 4);
  return x < -87.3f ? 0.0f : (x == x ? q * scale2 : x);
}
inline double exp_acc(double x) { return std::exp(x); }
inline float exp_acc(float x) { return exp_poly(x); }

// ---------------------------------------------------------------- plan
enum TileState : uint8_t { kSkip = 0, kPartial = 1, kFull = 2 };

// What a tile pair computes: nothing (kSkip), or the columns [w0, w1) of its key tile (16-column
// windows holding every visible entry of its rows; multiples of 16, w1 <= 64), with atten_mask applied
// inside (kPartial) or not needed (kFull: every entry of the window below C_b is visible).
struct PairInfo {
  uint8_t state = kSkip, w0 = 0, w1 = 0;
};

constexpr int64_t kWin = 16;  // column granularity of the windows

struct BatchPlan {
  BatchInfo bi;
  int64_t nq = 0, nk = 0;           // query tiles (of Bq tokens) and key tiles (of Bc tokens)
  std::vector<PairInfo> tile;       // [nq][nk]
  std::vector<int64_t> fm_rows;     // fully masked rows (local s), ascending
  std::vector<int64_t> pairs_q;     // [nq] visible tile pairs x rows x cols, per query tile (cost)
  std::vector<int64_t> pairs_k;     // [nk] the same per key tile
};

struct Geo {
  int64_t T2 = 0, N1 = 0, N2 = 0, G = 0, D = 0, D2 = 0;
  int64_t Dp = 0, D2p = 0, nDp = 0, nD2p = 0;  // D, D2 padded to panels
  int64_t Bq = 0, R = 0;                        // tokens and rows of a query tile
  int64_t max_c_pad = 0;                        // max C_b rounded up to Bc
};

enum class Kind : int { kOnePass = 0, kKv = 1, kDq = 2 };
struct Task {
  Kind kind;
  int64_t b, n2, idx;
  double cost;
};

// Per-worker workspace, allocated once per call (zeroed: panel paddings are read as zeros).
template <typename Acc>
struct Scratch {
  std::vector<Acc> buf;
  std::vector<uint8_t> keep;  // [R][64] 1 = visible entry of the current tile pair
  // Query tile: Q rows qa [R][D] and Q^T qT [D][R]; dO rows oa [R][D2] and dO^T oT [D2][R]; per row m,
  // 1/l_sum, Dlt. Key tiles (ktiles of them): K^T kt [D][64], K panels kp [nDp][64][64], V^T vt [D2][64].
  // Pair: P s [R][64], dP/dS dp [R][64]. Accumulators: dQ dq [R][Dp]; dK^T [D][64] and dV^T [D2][64] per
  // key tile (ktiles of them). u [D2]: the fully masked rows' dV share; orow [D2]: a row being loaded.
  Acc *qa, *qT, *oa, *oT, *orow, *keys, *s, *dp, *rm, *ril, *rdlt, *dq, *dkT, *dvT, *u;
  int64_t ktile = 0;  // floats of one cached key tile
  bool ready = false;

  Acc* kt(int64_t j) const { return keys + j * ktile; }

  void init(const Geo& g, int64_t ktiles) {
    const int64_t R = g.R;
    ktile = g.D * kBc + g.nDp * kBc * kPan + g.D2 * kBc;
    const int64_t sizes[] = {R * g.D, g.D * R, R * g.D2, g.D2 * R, g.D2, ktiles * ktile, R * kBc, R * kBc,
                             R,       R,       R,        R * g.Dp, ktiles * g.D * kBc, ktiles * g.D2 * kBc, g.D2};
    Acc** ptrs[] = {&qa, &qT, &oa, &oT, &orow, &keys, &s, &dp, &rm, &ril, &rdlt, &dq, &dkT, &dvT, &u};
    int64_t total = 0;
    for (int64_t sz : sizes) total += (sz + 15) / 16 * 16;  // 64-byte granules
    buf.assign(static_cast<size_t>(total), Acc(0));
    keep.assign(static_cast<size_t>(R * kBc), 0);
    Acc* at = buf.data();
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      *ptrs[i] = at;
      at += (sizes[i] + 15) / 16 * 16;
    }
    ready = true;
  }
};

// LPT estimate of the makespan of `costs` on `workers` workers (largest first, to the least loaded).
double lpt_makespan(std::vector<double> costs, int workers) {
  std::sort(costs.begin(), costs.end(), [](double a, double b) { return a > b; });
  std::vector<double> load(static_cast<size_t>(std::max(workers, 1)), 0.0);
  for (double c : costs) *std::min_element(load.begin(), load.end()) += c;
  return *std::max_element(load.begin(), load.end());
}

template <class E>
class Backward {
 public:
  using Acc = typename E::Acc;
  using Raw = typename E::Raw;

  Backward(const CompressAttentionGradParams& p, const CompressAttentionShape& sh, int threads)
      : p_(p), f_(p.fwd), threads_(threads) {
    g_.T2 = sh.T2;
    g_.N1 = sh.N1;
    g_.N2 = sh.N2;
    g_.G = sh.G;
    g_.D = sh.D;
    g_.D2 = sh.D2;
    g_.nDp = (sh.D + kPan - 1) / kPan;
    g_.nD2p = (sh.D2 + kPan - 1) / kPan;
    g_.Dp = g_.nDp * kPan;
    g_.D2p = g_.nD2p * kPan;
    g_.Bq = std::max<int64_t>(1, kRowsTarget / sh.G);
    g_.R = g_.Bq * sh.G;
    g_.max_c_pad = (sh.max_c + kBc - 1) / kBc * kBc;
    scale_ = static_cast<Acc>(static_cast<float>(f_.scale_value));  // §1: used as float32
    const std::vector<BatchInfo> bis = detail::make_batches(f_, sh);
    plans_.resize(bis.size());
    for (size_t b = 0; b < bis.size(); ++b) {
      BatchPlan& pl = plans_[b];
      pl.bi = bis[b];
      pl.nq = (pl.bi.sq + g_.Bq - 1) / g_.Bq;
      pl.nk = (pl.bi.c + kBc - 1) / kBc;
    }
  }

  void run() {
    build_plans();
    // Costs in multiply-adds per visible (row, column) of a computed tile pair.
    const double w_one = 3.0 * g_.D + 2.0 * g_.D2, w_kv = 2.0 * g_.D + 2.0 * g_.D2, w_dq = 2.0 * g_.D + g_.D2;
    std::vector<Task> one, two;
    for (int64_t b = 0; b < static_cast<int64_t>(plans_.size()); ++b) {
      const BatchPlan& pl = plans_[static_cast<size_t>(b)];
      int64_t total = 0;
      for (int64_t v : pl.pairs_q) total += v;
      const double fixed = static_cast<double>(pl.bi.c) * (g_.D + g_.D2);  // writing dK/dV rows
      for (int64_t n2 = 0; n2 < g_.N2; ++n2) {
        one.push_back({Kind::kOnePass, b, n2, 0, w_one * static_cast<double>(total) + fixed});
        for (int64_t j = 0; j < pl.nk; ++j)
          two.push_back({Kind::kKv, b, n2, j, w_kv * static_cast<double>(pl.pairs_k[j]) + kBc * (g_.D + g_.D2)});
        for (int64_t i = 0; i < pl.nq; ++i)
          two.push_back({Kind::kDq, b, n2, i, w_dq * static_cast<double>(pl.pairs_q[i]) + g_.R * g_.D});
      }
    }
    auto costs = [](const std::vector<Task>& ts) {
      std::vector<double> c;
      for (const Task& t : ts) c.push_back(t.cost);
      return c;
    };
    const bool one_pass = threads_ <= 1 || lpt_makespan(costs(one), threads_) <= lpt_makespan(costs(two), threads_);
    std::vector<Task>& tasks = one_pass ? one : two;
    // Largest first (LPT); the order in which tasks run never changes a result.
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

    int64_t max_nk = 1;
    for (const BatchPlan& pl : plans_) max_nk = std::max(max_nk, pl.nk);
    const int workers = static_cast<int>(std::min<int64_t>(threads_, static_cast<int64_t>(tasks.size())));
    std::vector<Scratch<Acc>> scratch(static_cast<size_t>(std::max(workers, 1)));
    parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int w) {
      Scratch<Acc>& sc = scratch[static_cast<size_t>(w)];
      if (!sc.ready) sc.init(g_, one_pass ? max_nk : 1);
      const Task& task = tasks[static_cast<size_t>(t)];
      switch (task.kind) {
        case Kind::kOnePass: run_one_pass(task.b, task.n2, sc); break;
        case Kind::kKv: run_kv(task.b, task.n2, task.idx, sc); break;
        case Kind::kDq: run_dq(task.b, task.n2, task.idx, sc); break;
      }
    });

    // Key/value rows past cmp_seq_kvlen[B-1] get zero gradient (§7).
    const int64_t c_end = plans_.back().bi.c_begin + plans_.back().bi.c;
    Raw* gk = static_cast<Raw*>(p_.grad_key);
    Raw* gv = static_cast<Raw*>(p_.grad_value);
    std::fill(gk + c_end * g_.N2 * g_.D, gk + g_.T2 * g_.N2 * g_.D, E::put(Acc(0)));
    std::fill(gv + c_end * g_.N2 * g_.D2, gv + g_.T2 * g_.N2 * g_.D2, E::put(Acc(0)));
  }

 private:
  bool masked(int64_t s, int64_t c) const {
    const Mask2& m = f_.atten_mask;
    return m.data[s * m.stride[0] + c * m.stride[1]] != 0;
  }

  // Tile visibility map, fully masked rows and tile costs of every batch (parallel over batches).
  void build_plans() {
    parallel_for(static_cast<int64_t>(plans_.size()), threads_, [&](int64_t b, int) {
      BatchPlan& pl = plans_[static_cast<size_t>(b)];
      const int64_t Bq = g_.Bq, C = pl.bi.c, Sq = pl.bi.sq;
      pl.tile.assign(static_cast<size_t>(pl.nq * pl.nk), PairInfo{});
      pl.pairs_q.assign(static_cast<size_t>(pl.nq), 0);
      pl.pairs_k.assign(static_cast<size_t>(pl.nk), 0);
      pl.fm_rows.clear();
      const bool has_mask = f_.atten_mask.data != nullptr;
      // Per key tile of the current query tile: first and last visible column (relative), whether
      // every entry of the rows is visible.
      std::vector<int64_t> lo(static_cast<size_t>(pl.nk)), hi(static_cast<size_t>(pl.nk));
      std::vector<uint8_t> all(static_cast<size_t>(pl.nk));
      for (int64_t i = 0; i < pl.nq; ++i) {
        const int64_t s0 = i * Bq, s1 = std::min(Sq, s0 + Bq);
        std::fill(lo.begin(), lo.end(), kBc);
        std::fill(hi.begin(), hi.end(), -1);
        std::fill(all.begin(), all.end(), 1);
        for (int64_t s = s0; s < s1; ++s) {
          bool row_any = false;
          for (int64_t j = 0; j < pl.nk; ++j) {
            const int64_t c0 = j * kBc, nc = std::min(C, c0 + kBc) - c0;
            int64_t first = -1, last = -1;
            if (!has_mask) {
              first = 0;
              last = nc - 1;
            } else {
              for (int64_t c = 0; c < nc; ++c)
                if (!masked(s, c0 + c)) {
                  if (first < 0) first = c;
                  last = c;
                } else {
                  all[static_cast<size_t>(j)] = 0;
                }
            }
            if (first >= 0) {
              row_any = true;
              lo[static_cast<size_t>(j)] = std::min(lo[static_cast<size_t>(j)], first);
              hi[static_cast<size_t>(j)] = std::max(hi[static_cast<size_t>(j)], last);
            }
          }
          if (!row_any) pl.fm_rows.push_back(s);
        }
        for (int64_t j = 0; j < pl.nk; ++j) {
          PairInfo& pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
          if (hi[static_cast<size_t>(j)] < 0) continue;  // kSkip: nothing visible
          pi.state = all[static_cast<size_t>(j)] ? kFull : kPartial;
          pi.w0 = static_cast<uint8_t>(lo[static_cast<size_t>(j)] / kWin * kWin);
          pi.w1 = static_cast<uint8_t>((hi[static_cast<size_t>(j)] / kWin + 1) * kWin);
          const int64_t work = (s1 - s0) * g_.G * (pi.w1 - pi.w0);
          pl.pairs_q[static_cast<size_t>(i)] += work;
          pl.pairs_k[static_cast<size_t>(j)] += work;
        }
      }
    });
  }

  int64_t tile_rows(const BatchPlan& pl, int64_t i) const {
    return (std::min(pl.bi.sq, (i + 1) * g_.Bq) - i * g_.Bq) * g_.G;
  }

  // Query tile i of (batch, n2): Q and dO as rows (qa, oa) and transposed (qT, oT, if `transposed`), the
  // statistics m and 1/l_sum, and Dlt = sum_j dO*O of every row.
  void load_q(const BatchPlan& pl, int64_t n2, int64_t i, bool transposed, Scratch<Acc>& sc) const {
    const int64_t G = g_.G, D = g_.D, D2 = g_.D2, R = g_.R, rows = tile_rows(pl, i);
    const Tensor3 &q = f_.query, &o = p_.attention_out, &go = p_.grad_out;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = i * g_.Bq + r / G, h = n2 * G + r % G, t = pl.bi.q_begin + s;
      load_row<E>(q.data, t * q.stride[0] + h * q.stride[1], q.stride[2], D, sc.qa + r * D);
      Acc* oa = sc.oa + r * D2;
      load_row<E>(go.data, t * go.stride[0] + h * go.stride[1], go.stride[2], D2, oa);
      load_row<E>(o.data, t * o.stride[0] + h * o.stride[1], o.stride[2], D2, sc.orow);
      Acc dlt = 0;
      for (int64_t e = 0; e < D2; ++e) dlt += oa[e] * sc.orow[e];
      sc.rdlt[r] = dlt;
      const int64_t so = detail::stat_offset(pl.bi, h, s);
      sc.rm[r] = static_cast<Acc>(p_.softmax_max[so]);
      sc.ril[r] = Acc(1) / static_cast<Acc>(p_.softmax_sum[so]);
    }
    if (transposed) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t r = 0; r < rows; ++r) sc.qT[d * R + r] = sc.qa[r * D + d];
      for (int64_t e = 0; e < D2; ++e)
        for (int64_t r = 0; r < rows; ++r) sc.oT[e * R + r] = sc.oa[r * D2 + e];
    }
  }

  // Key tile j of (batch, n2) into the cache slot `kt`: K^T [D][64], K panels [nDp][64][64] and
  // V^T [D2][64]; columns past C_b are zero in K^T and V^T.
  void load_k(const BatchPlan& pl, int64_t n2, int64_t j, Acc* slot) const {
    const int64_t D = g_.D, D2 = g_.D2, c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    Acc* kt = slot;
    Acc* kp = slot + D * kBc;
    Acc* vt = kp + g_.nDp * kBc * kPan;
    const Tensor3 &k = f_.key, &v = f_.value;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t tk = pl.bi.c_begin + c0 + c;
      for (int64_t pn = 0; pn < g_.nDp; ++pn) {
        const int64_t d0 = pn * kPan, w = std::min(kPan, D - d0);
        load_row<E>(k.data, tk * k.stride[0] + n2 * k.stride[1] + d0 * k.stride[2], k.stride[2], w,
                    kp + (pn * kBc + c) * kPan);
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      const Acc* src = kp + (d / kPan) * kBc * kPan + d % kPan;
      Acc* dst = kt + d * kBc;
      for (int64_t c = 0; c < nc; ++c) dst[c] = src[c * kPan];
      for (int64_t c = nc; c < kBc; ++c) dst[c] = 0;
    }
    for (int64_t c = 0; c < nc; ++c) {
      const Raw* vr = static_cast<const Raw*>(v.data) + (pl.bi.c_begin + c0 + c) * v.stride[0] + n2 * v.stride[1];
      for (int64_t e = 0; e < D2; ++e) vt[e * kBc + c] = E::get(vr[e * v.stride[2]]);
    }
    for (int64_t e = 0; e < D2; ++e)
      for (int64_t c = nc; c < kBc; ++c) vt[e * kBc + c] = 0;
  }

  // The tile pair (i, j) on a loaded query tile and key tile `slot`, on the columns [w0, w1) of its window:
  // S, P, dP, dS; then dV_j^T += dO^T P and dK_j^T += Q^T dS (into dkT [D][64], dvT [D2][64]) and/or
  // dQ_i += dS K_j (into sc.dq).
  void pair(const BatchPlan& pl, int64_t i, int64_t j, PairInfo pi, const Acc* slot, Acc* dkT, Acc* dvT,
            bool do_dq, Scratch<Acc>& sc) const {
    const int64_t R = g_.R, rows = tile_rows(pl, i), c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    const int64_t w0 = pi.w0, w1 = pi.w1, wn = w1 - w0;
    const Acc* kt = slot;
    const Acc* kp = slot + g_.D * kBc;
    const Acc* vt = kp + g_.nDp * kBc * kPan;
    gemm_panels<Acc>(sc.qa, g_.D, rows, kt, 0, w0, wn, g_.D, sc.s + w0, kBc, false);     // S
    gemm_panels<Acc>(sc.oa, g_.D2, rows, vt, 0, w0, wn, g_.D2, sc.dp + w0, kBc, false);  // dP
    // Visible entries of the window: columns < nc, and not removed by atten_mask in a partial pair.
    uint8_t* keep = sc.keep.data();
    const int64_t wv = std::min(w1, nc);  // window columns below C_b
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* kr = keep + r * kBc;
      if (pi.state == kFull) {
        for (int64_t c = w0; c < wv; ++c) kr[c] = 1;
      } else {
        const int64_t s = i * g_.Bq + r / g_.G, ms = f_.atten_mask.stride[1];
        const uint8_t* mr = f_.atten_mask.data + s * f_.atten_mask.stride[0] + c0 * ms;
        for (int64_t c = w0; c < wv; ++c) kr[c] = mr[c * ms] == 0;
      }
      for (int64_t c = wv; c < w1; ++c) kr[c] = 0;
    }
    const Acc scale = scale_;
    for (int64_t r = 0; r < rows; ++r) {
      Acc* __restrict sr = sc.s + r * kBc;
      Acc* __restrict dpr = sc.dp + r * kBc;
      const uint8_t* __restrict kr = keep + r * kBc;
      const Acc m = sc.rm[r], il = sc.ril[r], dlt = sc.rdlt[r];
      for (int64_t c = w0; c < w1; ++c) {
        const Acc e = exp_acc(sr[c] * scale - m) * il;
        const Acc pc = kr[c] ? e : Acc(0);
        sr[c] = pc;                    // P
        dpr[c] = pc * (dpr[c] - dlt);  // dS
      }
    }
    if (dkT != nullptr) {
      gemm_panels<Acc>(sc.oT, R, g_.D2, sc.s, 0, w0, wn, rows, dvT + w0, kBc, true);  // dV^T += dO^T P
      gemm_panels<Acc>(sc.qT, R, g_.D, sc.dp, 0, w0, wn, rows, dkT + w0, kBc, true);  // dK^T += Q^T dS
    }
    if (do_dq)  // dQ += dS K over the window's key rows below C_b
      gemm_panels<Acc>(sc.dp + w0, kBc, rows, kp + w0 * kPan, kBc * kPan, 0, g_.Dp, wv - w0, sc.dq, g_.Dp, true);
  }

  // u = sum over fully masked rows s (ascending) and heads g of dO[s, h] / l_sum[s, h]: their dV share.
  void fully_masked_share(const BatchPlan& pl, int64_t n2, Scratch<Acc>& sc) const {
    const int64_t D2 = g_.D2;
    std::fill(sc.u, sc.u + D2, Acc(0));
    const Tensor3& go = p_.grad_out;
    for (int64_t s : pl.fm_rows)
      for (int64_t g = 0; g < g_.G; ++g) {
        const int64_t h = n2 * g_.G + g, t = pl.bi.q_begin + s;
        load_row<E>(go.data, t * go.stride[0] + h * go.stride[1], go.stride[2], D2, sc.orow);
        const Acc il = Acc(1) / static_cast<Acc>(p_.softmax_sum[detail::stat_offset(pl.bi, h, s)]);
        for (int64_t e = 0; e < D2; ++e) sc.u[e] += il * sc.orow[e];
      }
  }

  // Writes dK_j (times scale) and dV_j (plus u) of key tile j in the dtype, from dK^T / dV^T.
  void finish_kv(const BatchPlan& pl, int64_t n2, int64_t j, const Acc* dkT, const Acc* dvT,
                 const Scratch<Acc>& sc) const {
    const int64_t D = g_.D, D2 = g_.D2, c0 = j * kBc, nc = std::min(pl.bi.c, c0 + kBc) - c0;
    const bool has_fm = !pl.fm_rows.empty();
    Raw* gk = static_cast<Raw*>(p_.grad_key);
    Raw* gv = static_cast<Raw*>(p_.grad_value);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t row = (pl.bi.c_begin + c0 + c) * g_.N2 + n2;
      for (int64_t d = 0; d < D; ++d) gk[row * D + d] = E::put(scale_ * dkT[d * kBc + c]);
      for (int64_t e = 0; e < D2; ++e) gv[row * D2 + e] = E::put(has_fm ? dvT[e * kBc + c] + sc.u[e] : dvT[e * kBc + c]);
    }
  }

  void write_dq(const BatchPlan& pl, int64_t n2, int64_t i, const Scratch<Acc>& sc) const {
    const int64_t G = g_.G, D = g_.D, rows = tile_rows(pl, i);
    Raw* gq = static_cast<Raw*>(p_.grad_query);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = pl.bi.q_begin + i * g_.Bq + r / G, h = n2 * G + r % G;
      const Acc* dqr = sc.dq + r * g_.Dp;
      Raw* out = gq + (t * g_.N1 + h) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = E::put(scale_ * dqr[d]);
    }
  }

  // Task: dK_j and dV_j of (batch, n2), over query tiles i ascending.
  void run_kv(int64_t b, int64_t n2, int64_t j, Scratch<Acc>& sc) const {
    const BatchPlan& pl = plans_[static_cast<size_t>(b)];
    std::fill(sc.dkT, sc.dkT + g_.D * kBc, Acc(0));
    std::fill(sc.dvT, sc.dvT + g_.D2 * kBc, Acc(0));
    load_k(pl, n2, j, sc.kt(0));
    for (int64_t i = 0; i < pl.nq; ++i) {
      const PairInfo pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
      if (pi.state == kSkip) continue;
      load_q(pl, n2, i, true, sc);
      pair(pl, i, j, pi, sc.kt(0), sc.dkT, sc.dvT, false, sc);
    }
    fully_masked_share(pl, n2, sc);
    finish_kv(pl, n2, j, sc.dkT, sc.dvT, sc);
  }

  // Task: dQ_i of (batch, n2), over key tiles j ascending.
  void run_dq(int64_t b, int64_t n2, int64_t i, Scratch<Acc>& sc) const {
    const BatchPlan& pl = plans_[static_cast<size_t>(b)];
    std::fill(sc.dq, sc.dq + g_.R * g_.Dp, Acc(0));
    load_q(pl, n2, i, false, sc);
    for (int64_t j = 0; j < pl.nk; ++j) {
      const PairInfo pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
      if (pi.state == kSkip) continue;
      load_k(pl, n2, j, sc.kt(0));
      pair(pl, i, j, pi, sc.kt(0), nullptr, nullptr, true, sc);
    }
    write_dq(pl, n2, i, sc);
  }

  // Task: everything of (batch, n2) in one pass, for i: for j (the summation orders of run_kv / run_dq),
  // with every key tile of the batch converted once.
  void run_one_pass(int64_t b, int64_t n2, Scratch<Acc>& sc) const {
    const BatchPlan& pl = plans_[static_cast<size_t>(b)];
    std::fill(sc.dkT, sc.dkT + pl.nk * g_.D * kBc, Acc(0));
    std::fill(sc.dvT, sc.dvT + pl.nk * g_.D2 * kBc, Acc(0));
    if (pl.nq > 0)
      for (int64_t j = 0; j < pl.nk; ++j) load_k(pl, n2, j, sc.kt(j));
    for (int64_t i = 0; i < pl.nq; ++i) {
      std::fill(sc.dq, sc.dq + g_.R * g_.Dp, Acc(0));
      load_q(pl, n2, i, true, sc);
      for (int64_t j = 0; j < pl.nk; ++j) {
        const PairInfo pi = pl.tile[static_cast<size_t>(i * pl.nk + j)];
        if (pi.state == kSkip) continue;
        pair(pl, i, j, pi, sc.kt(j), sc.dkT + j * g_.D * kBc, sc.dvT + j * g_.D2 * kBc, true, sc);
      }
      write_dq(pl, n2, i, sc);
    }
    fully_masked_share(pl, n2, sc);
    for (int64_t j = 0; j < pl.nk; ++j) finish_kv(pl, n2, j, sc.dkT + j * g_.D * kBc, sc.dvT + j * g_.D2 * kBc, sc);
  }

  const CompressAttentionGradParams& p_;
  const CompressAttentionParams& f_;
  int threads_;
  Geo g_;
  Acc scale_;
  std::vector<BatchPlan> plans_;
};

template <class E>
void run_backward(const CompressAttentionGradParams& p, const CompressAttentionShape& sh, int threads) {
  Backward<E> bw(p, sh, threads);
  bw.run();
}

}  // namespace
}  // namespace nsa::cpu

namespace nsa {

Status compress_attention_backward_cpu(const CompressAttentionGradParams& p) {
  CompressAttentionShape sh;
  Status st = validate_compress_attention_backward(p, &sh);
  if (!st.ok()) return st;
  CpuIsa isa;
  st = cpu::resolve_isa(p.fwd.cpu_isa, &isa);  // the plain-C++ tiles run on every ISA for now
  if (!st.ok()) return st;
  const int threads = cpu::resolve_num_threads(p.fwd.num_threads);
  switch (p.fwd.dtype) {
    case DType::kBF16: cpu::run_backward<cpu::EBf16>(p, sh, threads); break;
    case DType::kF16: cpu::run_backward<cpu::EF16>(p, sh, threads); break;
    case DType::kF32: cpu::run_backward<cpu::EF32>(p, sh, threads); break;
    case DType::kF64: cpu::run_backward<cpu::EF64>(p, sh, threads); break;
  }
  return Status::Ok();
}

}  // namespace nsa
