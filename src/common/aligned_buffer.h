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
