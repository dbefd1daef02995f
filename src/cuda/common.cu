// Host helpers of the CUDA backend (see common.cuh).
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "nsa/cuda.h"

namespace nsa {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error of "no driver / no device"
    return 0;
  }
  return n;
}

namespace cuda_detail {

Status cuda_error(cudaError_t e, const char* what) {
  return Status::Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" +
                       cudaGetErrorString(e) + ")");
}

Scratch::~Scratch() {
  for (void* p : ptrs_) {
    if (pools_ == 1) cudaFreeAsync(p, stream_);
    else {
      cudaStreamSynchronize(stream_);
      cudaFree(p);
    }
  }
}

Status Scratch::alloc(size_t bytes, void** out) {
  if (bytes == 0) bytes = 1;
  if (pools_ < 0) {
    int dev = 0, v = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return cuda_error(e, "cudaGetDevice");
    e = cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, dev);
    if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute(MemoryPoolsSupported)");
    pools_ = v ? 1 : 0;
  }
  void* p = nullptr;
  const cudaError_t e = pools_ == 1 ? cudaMallocAsync(&p, bytes, stream_) : cudaMalloc(&p, bytes);
  if (e != cudaSuccess) return cuda_error(e, pools_ == 1 ? "cudaMallocAsync" : "cudaMalloc");
  ptrs_.push_back(p);
  *out = p;
  return Status::Ok();
}

Status device_smem_optin(int* bytes) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_error(e, "cudaGetDevice");
  e = cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return Status::Ok();
}

bool env_simple() {
  const char* v = std::getenv("NSA_CUDA_SIMPLE");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace cuda_detail
}  // namespace nsa
