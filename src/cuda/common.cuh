// Shared pieces of the CUDA backend: element types (the only place where bf16/fp16 <-> fp32 conversions
// happen on the device, round to nearest even), the §3.8 order, warp reductions, the warp top-K buffer,
// per-batch bookkeeping uploaded to the device, and host helpers (errors, stream-ordered scratch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "nsa/compress_attention.h"

// Seams for the CPU emulation of the tests (tests/cuda/emu defines these first; nvcc builds use the defaults).
#ifndef NSA_LAUNCH
#define NSA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
#ifndef NSA_DYNAMIC_SHARED
#define NSA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace nsa::cuda_detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------ element types
// load(): element -> float (exact). store(): float -> element (round to nearest even). round(): the
// "cast(P)" of §3.4, a float rounded to the element type and back (identity for fp32).
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float round(float x) { return __half2float(__float2half_rn(x)); }
};

template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ float store(float x) { return x; }
  static __device__ __forceinline__ float round(float x) { return x; }
};

// ------------------------------------------------------------------------------------ shared-memory staging
// Stages a [kRows x kCols] tile into shared memory, block-wide (kThreads threads; no barrier). Tile element (r, c) is
// element (r0 + r, c0 + c) of a source of n_rows x n_cols elements: it is written at dst[r * ld_r + c * ld_c]
// (ld_c = 1: row-major, ld_r = 1: transposed; strides in Dst elements) as load(r, c) when r0 + r < n_rows and
// c0 + c < n_cols, as zero otherwise. Thread t writes the elements e = t, t + kThreads, ... of the row-major order
// (r = e / kCols, c = e % kCols), so consecutive threads load consecutive columns c of a source row, its contiguous
// dimension (coalesced). Dst: float (load converts the element) or the 16-bit element type itself (load copies it).
template <int kRows, int kCols, int kThreads, typename Dst, typename Load>
__device__ __forceinline__ void stage_tile(Dst* dst, int ld_r, int ld_c, int r0, int n_rows, int c0, int n_cols,
                                           Load load) {
  for (int e = static_cast<int>(threadIdx.x); e < kRows * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    dst[r * ld_r + c * ld_c] = (r0 + r < n_rows && c0 + c < n_cols) ? load(r, c) : Elem<Dst>::store(0.0f);
  }
}

// ------------------------------------------------------------------------------------ §3.8 order
// detail::topk_before (src/common/topk_order.h) on the device: higher score first, equal scores by smaller index,
// NaN below every number. A strict total order on (score, index) pairs with distinct indices, so the K best of a set
// do not depend on the order in which candidates are offered.
__device__ __forceinline__ bool topk_before(float sa, int ia, float sb, int ib) {
  const bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// The K best candidates so far, sorted by topk_before, held by a warp: lane j < K holds entry j.
// Initial entries (NaN, INT_MAX) rank below every real candidate (K <= Sel_b, so all are replaced).
// offer(): every lane may bring one candidate (valid); warp-uniform call.
struct WarpTopK {
  float v;
  int i;
  int K;
  int lane;

  __device__ void init(int k, int ln) {
    K = k;
    lane = ln;
    v = __int_as_float(0x7fc00000);  // NaN
    i = INT_MAX;
  }
  __device__ void load(const float* sv, const int* si) {
    if (lane < K) {
      v = sv[lane];
      i = si[lane];
    }
  }
  __device__ void save(float* sv, int* si) const {
    if (lane < K) {
      sv[lane] = v;
      si[lane] = i;
    }
  }
  __device__ void offer(bool valid, float cv, int ci) {
    const float kv = __shfl_sync(kFullMask, v, K - 1);
    const int ki = __shfl_sync(kFullMask, i, K - 1);
    unsigned beats = __ballot_sync(kFullMask, valid && topk_before(cv, ci, kv, ki));
    while (beats) {  // warp-uniform
      const int src = __ffs(beats) - 1;
      beats &= beats - 1;
      const float nv = __shfl_sync(kFullMask, cv, src);
      const int ni = __shfl_sync(kFullMask, ci, src);
      // entries that stay ahead of the newcomer are exactly lanes [0, pos) (the buffer is sorted)
      const bool stay = lane < K && topk_before(v, i, nv, ni);
      const int pos = __popc(__ballot_sync(kFullMask, stay));
      const float uv = __shfl_up_sync(kFullMask, v, 1);
      const int ui = __shfl_up_sync(kFullMask, i, 1);
      if (lane < K) {
        if (lane > pos) {
          v = uv;
          i = ui;
        } else if (lane == pos) {
          v = nv;
          i = ni;
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------ warp reductions
// Fixed butterfly order: the result is the same on every lane and from run to run.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ int warp_min_i(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ int warp_max_i(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// ------------------------------------------------------------------------------------ batches
// One batch as the kernels see it (§2 prefix sums turned into begin/length pairs; §4 statistics start).
struct DevBatch {
  int64_t q_begin;     // first query row (in T)
  int64_t c_begin;     // first key/value row (in T2)
  int64_t stat_begin;  // first float of the batch's statistics: 8 * N1 * q_begin
  int sq;              // Sq_b
  int c;               // C_b (>= 1)
  int sel;             // Sel_b = ceil(C_b / M)
};

// Index of the work unit `unit` in a list of per-batch unit counts given as prefix sums begin[0..B]
// (begin[0] = 0, begin[B] = total): the batch b with begin[b] <= unit < begin[b+1]. Batches without
// units (begin[b] == begin[b+1]) are never returned.
__device__ __forceinline__ int find_batch(const int64_t* begin, int B, int64_t unit) {
  int lo = 0, hi = B;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (begin[mid] <= unit) lo = mid;
    else hi = mid;
  }
  return lo;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------ host helpers
Status cuda_error(cudaError_t e, const char* what);

// The element type of a call as a type tag: run(ElemTag<T>{}) with T = __nv_bfloat16, __half or float for dtype
// bfloat16, float16, float32 (the types the kernels are instantiated for); an error for any other dtype.
template <typename T>
struct ElemTag {
  using type = T;
};
template <typename Run>
Status with_elem_type(DType dtype, Run run) {
  switch (dtype) {
    case DType::kBF16: return run(ElemTag<__nv_bfloat16>{});
    case DType::kF16: return run(ElemTag<__half>{});
    case DType::kF32: return run(ElemTag<float>{});
    default: break;
  }
  return Status::Error("dtype not supported by the CUDA backend");
}

// Device memory for the duration of one call, stream-ordered (cudaMallocAsync / cudaFreeAsync on the
// call's stream); falls back to cudaMalloc + synchronize + cudaFree on devices without memory pools.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // Allocates `bytes` (>= 1); returns an error Status on failure.
  Status alloc(size_t bytes, void** out);

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
  int pools_ = -1;
};

// Shared memory a block may use on the current device (opt-in limit).
Status device_smem_optin(int* bytes);

// NSA_CUDA_SIMPLE=1: plain CUDA-core kernels only.
bool env_simple();

}  // namespace nsa::cuda_detail
