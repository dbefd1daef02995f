// Workspace buffers of the CPU drivers (internal): 64-byte aligned (one cache line, one AVX-512 vector), owned,
// and carved into several arrays with one allocation. A failed allocation throws std::bad_alloc, which every CPU
// entry point turns into a Status (common/status_guard.h), never a crash.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace nsa::detail {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The largest buffer requested from the allocator: 2^46 bytes (64 TiB), more than any machine's memory. Larger
// requests (stride-0 views of a small buffer can describe them) fail here as std::bad_alloc, without relying on
// the allocator's answer: under some overcommit settings a huge request succeeds and the first write is fatal, and
// the sanitizers' allocators abort on it.
constexpr int64_t kMaxBufferBytes = int64_t(1) << 46;

// n elements of T (at least one), 64-byte aligned, zeroed when asked (padding read as zeros), else uninitialised.
template <typename T>
class AlignedBuffer {
 public:
  void reset(int64_t n, bool zero = false) {
    const int64_t count = std::max<int64_t>(n, 1);
    if (count > kMaxBufferBytes / static_cast<int64_t>(sizeof(T))) throw std::bad_alloc();
    const size_t bytes = static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 64));
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (ptr_ == nullptr) throw std::bad_alloc();
    if (zero) std::memset(static_cast<void*>(ptr_.get()), 0, bytes);
    size_ = n;
  }
  T* get() const { return ptr_.get(); }
  int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
  int64_t size_ = 0;
};

// An allocator of whole cache lines: 64-byte aligned blocks whose sizes are rounded up to 64 bytes. Per-worker
// scratch arrays that are allocated one after another with the default allocator can share a line at their ends
// (and with the allocator's headers); a worker storing to its array then takes the line from the worker updating
// the other. LineVector<T> is a std::vector on it.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(kMaxBufferBytes) / sizeof(T)) throw std::bad_alloc();
    const size_t bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(n, 1) * sizeof(T)), 64));
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const {
    return false;
  }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// Consecutive 64-byte aligned arrays out of one buffer, in two passes over the same take() calls: the first with
// base == nullptr counts the bytes (used), the second, with base set to a buffer of that size, assigns the pointers.
struct Carver {
  char* base = nullptr;
  int64_t used = 0;
  template <typename T>
  void take(T** out, int64_t n) {
    if (base != nullptr) *out = reinterpret_cast<T*>(base + used);
    used += round_up(std::max<int64_t>(n, 0) * static_cast<int64_t>(sizeof(T)), 64);
  }
};

}  // namespace nsa::detail
