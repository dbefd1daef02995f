// The CPU emulation of cuda_emu.h: fiber scheduler, barriers, warp operations, mma, runtime API.
#include "cuda_emu.h"

#include <ucontext.h>

#include <cstdio>
#include <map>
#include <vector>

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

namespace nsa_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  bool done = false;
  uint3 tid{0, 0, 0};
};

struct Barrier {
  int count = 0;
  unsigned gen = 0;
};

ucontext_t g_sched;
std::vector<Fiber> g_fibers;
int g_cur = -1;
int g_nthreads = 0;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
std::vector<unsigned char> g_smem;
uint64_t g_progress = 0;  // arrivals, completions, exits: a scheduler pass without any is a deadlock
const char* g_waiting_on = "";

Barrier g_block_bar;
int g_or_acc = 0, g_or_result = 0;
Barrier g_warp_bar[kMaxThreads / 32];
uint64_t g_slots[kMaxThreads / 32][32];
struct MmaSlot {
  uint32_t a[4], b[2];
  float c[4];
};
MmaSlot g_mma[kMaxThreads / 32][32];

std::map<const void*, int> g_max_dyn;  // kernel -> dynamic shared memory allowed (cudaFuncSetAttribute)
cudaError_t g_last = cudaSuccess;

void yield() { swapcontext(&g_fibers[static_cast<size_t>(g_cur)].ctx, &g_sched); }

void fiber_entry() {
  g_body(g_ctx);
  g_fibers[static_cast<size_t>(g_cur)].done = true;
  ++g_progress;
  swapcontext(&g_fibers[static_cast<size_t>(g_cur)].ctx, &g_sched);
}

void wait(Barrier& b, int n, const char* what) {
  if (g_cur < 0) trap("a device barrier outside a kernel");
  const unsigned gen = b.gen;
  ++g_progress;
  if (++b.count == n) {
    b.count = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) {
    g_waiting_on = what;
    yield();
  }
}

int warp_of_current() { return static_cast<int>(threadIdx.x / 32); }

int env_int(const char* name, int def) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : def;
}

}  // namespace

void trap(const char* what) {
  std::fprintf(stderr, "[cuda_emu] %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  std::abort();
}

void syncthreads() { wait(g_block_bar, g_nthreads, "__syncthreads"); }

int syncthreads_or(int pred) {
  g_or_acc |= pred != 0;
  const unsigned gen = g_block_bar.gen;
  ++g_progress;
  if (++g_block_bar.count == g_nthreads) {  // last arrival publishes the result and resets the accumulator
    g_or_result = g_or_acc;
    g_or_acc = 0;
    g_block_bar.count = 0;
    ++g_block_bar.gen;
    return g_or_result;
  }
  while (g_block_bar.gen == gen) {
    g_waiting_on = "__syncthreads_or";
    yield();
  }
  return g_or_result;  // not overwritten before this thread arrives at the next barrier
}

uint64_t warp_exchange(uint64_t v, int src) {
  const int w = warp_of_current(), lane = static_cast<int>(threadIdx.x & 31u);
  g_slots[w][lane] = v;
  wait(g_warp_bar[w], 32, "warp shuffle");
  const uint64_t r = (src >= 0 && src < 32) ? g_slots[w][src] : v;
  wait(g_warp_bar[w], 32, "warp shuffle (second half)");
  return r;
}

unsigned warp_ballot(bool pred) {
  const int w = warp_of_current(), lane = static_cast<int>(threadIdx.x & 31u);
  g_slots[w][lane] = pred ? 1 : 0;
  wait(g_warp_bar[w], 32, "warp ballot");
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= static_cast<unsigned>(g_slots[w][i] != 0) << i;
  wait(g_warp_bar[w], 32, "warp ballot (second half)");
  return m;
}

// m16n8k16, A row-major 16x16, B 16x8 ("col"), C/D 16x8, fp32 accumulate; per the PTX ISA fragment tables:
// A: reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..); low half = lower column.
// B: reg0 (rows 2t..2t+1, col g), reg1 (rows 2t+8..2t+9, col g). C/D: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..).
void mma16816(bool bf16, float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int w = warp_of_current(), lane = static_cast<int>(threadIdx.x & 31u);
  MmaSlot& me = g_mma[w][lane];
  for (int i = 0; i < 4; ++i) me.a[i] = a[i];
  me.b[0] = b0;
  me.b[1] = b1;
  me.c[0] = d0;
  me.c[1] = d1;
  me.c[2] = d2;
  me.c[3] = d3;
  wait(g_warp_bar[w], 32, "mma.sync");
  auto half = [&](uint32_t r, int hi) -> float {
    const uint16_t h = static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu);
    return bf16 ? nsa::detail::bf16_to_f32(h) : nsa::detail::f16_to_f32(h);
  };
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const MmaSlot& s = g_mma[w][l];
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = half(s.a[0], e);
      A[g + 8][2 * t + e] = half(s.a[1], e);
      A[g][2 * t + 8 + e] = half(s.a[2], e);
      A[g + 8][2 * t + 8 + e] = half(s.a[3], e);
      B[2 * t + e][g] = half(s.b[0], e);
      B[2 * t + 8 + e][g] = half(s.b[1], e);
    }
    C[g][2 * t] = s.c[0];
    C[g][2 * t + 1] = s.c[1];
    C[g + 8][2 * t] = s.c[2];
    C[g + 8][2 * t + 1] = s.c[3];
  }
  wait(g_warp_bar[w], 32, "mma.sync (second half)");
  const int g = lane >> 2, t = lane & 3;
  auto dot = [&](int r, int c) {
    float acc = C[r][c];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[r][k], B[k][c], acc);
    return acc;
  };
  d0 = dot(g, 2 * t);
  d1 = dot(g, 2 * t + 1);
  d2 = dot(g + 8, 2 * t);
  d3 = dot(g + 8, 2 * t + 1);
}

void* dynamic_smem() { return g_smem.data(); }

cudaError_t set_max_dynamic_smem(const void* fn, int bytes) {
  if (bytes < 0 || bytes > env_int("NSA_EMU_SMEM_OPTIN", 232448)) return g_last = cudaErrorInvalidValue;
  g_max_dyn[fn] = bytes;
  return cudaSuccess;
}

void launch_impl(void (*body)(void*), void* ctx, const void* fn, dim3 grid, dim3 block, size_t smem) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  auto it = g_max_dyn.find(fn);
  const size_t allowed = it == g_max_dyn.end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (threads == 0 || threads > kMaxThreads || block.y != 1 || block.z != 1 || threads % 32 != 0 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || smem > allowed) {
    std::fprintf(stderr, "[cuda_emu] invalid launch: grid (%u,%u,%u) block (%u,%u,%u) dynamic smem %zu (allowed %zu)\n",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, allowed);
    g_last = cudaErrorInvalidValue;
    return;
  }
  g_body = body;
  g_ctx = ctx;
  g_nthreads = static_cast<int>(threads);
  blockDim = block;
  gridDim = grid;
  if (g_fibers.size() < threads) g_fibers.resize(threads);
  for (size_t i = 0; i < threads; ++i)
    if (g_fibers[i].stack == nullptr) g_fibers[i].stack = static_cast<char*>(std::malloc(kStackBytes));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        g_smem.assign(smem == 0 ? 16 : smem, 0xFF);
        g_block_bar = Barrier{};
        g_or_acc = g_or_result = 0;
        for (Barrier& b : g_warp_bar) b = Barrier{};
        for (size_t i = 0; i < threads; ++i) {
          Fiber& f = g_fibers[i];
          f.done = false;
          f.tid = uint3{static_cast<unsigned>(i), 0, 0};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        size_t live = threads;
        while (live > 0) {
          const uint64_t before = g_progress;
          for (size_t i = 0; i < threads; ++i) {
            Fiber& f = g_fibers[i];
            if (f.done) continue;
            g_cur = static_cast<int>(i);
            threadIdx = f.tid;
            swapcontext(&g_sched, &f.ctx);
            if (f.done) --live;
          }
          g_cur = -1;
          if (live > 0 && g_progress == before) {
            std::fprintf(stderr, "[cuda_emu] deadlock in block (%u,%u,%u): %zu threads wait at a %s nobody completes\n",
                         bx, by, bz, live, g_waiting_on);
            std::abort();
          }
        }
      }
}

}  // namespace nsa_emu

// ------------------------------------------------------------------------------------ runtime API
namespace {
int env_optin() {
  const char* v = std::getenv("NSA_EMU_SMEM_OPTIN");
  return v != nullptr && *v != '\0' ? std::atoi(v) : 232448;
}
}  // namespace

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = env_optin(); return cudaSuccess;
    case cudaDevAttrMemoryPoolsSupported: *v = 1; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "CPU emulation (cuda_emu)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 1;
  p->sharedMemPerBlockOptin = static_cast<size_t>(env_optin());
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, k);
}
cudaError_t cudaMemset(void* p, int v, size_t bytes) {
  if (bytes) std::memset(p, v, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t) { return cudaMemset(p, v, bytes); }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char(0));
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetLastError() {
  const cudaError_t e = nsa_emu::g_last;
  nsa_emu::g_last = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
