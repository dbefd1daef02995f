#include "common/threads.h"

#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

namespace nsa::cpu {

int resolve_num_threads(int requested) {
  if (requested > 0) return requested;
  if (const char* env = std::getenv("NSA_NUM_THREADS")) {
    const int v = std::atoi(env);
    if (v > 0) return v;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

namespace {
// body(w) on `workers` threads, w = 0 on the calling thread; returns once all have finished.
template <typename Body>
int run_on_workers(int workers, const Body& body) {
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int w = 1; w < workers; ++w) pool.emplace_back(body, w);
  body(0);
  for (auto& th : pool) th.join();
  return workers;
}
}  // namespace

int parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return 0;
  int workers = n_threads < 1 ? 1 : n_threads;
  if (workers > n_tasks) workers = static_cast<int>(n_tasks);
  if (workers == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return 1;
  }
  std::atomic<int64_t> next{0};
  auto run = [&](int worker) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed))
      fn(t, worker);
  };
  return run_on_workers(workers, run);
}

int parallel_for_runs(int64_t n_tasks, int n_threads, int64_t chunk,
                      const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n_tasks <= 0) return 0;
  if (chunk < 1) chunk = 1;
  int workers = n_threads < 1 ? 1 : n_threads;
  if (workers > n_tasks) workers = static_cast<int>(n_tasks);
  if (workers == 1) {
    fn(0, n_tasks, 0);
    return 1;
  }
  std::atomic<int64_t> next{0};
  auto run = [&](int worker) {
    for (;;) {
      // runs of `chunk` tasks while more than 2 * workers * chunk are left, then single tasks
      int64_t begin = next.load(std::memory_order_relaxed), len;
      do {
        if (begin >= n_tasks) return;
        const int64_t left = n_tasks - begin;
        len = left > 2 * workers * chunk ? chunk : 1;
      } while (!next.compare_exchange_weak(begin, begin + len, std::memory_order_relaxed));
      fn(begin, begin + len, worker);
    }
  };
  return run_on_workers(workers, run);
}

}  // namespace nsa::cpu
