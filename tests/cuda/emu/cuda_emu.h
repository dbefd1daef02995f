// A CPU emulation of the part of the CUDA programming model that src/cuda uses, so that the tests can run the
// backend's real kernel source on a machine without a GPU (tests/cuda/emu/CMakeLists.txt compiles src/cuda/*.cu
// as C++ against this header, which stands in for cuda_runtime.h, cuda_bf16.h and cuda_fp16.h).
//
// Model. Blocks run one after another; the threads of a block are cooperative fibers (ucontext) on one OS
// thread, switched only at __syncthreads, __syncthreads_or and warp operations (shuffles, ballots, mma), which
// therefore behave as barriers of the block or of the warp. A barrier nobody can complete (divergent barrier,
// lanes of a warp missing a shuffle) aborts with a message. __shared__ variables are statics (one block at a
// time); dynamic shared memory is a fresh buffer per block filled with 0xFF bytes (NaN), so reading what was
// never written shows. Device memory is host memory. cudaFuncSetAttribute and launches check the dynamic
// shared memory against the emulated opt-in limit (NSA_EMU_SMEM_OPTIN, default 232448 bytes = H100), and the
// grid against the CUDA limits. mma.sync m16n8k16 (bf16/fp16, fp32 accumulate) is emulated from the fragment
// layouts documented in the PTX ISA (A: row-major 16x16, B: 16x8, C/D: 16x8; groupID = lane/4, tig = lane%4).
//
// What it cannot show: timing, races between real threads (fibers switch only at barriers, so a missing
// __syncthreads between a write and another thread's read is NOT caught), the exact rounding of the hardware's
// expf and of the tensor cores' internal accumulation.
#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/numeric.h"

#define NSA_CUDA_EMULATE 1

// ------------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ------------------------------------------------------------------------------------ 16-bit types
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};
inline float __bfloat162float(__nv_bfloat16 v) { return nsa::detail::bf16_to_f32(v.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{nsa::detail::f32_to_bf16(x)}; }
inline float __half2float(__half v) { return nsa::detail::f16_to_f32(v.bits); }
inline __half __float2half_rn(float x) { return __half{nsa::detail::f32_to_f16(x)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }

// ------------------------------------------------------------------------------------ device builtins
namespace nsa_emu {
void syncthreads();
int syncthreads_or(int pred);
// Warp-collective: every lane passes its value and receives the value of lane `src` (its own if src is
// outside [0, 32)).
uint64_t warp_exchange(uint64_t v, int src);
unsigned warp_ballot(bool pred);
void mma16816(bool bf16, float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void* dynamic_smem();
[[noreturn]] void trap(const char* what);

template <typename T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  u = warp_exchange(u, src);
  T r;
  std::memcpy(&r, &u, sizeof(T));
  return r;
}
inline int lane_id() { return static_cast<int>(threadIdx.x & 31u); }
}  // namespace nsa_emu

inline void __syncthreads() { nsa_emu::syncthreads(); }
inline int __syncthreads_or(int p) { return nsa_emu::syncthreads_or(p); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return nsa_emu::shfl(v, src & 31);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return nsa_emu::shfl(v, nsa_emu::lane_id() ^ m);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  return nsa_emu::shfl(v, nsa_emu::lane_id() - static_cast<int>(d));  // out of range: own value
}
inline unsigned __ballot_sync(unsigned, int p) { return nsa_emu::warp_ballot(p != 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
[[noreturn]] inline void __trap() { nsa_emu::trap("__trap()"); }
inline int atomicMin(int* p, int v) {  // fibers switch only at barriers: plain code is atomic
  const int o = *p;
  *p = o < v ? o : v;
  return o;
}
inline int atomicMax(int* p, int v) {
  const int o = *p;
  *p = o > v ? o : v;
  return o;
}
inline int atomicOr(int* p, int v) {
  const int o = *p;
  *p = o | v;
  return o;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
using std::isnan;

#define NSA_EMU_MMA16816(T, d0, d1, d2, d3, a, b0, b1) \
  ::nsa_emu::mma16816(sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value, d0, d1, d2, d3, a, b0, b1)

// ------------------------------------------------------------------------------------ runtime API
typedef struct nsa_emu_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorLaunchFailure = 719 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMemoryPoolsSupported = 115
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t sharedMemPerBlockOptin;
};

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFree(void* p);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemset(void* p, int v, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t s);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);

namespace nsa_emu {
cudaError_t set_max_dynamic_smem(const void* fn, int bytes);
void launch_impl(void (*body)(void*), void* ctx, const void* fn, dim3 grid, dim3 block, size_t smem);
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  auto call = [&]() { kernel(args...); };
  launch_impl([](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call, reinterpret_cast<const void*>(kernel), grid,
              block, smem);
}
}  // namespace nsa_emu

template <typename F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return nsa_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(fn), value);
}

#define NSA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::nsa_emu::launch((kernel), dim3(grid), dim3(block), static_cast<size_t>(smem), __VA_ARGS__)
#define NSA_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::nsa_emu::dynamic_smem())

#include <type_traits>
