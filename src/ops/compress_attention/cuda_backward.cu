// CUDA backward of §7, deterministic without atomics: three kernels on the caller's stream.
//
//   1. dlt_kernel:  Dlt[t][h] = sum_j dO[t,h,j] * O[t,h,j] (fp32; O = attention_out as returned), one warp
//                   per (t, h), into a T x N1 scratch buffer.
//   2. dkdv_kernel: one block per (key tile of 32 compressed tokens, KV head n2, column slice z). It walks
//                   the query rows of the batch (u = s*G + g, the G heads of the group stacked token-major)
//                   in tiles of 64, in ascending order, and for each tile recomputes
//                     S  = Q K^T (fp32 dot products) * scale, masked entries replaced by -FLT_MAX (§3.2),
//                     P  = exp(S - m) / l_sum with the saved statistics (§4 layout),
//                     dP = dO V^T,  dS = P (dP - Dlt), and dS = 0 where atten_mask removes the entry,
//                   then accumulates dV += P^T dO and dK += dS^T Q in registers. dK is scaled once at the
//                   end (dK = scale * sum dS q, as the reference). A batch without queries writes zeros.
//   3. dq_kernel:   one block per (tile of 64 query rows, n2, column slice z); walks the key tiles of the
//                   rows' visible window in ascending order: dQ += dS K, scaled once at the end.
// S, P, dP and dS of a (row tile, key tile) pair are computed by the same device function in both
// kernels. P and dS stay fp32 (not rounded to the dtype; §7 allows either, the reference does the same).
//
// Masks. Masked entries have dS = 0 (the replaced score is a constant: §7), so a fully masked row (§5)
// gives zero dQ and nothing to dK, while its P = exp(-FLT_MAX - m) / l = 1 / C_b (m = -FLT_MAX saved by
// the forward) gives dV its uniform share. A (row tile, key tile) pair is skipped when none of its entries
// is visible and, for dK/dV, no row of the tile has m == -FLT_MAX (only such rows give masked entries a
// non-zero P); skipping then drops exact zeros only.
//
// Columns of the outputs: a block of slice z owns dK columns [256z, 256z+256) and dV columns of the same
// range (dQ: dQ columns), so D and D2 up to 256 take one slice; larger heads take more blocks, each
// recomputing S and dP. Key/value rows past actual_cmp_seq_kvlen[B-1] are zeroed with cudaMemsetAsync.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
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
constexpr int kRT = 64;       // query rows of a row tile
constexpr int kKT = 32;       // key rows of a key tile
constexpr int kDK = 32;       // reduction slice of S and dP
constexpr int kLdR = 68;      // stride (floats) of transposed row-tile slices [.][64 rows]
constexpr int kLdK = 36;      // stride (floats) of transposed key-tile slices [.][32 keys]
constexpr int kSlice = 256;   // output columns of one block
constexpr int kUC = 16;       // query rows staged per step of the dV / dK products

// acc[0..3] += c * (x.x, x.y, x.z, x.w): one fp32 fused multiply-add per component (a thread's four adjacent
// output columns of a register accumulator).
__device__ __forceinline__ void fma4(float c, const float4& x, float* acc) {
  acc[0] = fmaf(c, x.x, acc[0]);
  acc[1] = fmaf(c, x.y, acc[1]);
  acc[2] = fmaf(c, x.z, acc[2]);
  acc[3] = fmaf(c, x.w, acc[3]);
}

// The inputs (QkvArgs: q, k, v, atten_mask, sizes, scale) and the backward's own arguments.
struct BwdArgs : QkvArgs {
  const void* o;
  const void* go;
  int64_t os0, os1, os2, gs0, gs1, gs2;
  const float* smax;
  const float* ssum;
  float* dlt;  // [T][N1]
  void* dq;
  void* dk;
  void* dv;
  const DevBatch* batches;
  const int64_t* unit_begin;  // [B + 1] prefix sums of the units (key tiles or row tiles) of each batch
  int64_t T;
};

// ------------------------------------------------------------------------------------ Dlt
template <typename T>
__global__ void __launch_bounds__(kThreads) dlt_kernel(const BwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pair >= a.T * a.N1) return;  // warp-uniform
  const int64_t t = pair / a.N1, h = pair % a.N1;
  const T* go = static_cast<const T*>(a.go);
  const T* o = static_cast<const T*>(a.o);
  float part = 0.0f;
  for (int j = lane; j < a.D2; j += 32)
    part = fmaf(Elem<T>::load(go, t * a.gs0 + h * a.gs1 + j * a.gs2), Elem<T>::load(o, t * a.os0 + h * a.os1 + j * a.os2),
                part);
  part = warp_sum(part);
  if (lane == 0) a.dlt[pair] = part;
}

// ------------------------------------------------------------------------------------ tile pair
// Rows of a row tile: u = u0 + r (r < 64), token s = u / G, head h = n2*G + u % G; active when u < nrows.
// Keys of a key tile: c = kc0 + cc (cc < 32, batch-local), active when cc < nkc.
struct Pair {
  DevBatch bt;
  int n2, u0, nrows, kc0, nkc;
};

__device__ __forceinline__ int64_t row_off(const BwdArgs& a, const Pair& pr, int r, int64_t s0, int64_t s1, int64_t s2,
                                           int j) {
  const int u = pr.u0 + r, s = u / a.G, g = u - (u / a.G) * a.G;
  return (pr.bt.q_begin + s) * s0 + static_cast<int64_t>(pr.n2 * a.G + g) * s1 + static_cast<int64_t>(j) * s2;
}

__device__ __forceinline__ bool is_masked(const BwdArgs& a, const Pair& pr, int r, int cc) {
  const int s = (pr.u0 + r) / a.G;
  return a.am != nullptr && a.am[static_cast<int64_t>(s) * a.am0 + static_cast<int64_t>(pr.kc0 + cc) * a.am1] != 0;
}

// Per-row data of a row tile into sMr / sLr / sDr: saved m, l_sum (§4 layout) and Dlt.
__device__ void load_row_stats(const BwdArgs& a, const Pair& pr, float* sMr, float* sLr, float* sDr) {
  for (int r = threadIdx.x; r < kRT; r += kThreads) {
    const int u = pr.u0 + r;
    float m = 0.0f, l = 1.0f, d = 0.0f;
    if (u < pr.nrows) {
      const int s = u / a.G, g = u - (u / a.G) * a.G, h = pr.n2 * a.G + g;
      const int64_t so = pr.bt.stat_begin + (static_cast<int64_t>(h) * pr.bt.sq + s) * 8;
      m = a.smax[so];
      l = a.ssum[so];
      d = a.dlt[(pr.bt.q_begin + s) * a.N1 + h];
    }
    sMr[r] = m;
    sLr[r] = l;
    sDr[r] = d;
  }
}

// Whether some entry of the pair is visible (block-wide; ends with a barrier). With `stats`, rows whose saved
// max is -FLT_MAX count as visible too (their masked entries have P = 1/l_sum != 0).
__device__ bool pair_needed(const BwdArgs& a, const Pair& pr, const float* sMr, bool stats) {
  bool need = false;
  if (a.am == nullptr) {
    need = pr.nrows > pr.u0 && pr.nkc > 0;
  } else {
    const int last_u = min(pr.nrows, pr.u0 + kRT) - 1;
    if (last_u >= pr.u0) {
      const int sf = pr.u0 / a.G, sl = last_u / a.G;
      for (int e = threadIdx.x; e < (sl - sf + 1) * kKT && !need; e += kThreads) {
        const int s = sf + e / kKT, cc = e % kKT;
        if (cc < pr.nkc && a.am[static_cast<int64_t>(s) * a.am0 + static_cast<int64_t>(pr.kc0 + cc) * a.am1] == 0)
          need = true;
      }
      if (stats)
        for (int r = threadIdx.x; r < kRT; r += kThreads)
          if (pr.u0 + r < pr.nrows && sMr[r] == -FLT_MAX) need = true;
    }
  }
  return __syncthreads_or(need) != 0;
}

// P and dS of the pair into sP (when not null) and sDS, element (r, cc) at r * ldr + cc * ldc, zero outside
// the active rows and keys. Thread (ty = tid/8, tx = tid%8) computes rows 2ty, 2ty+1 and keys 4tx .. 4tx+3.
// stage: kDK * (kLdR + kLdK) floats (rows of Q or dO, then rows of K or V, both transposed).
template <typename T>
__device__ void pair_p_ds(const BwdArgs& a, const Pair& pr, float* stage, const float* sMr, const float* sLr,
                          const float* sDr, float* sP, float* sDS, int ldr, int ldc) {
  const int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7;
  float* const sAt = stage;                // [kDK][kLdR] rows of Q or dO, transposed
  float* const sBt = stage + kDK * kLdR;   // [kDK][kLdK] rows of K or V, transposed
  float accS[2][4] = {}, accP[2][4] = {};
  const T* const Q = static_cast<const T*>(a.q);
  const T* const Kp = static_cast<const T*>(a.k);
  const T* const V = static_cast<const T*>(a.v);
  const T* const GO = static_cast<const T*>(a.go);
  for (int which = 0; which < 2; ++which) {  // 0: S = Q K^T over D; 1: dP = dO V^T over D2
    const int len = which == 0 ? a.D : a.D2;
    for (int d0 = 0; d0 < len; d0 += kDK) {
      __syncthreads();
      stage_tile<kRT, kDK, kThreads>(sAt, 1, kLdR, pr.u0, pr.nrows, d0, len, [&](int r, int dd) {
        return which == 0 ? Elem<T>::load(Q, row_off(a, pr, r, a.qs0, a.qs1, a.qs2, d0 + dd))
                          : Elem<T>::load(GO, row_off(a, pr, r, a.gs0, a.gs1, a.gs2, d0 + dd));
      });
      stage_tile<kKT, kDK, kThreads>(sBt, 1, kLdK, 0, pr.nkc, d0, len, [&](int cc, int dd) {
        const int64_t row = pr.bt.c_begin + pr.kc0 + cc;
        return which == 0 ? Elem<T>::load(Kp, kv_off(row, pr.n2, d0 + dd, a.ks0, a.ks1, a.ks2))
                          : Elem<T>::load(V, kv_off(row, pr.n2, d0 + dd, a.vs0, a.vs1, a.vs2));
      });
      __syncthreads();
#pragma unroll 8
      for (int dd = 0; dd < kDK; ++dd) {
        const float2 av = *reinterpret_cast<const float2*>(sAt + dd * kLdR + ty * 2);
        const float4 bv = *reinterpret_cast<const float4*>(sBt + dd * kLdK + tx * 4);
        const float ar[2] = {av.x, av.y}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (which == 0) accS[i][j] = fmaf(ar[i], br[j], accS[i][j]);
            else accP[i][j] = fmaf(ar[i], br[j], accP[i][j]);
          }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = ty * 2 + i, cc = tx * 4 + j;
      float P = 0.0f, dS = 0.0f;
      if (pr.u0 + r < pr.nrows && cc < pr.nkc) {
        const bool msk = is_masked(a, pr, r, cc);
        const float S = msk ? -FLT_MAX : __fmul_rn(accS[i][j], a.scale);
        P = expf(S - sMr[r]) / sLr[r];
        dS = msk ? 0.0f : P * (accP[i][j] - sDr[r]);
      }
      if (sP != nullptr) sP[r * ldr + cc * ldc] = P;
      sDS[r * ldr + cc * ldc] = dS;
    }
  __syncthreads();
}

// ------------------------------------------------------------------------------------ dK, dV
template <typename T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BwdArgs a) {
  __shared__ __align__(16) float sStage[kUC * kSlice];  // >= kDK * (kLdR + kLdK): pair staging / row staging
  __shared__ __align__(16) float sPt[kKT * kLdR];       // P^T  [key][row]
  __shared__ __align__(16) float sDSt[kKT * kLdR];      // dS^T [key][row]
  __shared__ float sMr[kRT], sLr[kRT], sDr[kRT];
  static_assert(kUC * kSlice >= kDK * (kLdR + kLdK), "staging area too small");

  const int tid = threadIdx.x;
  const int64_t unit = blockIdx.x;
  const int b = find_batch(a.unit_begin, a.B, unit);
  Pair pr;
  pr.bt = a.batches[b];
  pr.kc0 = static_cast<int>(unit - a.unit_begin[b]) * kKT;
  pr.nkc = min(kKT, pr.bt.c - pr.kc0);
  pr.nrows = pr.bt.sq * a.G;
  const int jz = static_cast<int>(blockIdx.z) * kSlice;
  const int nck = max(0, min(kSlice, a.D - jz)), ncv = max(0, min(kSlice, a.D2 - jz));
  // thread owns key cc = tid / 8 and columns jz + s*32 + jj*4 + e (s < 8, e < 4)
  const int cc = tid >> 3, jj = tid & 7;
  const T* const Q = static_cast<const T*>(a.q);
  const T* const GO = static_cast<const T*>(a.go);

  // acc[s*4 + e] += sum over the tile's rows u of coef[key cc][u] * X[u][jz + s*32 + jj*4 + e], X = dO or Q
  auto accumulate = [&](float (&acc)[32], const float* coef_t, bool x_is_dout, int ncol) {
    if (ncol == 0) return;  // block-uniform
    for (int uc = 0; uc < kRT; uc += kUC) {
      __syncthreads();
      stage_tile<kUC, kSlice, kThreads>(sStage, kSlice, 1, pr.u0 + uc, pr.nrows, 0, ncol, [&](int uu, int jc) {
        return x_is_dout ? Elem<T>::load(GO, row_off(a, pr, uc + uu, a.gs0, a.gs1, a.gs2, jz + jc))
                         : Elem<T>::load(Q, row_off(a, pr, uc + uu, a.qs0, a.qs1, a.qs2, jz + jc));
      });
      __syncthreads();
      const float* coef = coef_t + cc * kLdR + uc;
#pragma unroll 4
      for (int uu = 0; uu < kUC; ++uu) {
        const float p = coef[uu];
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          if (s * 32 < ncol)
            fma4(p, *reinterpret_cast<const float4*>(sStage + uu * kSlice + s * 32 + jj * 4), acc + s * 4);
        }
      }
    }
  };

  for (int n2 = blockIdx.y; n2 < a.N2; n2 += gridDim.y) {
    pr.n2 = n2;
    float accK[32], accV[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) accK[e] = accV[e] = 0.0f;
    for (int u0 = 0; u0 < pr.nrows; u0 += kRT) {
      pr.u0 = u0;
      __syncthreads();
      load_row_stats(a, pr, sMr, sLr, sDr);
      __syncthreads();
      if (!pair_needed(a, pr, sMr, true)) continue;
      pair_p_ds<T>(a, pr, sStage, sMr, sLr, sDr, sPt, sDSt, 1, kLdR);
      accumulate(accV, sPt, true, ncv);    // dV += P^T dO
      accumulate(accK, sDSt, false, nck);  // dK += dS^T Q
    }
    // one writer per element: key row c_begin + kc0 + cc, columns of this slice
    if (cc < pr.nkc) {
      const int64_t row = (pr.bt.c_begin + pr.kc0 + cc) * a.N2 + n2;
      T* const dk = static_cast<T*>(a.dk);
      T* const dv = static_cast<T*>(a.dv);
#pragma unroll
      for (int s = 0; s < 8; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jc = s * 32 + jj * 4 + e;
          if (jc < nck) dk[row * a.D + jz + jc] = Elem<T>::store(__fmul_rn(a.scale, accK[s * 4 + e]));
          if (jc < ncv) dv[row * a.D2 + jz + jc] = Elem<T>::store(accV[s * 4 + e]);
        }
    }
  }
}

// ------------------------------------------------------------------------------------ dQ
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BwdArgs a) {
  __shared__ __align__(16) float sK[kKT * kSlice];  // K rows of the key tile (this slice); also pair staging
  __shared__ __align__(16) float sDS[kRT * kLdK];   // dS [row][key]
  __shared__ float sMr[kRT], sLr[kRT], sDr[kRT];
  __shared__ int sh_lo, sh_hi;
  static_assert(kKT * kSlice >= kDK * (kLdR + kLdK), "staging area too small");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t unit = blockIdx.x;
  const int b = find_batch(a.unit_begin, a.B, unit);
  Pair pr;
  pr.bt = a.batches[b];
  pr.u0 = static_cast<int>(unit - a.unit_begin[b]) * kRT;
  pr.nrows = pr.bt.sq * a.G;
  const int C = pr.bt.c;
  const int jz = static_cast<int>(blockIdx.z) * kSlice;
  const int ncq = min(kSlice, a.D - jz);
  // thread owns row r = tid / 4 and columns jz + s*16 + jj*4 + e (s < 16, e < 4)
  const int r = tid >> 2, jj = tid & 3;
  const T* const Kp = static_cast<const T*>(a.k);
  const int last_u = min(pr.nrows, pr.u0 + kRT) - 1;
  const int sf = pr.u0 / a.G, sl = last_u / a.G;

  for (int n2 = blockIdx.y; n2 < a.N2; n2 += gridDim.y) {
    pr.n2 = n2;
    __syncthreads();
    // window: union of the visible columns of the tile's tokens (fully masked rows add nothing: dS = 0)
    if (tid == 0) {
      sh_lo = C;
      sh_hi = 0;
    }
    __syncthreads();
    if (a.am == nullptr) {
      if (tid == 0) {
        sh_lo = 0;
        sh_hi = C;
      }
    } else {
      for (int s = sf + warp; s <= sl; s += kWarps) {
        int first, last;
        mask_row_window(a, s, C, lane, &first, &last);
        if (lane == 0 && last >= 0) {
          atomicMin(&sh_lo, first);
          atomicMax(&sh_hi, last + 1);
        }
      }
    }
    load_row_stats(a, pr, sMr, sLr, sDr);
    __syncthreads();
    const int lo = sh_lo, hi = sh_hi;

    float acc[64];
#pragma unroll
    for (int e = 0; e < 64; ++e) acc[e] = 0.0f;
    for (int kc0 = lo; kc0 < hi; kc0 += kKT) {
      pr.kc0 = kc0;
      pr.nkc = min(kKT, hi - kc0);  // columns past hi are masked for every row that has a visible column
      if (!pair_needed(a, pr, sMr, false)) continue;
      pair_p_ds<T>(a, pr, sK, sMr, sLr, sDr, nullptr, sDS, kLdK, 1);
      stage_tile<kKT, kSlice, kThreads>(sK, kSlice, 1, 0, pr.nkc, 0, ncq, [&](int c, int jc) {
        return Elem<T>::load(Kp, kv_off(pr.bt.c_begin + kc0 + c, n2, jz + jc, a.ks0, a.ks1, a.ks2));
      });
      __syncthreads();
      const int nk = pr.nkc;
      for (int c = 0; c < nk; ++c) {
        const float ds = sDS[r * kLdK + c];
#pragma unroll
        for (int s = 0; s < 16; ++s) {
          if (s * 16 < ncq) fma4(ds, *reinterpret_cast<const float4*>(sK + c * kSlice + s * 16 + jj * 4), acc + s * 4);
        }
      }
      __syncthreads();
    }
    if (pr.u0 + r < pr.nrows) {
      T* const dq = static_cast<T*>(a.dq);
      const int64_t base = row_off(a, pr, r, a.N1 * static_cast<int64_t>(a.D), a.D, 1, jz);
#pragma unroll
      for (int s = 0; s < 16; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jc = s * 16 + jj * 4 + e;
          if (jc < ncq) dq[base + jc] = Elem<T>::store(__fmul_rn(a.scale, acc[s * 4 + e]));
        }
    }
  }
}

template <typename T>
Status launch_all(const BwdArgs& base, int64_t T_, int64_t N2, int64_t D, int64_t D2, const int64_t* kv_units,
                  int64_t n_kv, const int64_t* q_units, int64_t n_q, cudaStream_t stream) {
  cudaError_t e;
  BwdArgs a = base;
  const unsigned gy = static_cast<unsigned>(std::min<int64_t>(N2, 65535));
  const int64_t dlt_blocks = ceil_div(T_ * a.N1, kWarps);
  if (dlt_blocks > INT_MAX) return Status::Error("the CUDA backward supports at most 2^31-1 blocks of T x N1 rows");
  NSA_LAUNCH(dlt_kernel<T>, static_cast<unsigned>(dlt_blocks), kThreads, 0, stream, a);
  if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error(e, "backward Dlt kernel launch");
  if (n_kv > 0) {
    a.unit_begin = kv_units;
    const unsigned gz = static_cast<unsigned>(ceil_div(std::max(D, D2), kSlice));
    NSA_LAUNCH(dkdv_kernel<T>, dim3(static_cast<unsigned>(n_kv), gy, gz), kThreads, 0, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error(e, "backward dK/dV kernel launch");
  }
  if (n_q > 0) {
    a.unit_begin = q_units;
    const unsigned gz = static_cast<unsigned>(ceil_div(D, kSlice));
    NSA_LAUNCH(dq_kernel<T>, dim3(static_cast<unsigned>(n_q), gy, gz), kThreads, 0, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error(e, "backward dQ kernel launch");
  }
  return Status::Ok();
}

// The backward of a call that run_cuda_call has validated and set up (the input part of a filled): the backward's
// own arguments, the batch table with the key-tile and row-tile prefix sums and the Dlt buffer, the zeroed key/value
// tail, then the three kernels of the call's dtype.
Status run_backward(const CompressAttentionGradParams& p, const CompressAttentionShape& sh,
                    const std::vector<detail::BatchInfo>& batches, BwdArgs& a, cudaStream_t stream) {
  const CompressAttentionParams& f = p.fwd;
  a.o = p.attention_out.data;
  a.go = p.grad_out.data;
  a.os0 = p.attention_out.stride[0], a.os1 = p.attention_out.stride[1], a.os2 = p.attention_out.stride[2];
  a.gs0 = p.grad_out.stride[0], a.gs1 = p.grad_out.stride[1], a.gs2 = p.grad_out.stride[2];
  a.smax = p.softmax_max;
  a.ssum = p.softmax_sum;
  a.dq = p.grad_query;
  a.dk = p.grad_key;
  a.dv = p.grad_value;
  a.T = sh.T;

  // batch table, key-tile and row-tile prefix sums
  const size_t B = batches.size();
  std::vector<int64_t> kv_units(B + 1, 0), q_units(B + 1, 0);
  for (size_t b = 0; b < B; ++b) {
    kv_units[b + 1] = kv_units[b] + ceil_div(batches[b].c, kKT);
    q_units[b + 1] = q_units[b] + ceil_div(batches[b].sq * sh.G, kRT);
  }
  if (kv_units.back() > INT_MAX || q_units.back() > INT_MAX)
    return Status::Error("the CUDA backward supports at most 2^31-1 key or query tiles");
  const size_t dlt_bytes = static_cast<size_t>(sh.T * sh.N1) * sizeof(float);
  Scratch scratch(stream);
  const int64_t* units_dev[2] = {nullptr, nullptr};
  void* dlt_dev = nullptr;
  const Status st = upload_batch_table(scratch, stream, batches, {&kv_units, &q_units}, dlt_bytes, &a.batches,
                                       units_dev, &dlt_dev);
  if (!st.ok()) return st;
  const int64_t* kv_dev = units_dev[0];
  const int64_t* q_dev = units_dev[1];
  a.dlt = static_cast<float*>(dlt_dev);

  // key/value rows past the last prefix sum: zeros (§7)
  const int64_t c_end = f.actual_cmp_seq_kvlen.data[sh.B - 1];
  const size_t es = dtype_size(f.dtype);
  if (c_end < sh.T2) {
    cudaError_t e =
        cudaMemsetAsync(static_cast<char*>(p.grad_key) + static_cast<size_t>(c_end * sh.N2 * sh.D) * es, 0,
                        static_cast<size_t>((sh.T2 - c_end) * sh.N2 * sh.D) * es, stream);
    if (e == cudaSuccess)
      e = cudaMemsetAsync(static_cast<char*>(p.grad_value) + static_cast<size_t>(c_end * sh.N2 * sh.D2) * es, 0,
                          static_cast<size_t>((sh.T2 - c_end) * sh.N2 * sh.D2) * es, stream);
    if (e != cudaSuccess) return cuda_error(e, "cudaMemsetAsync (grad_key/grad_value tail)");
  }
  return with_elem_type(f.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_all<T>(a, sh.T, sh.N2, sh.D, sh.D2, kv_dev, kv_units.back(), q_dev, q_units.back(), stream);
  });
}

}  // namespace
}  // namespace cuda_detail

Status compress_attention_backward_cuda(const CompressAttentionGradParams& p, void* stream) {
  return cuda_detail::run_cuda_call<cuda_detail::BwdArgs>(p, stream, cuda_detail::run_backward);
}

}  // namespace nsa
