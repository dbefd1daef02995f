// The cache of large CPU output blocks (output_cache.h).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nsa_torch {
namespace {

constexpr size_t kPage = size_t(2) << 20;  // blocks are whole 2 MiB (transparent huge) pages

// Asks the kernel (Linux, madvise MADV_HUGEPAGE) to back the whole 2 MiB pages within [p, p + bytes) with
// transparent huge pages, so that a first write costs a few 2 MiB page faults instead of thousands of 4 KiB ones
// (about 20 ms per call for the 88 MB of bench-8k's outputs). A hint only: no effect on values, errors ignored.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kPage - 1) & ~(kPage - 1), last = (begin + bytes) & ~(kPage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

int64_t limit_from_env() {
  const char* v = std::getenv("NSA_CPU_OUTPUT_CACHE_MB");
  if (v == nullptr || *v == '\0') return int64_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0 && mb <= (int64_t(1) << 40),
              "NSA_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0 (0 disables the output cache), got '", v,
              "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = std::max<size_t>(kPage, (n + kPage - 1) / kPage * kPage);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = free_.size(); i-- > 0;)  // the most recently freed block of this size (warmest in the caches)
        if (free_[i].bytes == bytes) {
          p = free_[i].ptr;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= static_cast<int64_t>(bytes);
          ++hits_;
          break;
        }
      if (p == nullptr) ++misses_;
      ++live_;
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kPage, bytes);
      if (p == nullptr) {
        std::lock_guard<std::mutex> lock(mu_);
        --live_;
        TORCH_CHECK(false, "nsa_ops: out of memory allocating an output of ", n, " bytes");
      }
      advise_huge_pages(p, bytes);
    }
    Block* ctx = new Block{p, bytes};
    return {p, ctx, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {limit_, cached_, static_cast<int64_t>(free_.size()), live_, hits_, misses_};
  }

  void clear() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : drop) std::free(b.ptr);
  }

  int64_t limit() const { return limit_; }

  // One cache per process, never destroyed: tensors may be freed during interpreter shutdown, after static
  // destructors have run.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache(limit_from_env());
    return *cache;
  }

 private:
  explicit OutputCache(int64_t limit) : limit_(limit) {}

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    get().put(*b);
    delete b;
  }

  void put(const Block& b) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --live_;
      if (static_cast<int64_t>(b.bytes) > limit_) {
        drop.push_back(b);
      } else {
        size_t evict = 0;  // the oldest free blocks, until the new one fits under the limit
        while (cached_ + static_cast<int64_t>(b.bytes) > limit_) {
          cached_ -= static_cast<int64_t>(free_[evict].bytes);
          drop.push_back(free_[evict++]);
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(evict));
        free_.push_back(b);
        cached_ += static_cast<int64_t>(b.bytes);
      }
    }
    for (const Block& d : drop) std::free(d.ptr);
  }

  const int64_t limit_;
  std::mutex mu_;
  std::vector<Block> free_;  // oldest freed first
  int64_t cached_ = 0, live_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() && !options.requires_grad()) {
    OutputCache& cache = OutputCache::get();
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
    if (cache.limit() > 0 && bytes >= kCachedMinBytes)
      return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
  }
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu() && t.nbytes() >= static_cast<size_t>(kCachedMinBytes))
    advise_huge_pages(t.mutable_data_ptr(), t.nbytes());
  return t;
}

OutputCacheStats output_cache_stats() { return OutputCache::get().stats(); }

void output_cache_clear() { OutputCache::get().clear(); }

}  // namespace nsa_torch
