// CUDA forward of §3: one thread block per (query tile, KV head n2, [row block x D2 slice]).
//
// Tile. The block owns bq query tokens s0..s0+bq-1 of one batch and stacks the G heads of the group as
// rows: row r = i*G + g is token s0+i, head h = n2*G + g (token-major, as the CPU backend). rp = R rounded
// up to 64 rows (R = bq*G <= 64 when G <= 64; for G > 64, bq = 1 and the block holds rp/64 row blocks).
//
// Window. The block scans atten_mask for its tokens: [lo, hi) = union of the visible ranges of its rows;
// the whole row [0, C_b) when there is no mask or when one of its rows is fully masked (§5: those rows
// then follow the literal computation: all S = -FLT_MAX, m = -FLT_MAX, P = 1/C_b). Columns outside the
// window are masked for every row of the block, so their S is -FLT_MAX: the row max starts at -FLT_MAX
// and, as long as m > -FLT_MAX, their P = exp(-FLT_MAX - m) / l is exactly 0 and they can be skipped.
// If some row ends with m == -FLT_MAX (its visible scores all overflowed to -inf or lie at -FLT_MAX),
// the window is widened to [0, C_b) before the sum, so that P = 1/l on the masked columns as §3.3 gives.
//
// Exact softmax (§3.3). The window is processed in chunks of sw columns whose fp32 score block
// S[rp][sw] lives in shared memory. Pass 0: row max; pass 1: sum of exp(S - m); pass 2: P = exp(S-m)/l,
// then O += round(P).V (P rounded to the dtype, round to nearest even, fp32 accumulation, one final
// rounding) and the selection scores. When the window fits in one chunk (the usual case) S is computed
// once; otherwise it is recomputed in each pass by the same code (identical bits: same fmaf order).
//
// Selection (§3.5-3.8), in the block of blockIdx.z == 0 only: the fp32 P rows of the G heads of a token
// are summed pairwise over g (§3.6 order, odd last carried up) elementwise, in place, then
// score[k] = sum_i w_i Pg[M(k+1) - i] (§3.5 weights; the §3.5 map is linear, so summing the heads first
// equals the group sum of the head scores up to rounding, as in the CPU backend); blocks whose taps
// cross a chunk boundary read the previous chunk's last kHalo columns, kept in front of the row.
// Forced blocks (§3.7) score FLT_MAX. Every block index of [0, Sel_b) is offered to a per-token top-K
// kept sorted by a warp (WarpTopK, order of detail::topk_before, src/common/topk_order.h); blocks left of the window score 0.
//
// GEMMs. Simple path (any dtype): fp32 CUDA-core FMAs on tiles staged in shared memory as fp32.
// Tensor-core path (bf16/fp16, sm_80+): mma.sync m16n8k16 with fp32 accumulation; Q.K^T on the
// dtype's values (exact products), P.V on P rounded to the dtype (the same cast(P) as §3.4).
// NSA_CUDA_SIMPLE=1 forces the simple path.
//
// Each output element has one writer: attention_out by the block of its (row block, D2 slice),
// statistics by D2 slice 0, topk_indices by blockIdx.z == 0. Nothing uses atomics except the window
// min/max in shared memory (order-free). 64-bit element offsets throughout.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops/compress_attention/batches.h"
#include "ops/compress_attention/cuda_args.cuh"
#include "cuda/common.cuh"
#include "nsa/cuda.h"

namespace nsa {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;      // rows of a row block
constexpr int kKC = 64;        // score columns per GEMM tile
constexpr int kDK = 32;        // reduction slice of the simple Q.K^T
constexpr int kLdT = 68;       // row stride (floats) of the transposed fp32 staging tiles
constexpr int kVC = 16;        // value rows staged per step of the simple P.V
constexpr int kD2Slice = 256;  // output columns of one block
constexpr int kHalo = 16;      // columns kept in front of each score row (>= M + N - 2 = 14 at most)
constexpr int kRowPad = 8;     // extra floats per score row (bank spread for the tensor-core reads)
// Tensor-core staging (16-bit elements).
constexpr int kTcDK = 64;             // reduction slice of the tensor-core Q.K^T
constexpr int kTcLdQ = kTcDK + 8;     // row stride (elements) of the staged Q / K slices
constexpr int kTcVC = 32;             // value rows staged per step of the tensor-core P.V
constexpr int kTcLdV = kTcVC + 8;     // row stride (elements) of the staged V^T

// fp32 staging floats of each path (the QK and PV staging areas alias each other).
constexpr int kStageSimple = (2 * kDK * kLdT > kVC * kD2Slice) ? 2 * kDK * kLdT : kVC * kD2Slice;
constexpr int kStageTcBytes = (2 * kRows * kTcLdQ * 2 > kD2Slice * kTcLdV * 2) ? 2 * kRows * kTcLdQ * 2
                                                                                : kD2Slice * kTcLdV * 2;
constexpr int kStageTc = kStageTcBytes / 4;

// The inputs (QkvArgs: q, k, v, atten_mask, sizes, scale) and the forward's own arguments.
struct FwdArgs : QkvArgs {
  const uint8_t* tm;  // topk_mask or nullptr
  int64_t tm0, tm1;
  void* out;
  int32_t* topk;
  float* smax;
  float* ssum;
  const DevBatch* batches;
  const int64_t* tile_begin;  // [B + 1] prefix sums of the tiles of each batch
  int M, K;
  int ntaps;        // M + N - 1
  float w[16];      // §3.5 weights w_i
  int bq;           // query tokens per tile
  int rp;           // rows of the score block (multiple of 64)
  int nds;          // D2 slices (blockIdx.z = row block * nds + slice)
  int sw;           // columns of a chunk (multiple of 64)
  int ld_s;         // floats per score row: kHalo + sw + kRowPad
  int stage;        // floats of the staging area
};

// ------------------------------------------------------------------------------------ tensor cores
// D[16x8] += A[16x16] B[16x8] (fp32 accumulators d0..d3 in the m16n8 C layout), T = __nv_bfloat16 or __half: the
// one PTX instruction differs only in its operand type (bf16 / f16).
template <typename T>
__device__ __forceinline__ void mma16816(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                                         uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma16816: bf16 or fp16 operands");
#if defined(NSA_EMU_MMA16816)
  NSA_EMU_MMA16816(T, d0, d1, d2, d3, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Two floats rounded to the 16-bit type (nearest even) and packed: lo in bits 0..15 (lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half), .y = hi
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ------------------------------------------------------------------------------------ the kernel
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdArgs a) {
  NSA_DYNAMIC_SHARED(float4, smem_f4);
  float* const smem = reinterpret_cast<float*>(smem_f4);
  float* const sS = smem;                              // [rp][ld_s] score / P block
  float* const sStage = sS + a.rp * a.ld_s;            // staging (aliased by the QK and PV phases)
  float* const sM = sStage + a.stage;                  // [rp] row max
  float* const sL = sM + a.rp;                         // [rp] row sum
  float* const sTopV = sL + a.rp;                      // [bq][K] top-K scores of each token
  int* const sTopI = reinterpret_cast<int*>(sTopV + a.bq * a.K);  // [bq][K] their block indices
  __shared__ int sh_lo, sh_hi, sh_full, sh_ext;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* const Q = static_cast<const T*>(a.q);
  const T* const Kp = static_cast<const T*>(a.k);
  const T* const V = static_cast<const T*>(a.v);

  const int64_t tile = blockIdx.x;
  const int b = find_batch(a.tile_begin, a.B, tile);
  const DevBatch bt = a.batches[b];
  const int s0 = static_cast<int>(tile - a.tile_begin[b]) * a.bq;
  const int ntok = min(a.bq, bt.sq - s0);
  const int G = a.G, M = a.M, K = a.K, C = bt.c, ld_s = a.ld_s;
  const int R = ntok * G;  // active rows
  const int rbo = static_cast<int>(blockIdx.z) / a.nds;  // row block of the outputs of this block
  const int ds = static_cast<int>(blockIdx.z) % a.nds;   // D2 slice of the outputs of this block
  const bool do_sel = blockIdx.z == 0;
  const int j0 = ds * kD2Slice;
  const int ncols = min(kD2Slice, a.D2 - j0);
  const int nrb = a.rp / kRows;

  for (int n2 = blockIdx.y; n2 < a.N2; n2 += gridDim.y) {
    __syncthreads();  // shared memory of the previous n2 is dead
    // ------------------------------------------------------------ window of the tile
    if (tid == 0) {
      sh_lo = C;
      sh_hi = 0;
      sh_full = 0;
      sh_ext = 0;
    }
    __syncthreads();
    if (a.am != nullptr) {
      for (int i = warp; i < ntok; i += kWarps) {
        int first, last;
        mask_row_window(a, s0 + i, C, lane, &first, &last);
        if (lane == 0) {
          if (last < 0) atomicOr(&sh_full, 1);
          else {
            atomicMin(&sh_lo, first);
            atomicMax(&sh_hi, last + 1);
          }
        }
      }
    }
    __syncthreads();
    int lo = 0, hi = C;
    if (a.am != nullptr && sh_full == 0 && sh_hi > sh_lo) {
      lo = sh_lo;
      hi = sh_hi;
    }
    const bool partial = lo > 0 || hi < C;
    for (int r = tid; r < a.rp; r += kThreads) {
      sM[r] = partial ? -FLT_MAX : -INFINITY;  // the masked columns outside the window hold -FLT_MAX
      sL[r] = 0.0f;
    }
    if (do_sel)
      for (int e = tid; e < ntok * K; e += kThreads) {
        sTopV[e] = __int_as_float(0x7fc00000);
        sTopI[e] = INT_MAX;
      }

    // token / head of a row, and the mask test of (row, column of the batch)
    auto q_off = [&](int r, int d) -> int64_t {
      const int i = r / G, g = r - (r / G) * G;
      return (bt.q_begin + s0 + i) * a.qs0 + static_cast<int64_t>(n2 * G + g) * a.qs1 + static_cast<int64_t>(d) * a.qs2;
    };
    // key / value c (a column of the batch), column d
    auto k_off = [&](int c, int d) -> int64_t { return kv_off(bt.c_begin + c, n2, d, a.ks0, a.ks1, a.ks2); };
    auto v_off = [&](int c, int d) -> int64_t { return kv_off(bt.c_begin + c, n2, d, a.vs0, a.vs1, a.vs2); };
    auto masked = [&](int r, int c) -> bool {
      return a.am != nullptr && a.am[static_cast<int64_t>(s0 + r / G) * a.am0 + static_cast<int64_t>(c) * a.am1] != 0;
    };
    // S[r][c] (score row r, chunk column c of the chunk starting at c0) = masked ? -FLT_MAX : dot * scale
    auto put_score = [&](int r, int c, int c0, int w, float dot) {
      if (r < R && c < w) sS[r * ld_s + kHalo + c] = masked(r, c0 + c) ? -FLT_MAX : __fmul_rn(dot, a.scale);
    };

    // ------------------------------------------------------------ S of one chunk
    auto compute_scores = [&](int c0, int w) {
      for (int rb = 0; rb < nrb; ++rb) {
        for (int ct = 0; ct < w; ct += kKC) {
          if constexpr (!kTC) {
            float* const sQt = sStage;               // [kDK][kLdT]: Q slice, transposed
            float* const sKt = sStage + kDK * kLdT;  // [kDK][kLdT]: K slice, transposed
            const int tx = tid & 15, ty = tid >> 4;
            float acc[4][4] = {};
            for (int d0 = 0; d0 < a.D; d0 += kDK) {
              __syncthreads();
              stage_tile<kRows, kDK, kThreads>(sQt, 1, kLdT, rb * kRows, R, d0, a.D, [&](int rr, int dd) {
                return Elem<T>::load(Q, q_off(rb * kRows + rr, d0 + dd));
              });
              stage_tile<kKC, kDK, kThreads>(sKt, 1, kLdT, ct, w, d0, a.D, [&](int cc, int dd) {
                return Elem<T>::load(Kp, k_off(c0 + ct + cc, d0 + dd));
              });
              __syncthreads();
#pragma unroll 8
              for (int dd = 0; dd < kDK; ++dd) {
                const float4 qa = *reinterpret_cast<const float4*>(sQt + dd * kLdT + ty * 4);
                const float4 kb = *reinterpret_cast<const float4*>(sKt + dd * kLdT + tx * 4);
                const float qv[4] = {qa.x, qa.y, qa.z, qa.w}, kv[4] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                  for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv[i], kv[j], acc[i][j]);
              }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) put_score(rb * kRows + ty * 4 + i, ct + tx * 4 + j, c0, w, acc[i][j]);
          } else {
            // 8 warps: warp w computes rows 16*(w/2).. of the row block, columns 32*(w%2).. of the tile
            T* const sQh = reinterpret_cast<T*>(sStage);  // [64][kTcLdQ]
            T* const sKh = sQh + kRows * kTcLdQ;           // [64][kTcLdQ]
            const int g8 = lane >> 2, t4 = lane & 3;
            const int wr = (warp >> 1) * 16, wc = (warp & 1) * 32;
            float acc[4][4] = {};
            for (int d0 = 0; d0 < a.D; d0 += kTcDK) {
              __syncthreads();
              stage_tile<kRows, kTcDK, kThreads>(sQh, kTcLdQ, 1, rb * kRows, R, d0, a.D, [&](int rr, int dd) {
                return Q[q_off(rb * kRows + rr, d0 + dd)];
              });
              stage_tile<kKC, kTcDK, kThreads>(sKh, kTcLdQ, 1, ct, w, d0, a.D, [&](int cc, int dd) {
                return Kp[k_off(c0 + ct + cc, d0 + dd)];
              });
              __syncthreads();
#pragma unroll
              for (int kk = 0; kk < kTcDK; kk += 16) {
                uint32_t af[4];
                af[0] = ld_u32(sQh + (wr + g8) * kTcLdQ + kk + t4 * 2);
                af[1] = ld_u32(sQh + (wr + g8 + 8) * kTcLdQ + kk + t4 * 2);
                af[2] = ld_u32(sQh + (wr + g8) * kTcLdQ + kk + t4 * 2 + 8);
                af[3] = ld_u32(sQh + (wr + g8 + 8) * kTcLdQ + kk + t4 * 2 + 8);
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                  const T* kr = sKh + (wc + n * 8 + g8) * kTcLdQ + kk + t4 * 2;
                  mma16816<T>(acc[n][0], acc[n][1], acc[n][2], acc[n][3], af, ld_u32(kr), ld_u32(kr + 8));
                }
              }
            }
#pragma unroll
            for (int n = 0; n < 4; ++n) {
              const int r = rb * kRows + wr + g8, c = ct + wc + n * 8 + t4 * 2;
              put_score(r, c, c0, w, acc[n][0]);
              put_score(r, c + 1, c0, w, acc[n][1]);
              put_score(r + 8, c, c0, w, acc[n][2]);
              put_score(r + 8, c + 1, c0, w, acc[n][3]);
            }
          }
        }
      }
      __syncthreads();
    };

    // ------------------------------------------------------------ O += round(P).V over one chunk
    // Simple: thread (ty, tx) owns rows rbo*64 + ty*4 + i and columns j0 + s*64 + tx*4 + jj.
    // Tensor cores: warp w owns rows rbo*64 + 16*(w%4) .. +16 and columns j0 + 128*(w/4) + 8*n ..
    float o[64];
#pragma unroll
    for (int e = 0; e < 64; ++e) o[e] = 0.0f;

    auto pv_chunk = [&](int c0, int w) {
      if constexpr (!kTC) {
        float* const sV = sStage;  // [kVC][kD2Slice]
        const int tx = tid & 15, ty = tid >> 4;
        const int ns = (ncols + 63) / 64;
        for (int cc0 = 0; cc0 < w; cc0 += kVC) {
          __syncthreads();
          stage_tile<kVC, kD2Slice, kThreads>(sV, kD2Slice, 1, cc0, w, 0, ncols, [&](int vc, int jc) {
            return Elem<T>::load(V, v_off(c0 + cc0 + vc, j0 + jc));
          });
          __syncthreads();
          const int nv = min(kVC, w - cc0);
          for (int vc = 0; vc < nv; ++vc) {
            float p[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
              p[i] = Elem<T>::round(sS[(rbo * kRows + ty * 4 + i) * ld_s + kHalo + cc0 + vc]);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              if (s < ns) {
                const float4 vv = *reinterpret_cast<const float4*>(sV + vc * kD2Slice + s * 64 + tx * 4);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                  float* oo = o + (i * 4 + s) * 4;
                  oo[0] = fmaf(p[i], vv.x, oo[0]);
                  oo[1] = fmaf(p[i], vv.y, oo[1]);
                  oo[2] = fmaf(p[i], vv.z, oo[2]);
                  oo[3] = fmaf(p[i], vv.w, oo[3]);
                }
              }
            }
          }
        }
      } else {
        T* const sVt = reinterpret_cast<T*>(sStage);  // [kD2Slice][kTcLdV]: V chunk transposed
        const int g8 = lane >> 2, t4 = lane & 3;
        const int wr = rbo * kRows + (warp & 3) * 16, wc = (warp >> 2) * 128;
        const int nn = min(16, max(0, (ncols - wc + 7) / 8));  // n-tiles of this warp with columns
        for (int cc0 = 0; cc0 < w; cc0 += kTcVC) {
          __syncthreads();
          stage_tile<kTcVC, kD2Slice, kThreads>(sVt, 1, kTcLdV, cc0, w, 0, ncols, [&](int vc, int jc) {
            return V[v_off(c0 + cc0 + vc, j0 + jc)];
          });
          __syncthreads();
          const int nv = min(kTcVC, w - cc0);
          for (int kk = 0; kk < nv; kk += 16) {
            // A = round(P) of 16 rows x 16 columns; columns >= nv are beyond the chunk: P taken as 0
            // (the staged V rows there are 0 as well).
            const int cb = cc0 + kk + t4 * 2;
            auto pget = [&](int r, int c) -> float {
              return (c < w) ? sS[r * ld_s + kHalo + c] : 0.0f;
            };
            uint32_t af[4];
            af[0] = pack2<T>(pget(wr + g8, cb), pget(wr + g8, cb + 1));
            af[1] = pack2<T>(pget(wr + g8 + 8, cb), pget(wr + g8 + 8, cb + 1));
            af[2] = pack2<T>(pget(wr + g8, cb + 8), pget(wr + g8, cb + 9));
            af[3] = pack2<T>(pget(wr + g8 + 8, cb + 8), pget(wr + g8 + 8, cb + 9));
#pragma unroll
            for (int n = 0; n < 16; ++n) {
              if (n < nn) {
                const T* vr = sVt + (wc + n * 8 + g8) * kTcLdV + kk + t4 * 2;
                mma16816<T>(o[n * 4], o[n * 4 + 1], o[n * 4 + 2], o[n * 4 + 3], af, ld_u32(vr), ld_u32(vr + 8));
              }
            }
          }
        }
      }
      __syncthreads();
    };

    // ------------------------------------------------------------ selection of one chunk
    // Blocks k with M(k+1) in [c0, c0 + w) (the last chunk: every k >= its first) are scored here.
    auto select_chunk = [&](int c0, int w, bool last) {
      // §3.6 pairwise group sum over g, elementwise, in place: row i*G receives the sum of its G rows.
      for (int e = tid; e < ntok * w; e += kThreads) {
        const int i = e / w, x = e - (e / w) * w;
        float* const base = sS + (i * G) * ld_s + kHalo + x;
        int n = G;
        while (n > 1) {
          const int half = n >> 1;
          for (int q = 0; q < half; ++q) base[q * ld_s] = base[(2 * q) * ld_s] + base[(2 * q + 1) * ld_s];
          if (n & 1) base[half * ld_s] = base[(n - 1) * ld_s];
          n = half + (n & 1);
        }
      }
      __syncthreads();
      const int k_start = max(0, static_cast<int>(ceil_div(c0, M)) - 1);
      const int k_end = last ? bt.sel : min(bt.sel, max(0, static_cast<int>(ceil_div(c0 + w, M)) - 1));
      for (int i = warp; i < ntok; i += kWarps) {
        WarpTopK tk;
        tk.init(K, lane);
        tk.load(sTopV + i * K, sTopI + i * K);
        const float* const pg = sS + (i * G) * ld_s + kHalo - c0;  // pg[x], x in [c0 - kHalo, c0 + w)
        const uint8_t* const trow = a.tm != nullptr ? a.tm + static_cast<int64_t>(s0 + i) * a.tm0 : nullptr;
        for (int kb = k_start; kb < k_end; kb += 32) {
          const int k = kb + lane;
          const bool valid = k < k_end;
          float sc = 0.0f;
          if (valid) {
            const int xc = M * (k + 1);
            for (int tp = 0; tp < a.ntaps; ++tp) {
              const int x = xc - tp;
              if (x >= lo && x < hi) sc = fmaf(a.w[tp], pg[x], sc);
            }
            if (trow != nullptr && trow[static_cast<int64_t>(k) * a.tm1] != 0) sc = FLT_MAX;
          }
          tk.offer(valid, sc, k);
        }
        tk.save(sTopV + i * K, sTopI + i * K);
      }
      __syncthreads();
      if (!last) {  // keep Pg[c0 + w - kHalo, c0 + w) in front of the row for the next chunk (w = sw >= 64)
        for (int e = tid; e < ntok * kHalo; e += kThreads) {
          float* const row = sS + ((e / kHalo) * G) * ld_s;
          row[e % kHalo] = row[w + e % kHalo];
        }
      }
      __syncthreads();
    };

    // ------------------------------------------------------------ the three passes
    int cached = -1;  // chunk whose scores are in sS
    for (int pass = 0; pass < 3; ++pass) {
      const int nch = static_cast<int>(ceil_div(hi - lo, a.sw));
      for (int j = 0; j < nch; ++j) {
        const int c0 = lo + j * a.sw, w = min(a.sw, hi - c0);
        if (cached != j) {
          compute_scores(c0, w);
          cached = j;
        }
        if (pass == 0) {
          for (int r = warp; r < R; r += kWarps) {
            const float* row = sS + r * ld_s + kHalo;
            float m = -INFINITY;
            for (int c = lane; c < w; c += 32) m = fmaxf(m, row[c]);
            m = warp_max(m);
            if (lane == 0) sM[r] = fmaxf(sM[r], m);
          }
        } else if (pass == 1) {
          for (int r = warp; r < R; r += kWarps) {
            const float* row = sS + r * ld_s + kHalo;
            const float m = sM[r];
            float part = 0.0f;
            for (int c = lane; c < w; c += 32) part += expf(row[c] - m);
            part = warp_sum(part);
            if (lane == 0) sL[r] += part;
          }
        } else {
          for (int r = warp; r < R; r += kWarps) {
            float* row = sS + r * ld_s + kHalo;
            const float m = sM[r], l = sL[r];
            for (int c = lane; c < w; c += 32) row[c] = expf(row[c] - m) / l;
          }
          __syncthreads();
          pv_chunk(c0, w);
          if (do_sel) select_chunk(c0, w, j == nch - 1);
        }
        __syncthreads();
      }
      if (pass == 0 && partial) {
        // a row whose max is the mask value: widen to the whole row (see the header comment)
        for (int r = tid; r < R; r += kThreads)
          if (sM[r] == -FLT_MAX) sh_ext = 1;
        __syncthreads();
        if (sh_ext != 0) {
          lo = 0;
          hi = C;
          cached = -1;
        }
      }
      if (nch > 1) cached = -1;
    }

    // ------------------------------------------------------------ outputs
    T* const out = static_cast<T*>(a.out);
    auto out_off = [&](int r, int j) -> int64_t {
      const int i = r / G, g = r - (r / G) * G;
      return ((bt.q_begin + s0 + i) * a.N1 + static_cast<int64_t>(n2 * G + g)) * a.D2 + j;
    };
    if constexpr (!kTC) {
      const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = rbo * kRows + ty * 4 + i;
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int jc = s * 64 + tx * 4 + jj;
            if (r < R && jc < ncols) out[out_off(r, j0 + jc)] = Elem<T>::store(o[(i * 4 + s) * 4 + jj]);
          }
      }
    } else {
      const int g8 = lane >> 2, t4 = lane & 3;
      const int wr = rbo * kRows + (warp & 3) * 16, wc = (warp >> 2) * 128;
#pragma unroll
      for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = wr + g8 + (e >> 1) * 8, jc = wc + n * 8 + t4 * 2 + (e & 1);
          if (r < R && jc < ncols) out[out_off(r, j0 + jc)] = Elem<T>::store(o[n * 4 + e]);
        }
    }
    if (ds == 0) {  // §4 statistics of this row block, 8 copies each
      for (int e = tid; e < kRows * 8; e += kThreads) {
        const int r = rbo * kRows + e / 8;
        if (r < R) {
          const int i = r / G, g = r - (r / G) * G;
          const int64_t off = bt.stat_begin + (static_cast<int64_t>(n2 * G + g) * bt.sq + (s0 + i)) * 8 + e % 8;
          a.smax[off] = sM[r];
          a.ssum[off] = sL[r];
        }
      }
    }
    if (do_sel) {
      // blocks left of the window: every tap is a masked column with P = 0, so the score is 0 (or forced)
      const int k_lo = max(0, static_cast<int>(ceil_div(lo, M)) - 1);
      for (int i = warp; i < ntok; i += kWarps) {
        WarpTopK tk;
        tk.init(K, lane);
        tk.load(sTopV + i * K, sTopI + i * K);
        const uint8_t* const trow = a.tm != nullptr ? a.tm + static_cast<int64_t>(s0 + i) * a.tm0 : nullptr;
        for (int kb = 0; kb < k_lo; kb += 32) {
          const int k = kb + lane;
          const bool valid = k < k_lo;
          const float sc = (valid && trow != nullptr && trow[static_cast<int64_t>(k) * a.tm1] != 0) ? FLT_MAX : 0.0f;
          tk.offer(valid, sc, k);
        }
        if (lane < K) a.topk[((bt.q_begin + s0 + i) * a.N2 + n2) * static_cast<int64_t>(K) + lane] = tk.i;
      }
    }
  }
}

template <typename T, bool kTC>
Status launch(const FwdArgs& a, dim3 grid, size_t smem, cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(fwd_kernel<T, kTC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return cuda_error(e, "cudaFuncSetAttribute (forward)");
  void (*const kernel)(const FwdArgs) = fwd_kernel<T, kTC>;
  NSA_LAUNCH(kernel, grid, kThreads, smem, stream, a);
  e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error(e, "forward kernel launch");
  return Status::Ok();
}

// The forward of a call that run_cuda_call has validated and set up (the input part of a filled): the forward's own
// arguments, the tile shape and shared-memory plan, the batch table upload, then the kernel of the call's dtype.
Status run_forward(const CompressAttentionParams& p, const CompressAttentionShape& sh,
                   const std::vector<detail::BatchInfo>& batches, FwdArgs& a, cudaStream_t stream) {
  a.tm = p.topk_mask.data;
  a.tm0 = p.topk_mask.stride[0], a.tm1 = p.topk_mask.stride[1];
  a.out = p.attention_out;
  a.topk = p.topk_indices;
  a.smax = p.softmax_max;
  a.ssum = p.softmax_sum;
  a.M = static_cast<int>(sh.M);
  a.K = static_cast<int>(sh.K);
  const std::vector<int> w = detail::selection_weights(sh.M, sh.N);
  a.ntaps = static_cast<int>(w.size());  // <= 8 + 8 - 1
  for (int i = 0; i < a.ntaps; ++i) a.w[i] = static_cast<float>(w[static_cast<size_t>(i)]);

  // Tile shape: about 64 rows (tokens x G heads) per block; G > 64 takes one token per block.
  const int64_t G = sh.G;
  const int64_t bq = std::max<int64_t>(1, std::min<int64_t>(kRows / G, sh.max_sq));
  const int64_t rp = ceil_div(bq * G, kRows) * kRows;
  a.bq = static_cast<int>(bq);
  a.rp = static_cast<int>(rp);
  a.nds = static_cast<int>(ceil_div(sh.D2, kD2Slice));
  const bool tc = p.dtype != DType::kF32 && !env_simple();
  a.stage = tc ? kStageTc : kStageSimple;
  int optin = 0;
  Status st = device_smem_optin(&optin);
  if (!st.ok()) return st;
  if (tc) {
    int dev = 0, major = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
    if (major < 8) return Status::Error("the CUDA backend's tensor-core path needs sm_80 or newer; set NSA_CUDA_SIMPLE=1");
  }
  // Shared memory: score block rp x ld_s, staging, row statistics, top-K buffers (+ 1 KB for the static part).
  const int64_t fixed_bytes = 4 * (a.stage + 2 * rp + 2 * bq * sh.K) + 1024;
  const int64_t sw_max = ((optin - fixed_bytes) / (4 * rp) - kHalo - kRowPad) / kKC * kKC;
  if (sw_max < kKC)
    return Status::Error("the CUDA backend cannot hold the score block of G = " + std::to_string(G) +
                         " query heads per KV head in shared memory (" + std::to_string(optin) + " bytes per block)");
  const int64_t sw = std::min<int64_t>(sw_max, ceil_div(sh.max_c, kKC) * kKC);
  a.sw = static_cast<int>(sw);
  a.ld_s = static_cast<int>(kHalo + sw + kRowPad);
  const size_t smem = static_cast<size_t>(4 * (rp * a.ld_s) + fixed_bytes - 1024);

  // Per-batch bookkeeping and the tile list (prefix sums), uploaded once.
  std::vector<int64_t> tile_begin(batches.size() + 1, 0);
  for (size_t b = 0; b < batches.size(); ++b) tile_begin[b + 1] = tile_begin[b] + ceil_div(batches[b].sq, bq);
  const int64_t tiles = tile_begin.back();
  if (tiles == 0) return Status::Ok();
  if (tiles > INT_MAX) return Status::Error("the CUDA backend supports at most 2^31-1 query tiles");
  Scratch scratch(stream);
  void* unused = nullptr;
  if (!(st = upload_batch_table(scratch, stream, batches, {&tile_begin}, 0, &a.batches, &a.tile_begin, &unused)).ok())
    return st;

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(sh.N2, 65535)),
                  static_cast<unsigned>((rp / kRows) * a.nds));
  if (grid.z > 65535) return Status::Error("the CUDA backend supports at most 65535 (row block x D2 slice) blocks");
  return with_elem_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) return launch<T, false>(a, grid, smem, stream);  // no fp32 tensor cores
    else return tc ? launch<T, true>(a, grid, smem, stream) : launch<T, false>(a, grid, smem, stream);
  });
}

}  // namespace
}  // namespace cuda_detail

Status compress_attention_cuda(const CompressAttentionParams& p, void* stream) {
  return cuda_detail::run_cuda_call<cuda_detail::FwdArgs>(p, stream, cuda_detail::run_forward);
}

}  // namespace nsa
