// The CPU backends' parallel loops on a persistent worker pool (common/threads.h).
//
// Pool. Threads are created on first use and on demand (up to the largest worker count asked for so far) and then
// kept for the life of the process; between loops each polls for the next job for a short while (spin_ns) and then
// parks on a condition variable. One call at a time holds the pool: it publishes its job (a body and its worker
// count) with a release store of the job word, under the pool's mutex so that parking threads cannot miss it, and
// wakes the parked threads; pool thread i (1-based) runs body(i) when i < the job's worker count, the calling thread
// runs body(0), and the call returns once every participating thread has reported back (an acq_rel decrement of
// the pending count, which the caller polls and then waits for), so each job's writes happen-before the caller's
// return.
//
// Concurrent callers. A call that finds the pool held by another call does not wait: it starts private workers
// for its own loop (threads created and joined by that call, as a pool-less implementation would). A parallel loop
// started from inside a loop body (any worker, including the caller's share) runs inline on that thread, so a
// nested call never waits for workers that are busy running its parent.
//
// Tasks. Each call owns its task counter: workers take the next task index (or run of indices) with one atomic
// increment, so which worker runs which task depends on timing, never on values; every task writes its own
// outputs, so results are bitwise the same for any thread count. An exception thrown by a task stops the hand-out
// of further tasks and is rethrown to the caller once all workers of the call have stopped.
//
// fork(): the child gets a fresh, empty pool (the parent's threads do not exist there); the old one is left alone.
#include "common/threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

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

// > 0 while this thread runs a loop body (a pool thread always, a caller during its own share, a private worker).
thread_local int t_in_loop = 0;

struct InLoop {
  InLoop() { ++t_in_loop; }
  ~InLoop() { --t_in_loop; }
  InLoop(const InLoop&) = delete;
  InLoop& operator=(const InLoop&) = delete;
};

using Body = std::function<void(int worker)>;

// How long a pool thread that has finished its share keeps polling for the next job, and a caller that has finished
// its own share polls for the others, before parking on a condition variable: NSA_CPU_SPIN_US microseconds (read
// once; default kDefaultSpinUs; 0 parks at once). Waking a parked thread takes a futex call on one side and a
// reschedule on the other, 15-25 us per loop on a 2-vCPU VM (bench_call_overhead, Zen 5: 2 threads cost 27 us more
// per tiny call than 1 when parking at once); back-to-back calls find the workers still polling. A polling thread
// pauses between reads and yields its core to other runnable threads (sched_yield) every kYieldEveryPolls reads.
// The default covers the gaps between calls made one after another from Python (bench_decode.py 8k-b1, a step of
// four calls: 0.17-0.21 ms parking at once, 0.15-0.17 ms polling 50 us); polling longer took cores from torch's
// own threads between our calls (bench_nsa_layer.py 2k training step: 787-797 ms parking, 805 ms polling 200 us).
constexpr int64_t kDefaultSpinUs = 50;
constexpr int kYieldEveryPolls = 64;

int64_t spin_ns() {
  static const int64_t ns = [] {
    int64_t us = kDefaultSpinUs;
    if (const char* env = std::getenv("NSA_CPU_SPIN_US")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && v >= 0) us = std::min<long long>(v, 1000000);
    }
    return us * 1000;
  }();
  return ns;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Polls ready() for up to spin_ns(); true as soon as it holds, false when the time is up.
template <typename Ready>
bool poll_for(Ready&& ready) {
  const int64_t limit = spin_ns();
  if (limit <= 0) return ready();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % kYieldEveryPolls == 0) {
      if (std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count() >=
          limit)
        return ready();
      std::this_thread::yield();
    }
  }
}

class Pool {
 public:
  // Runs body(w) for w in [0, workers) (w = 0 on this thread) and returns true; returns false, running nothing,
  // when another call holds the pool.
  bool try_run(int workers, const Body& body) {
    {
      std::lock_guard<std::mutex> lk(m_);
      if (busy_) return false;
      busy_ = true;
    }
    // Only the holder of busy_ writes threads_, body_, pending_ and job_.
    const uint64_t generation = (job_.load(std::memory_order_relaxed) >> kWorkerBits) + 1;
    try {
      while (static_cast<int>(threads_.size()) < workers - 1)
        threads_.emplace_back(&Pool::thread_main, this, static_cast<int>(threads_.size()) + 1, generation - 1);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      busy_ = false;
      throw;
    }
    {
      // published under the mutex so that a thread about to park sees it (its wait re-checks job_ under m_)
      std::lock_guard<std::mutex> lk(m_);
      body_ = &body;
      pending_.store(workers - 1, std::memory_order_relaxed);
      job_.store(generation << kWorkerBits | static_cast<uint64_t>(workers), std::memory_order_release);
    }
    wake_.notify_all();
    body(0);
    if (!poll_for([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(m_);
      done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::lock_guard<std::mutex> lk(m_);
    body_ = nullptr;
    busy_ = false;
    return true;
  }

 private:
  // job_: the generation of the latest job (jobs published so far) above kWorkerBits bits of its worker count, one
  // word so that a thread reads both from the same job.
  static constexpr int kWorkerBits = 20;
  static constexpr uint64_t kWorkerMask = (uint64_t{1} << kWorkerBits) - 1;

  // Waits for a job of a generation other than `seen`: polls, then parks. Returns that job's word.
  uint64_t next_job(uint64_t seen) {
    uint64_t job = 0;
    const auto fresh = [&] {
      job = job_.load(std::memory_order_acquire);
      return job >> kWorkerBits != seen;
    };
    if (poll_for(fresh)) return job;
    std::unique_lock<std::mutex> lk(m_);
    wake_.wait(lk, fresh);
    return job;
  }

  void thread_main(int index, uint64_t seen) {
    ++t_in_loop;  // for good: a pool thread only ever runs loop bodies
    for (;;) {
      const uint64_t job = next_job(seen);
      seen = job >> kWorkerBits;
      // A thread that is not needed by a job takes no part in it: the caller waits only for the others, and may
      // publish the next job while this one is still reading this word.
      if (static_cast<uint64_t>(index) >= (job & kWorkerMask)) continue;
      (*body_)(index);  // body_ stays valid until every participant has reported back
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(m_);  // the caller may be parked in done_.wait
        done_.notify_one();
      }
    }
  }

  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;  // threads_[i] is worker i + 1; never joined (they live as long as the process)
  bool busy_ = false;
  std::atomic<uint64_t> job_{0};       // generation << kWorkerBits | worker count of the latest job
  const Body* body_ = nullptr;         // the current job's body
  std::atomic<int> pending_{0};        // its pool threads still running
};

// The process's pool, created on first use and deliberately never destroyed: its threads may still be parked when
// static destructors run, and a destructor would have to wake and join them in an unknown state.
Pool*& pool_slot() {
  static Pool* pool = [] {
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, [] { pool_slot() = new Pool(); });  // the child starts with no pool threads
#endif
    return new Pool();
  }();
  return pool;
}

// body(w) for w in [0, workers) on `workers` threads (this one as w = 0), returning once all have finished.
void run_on_workers(int workers, const Body& body) {
  if (pool_slot()->try_run(workers, body)) return;
  std::vector<std::thread> own;  // the pool is held by another call: private workers for this one
  own.reserve(static_cast<size_t>(workers - 1));
  try {
    for (int w = 1; w < workers; ++w)
      own.emplace_back([&body, w] {
        InLoop in;
        body(w);
      });
  } catch (...) {
    for (auto& th : own) th.join();
    throw;
  }
  body(0);
  for (auto& th : own) th.join();
}

// The first exception of a call's tasks; once set, no further task is started.
struct Failure {
  std::atomic<bool> failed{false};
  std::mutex m;
  std::exception_ptr error;
  void record() {
    std::lock_guard<std::mutex> lk(m);
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_relaxed);
  }
  void rethrow() {
    if (error) std::rethrow_exception(error);
  }
};

// Workers for n_tasks tasks on up to n_threads threads: 0 without tasks, 1 (inline) inside a loop body.
int worker_count(int64_t n_tasks, int n_threads) {
  if (n_tasks <= 0) return 0;
  if (t_in_loop > 0) return 1;
  int workers = n_threads < 1 ? 1 : n_threads;
  if (workers > n_tasks) workers = static_cast<int>(n_tasks);
  return workers;
}

// A loop's tasks on `workers` workers: each worker calls take(worker), which hands out and runs the call's next
// task (or run of tasks) and returns false when none is left. The first exception stops further takes and is
// rethrown here once every worker has returned.
template <typename Take>
void run_tasks(int workers, Take&& take) {
  Failure failure;
  run_on_workers(workers, [&](int worker) {
    InLoop in;
    try {
      while (!failure.failed.load(std::memory_order_relaxed) && take(worker)) {
      }
    } catch (...) {
      failure.record();
    }
  });
  failure.rethrow();
}

}  // namespace

int parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)>& fn) {
  const int workers = worker_count(n_tasks, n_threads);
  if (workers <= 1) {
    InLoop in;
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return workers;
  }
  std::atomic<int64_t> next{0};
  run_tasks(workers, [&](int worker) {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    if (t >= n_tasks) return false;
    fn(t, worker);
    return true;
  });
  return workers;
}

int parallel_for_runs(int64_t n_tasks, int n_threads, int64_t chunk,
                      const std::function<void(int64_t, int64_t, int)>& fn) {
  const int workers = worker_count(n_tasks, n_threads);
  if (workers <= 1) {
    InLoop in;
    if (workers == 1) fn(0, n_tasks, 0);
    return workers;
  }
  if (chunk < 1) chunk = 1;
  std::atomic<int64_t> next{0};
  run_tasks(workers, [&](int worker) {
    // runs of `chunk` tasks while more than 2 * workers * chunk are left, then single tasks
    int64_t begin = next.load(std::memory_order_relaxed), len;
    do {
      if (begin >= n_tasks) return false;
      len = n_tasks - begin > 2 * workers * chunk ? chunk : 1;
    } while (!next.compare_exchange_weak(begin, begin + len, std::memory_order_relaxed));
    fn(begin, begin + len, worker);
    return true;
  });
  return workers;
}

int parallel_for_owned(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)>& fn) {
  const int workers = worker_count(n_tasks, n_threads);
  // one worker (inline, in index order), or more tasks than the ranges' 32-bit indices hold: parallel_for
  if (workers <= 1 || n_tasks > INT32_MAX) return parallel_for(n_tasks, n_threads, fn);
  // range w's tasks not yet taken: [front, back) packed as front << 32 | back, in a cache line of its own; the owner
  // takes from the front, the others from the back (one compare-exchange each)
  struct alignas(64) Range {
    std::atomic<uint64_t> left{0};
  };
  static_assert(sizeof(Range) == 64, "one range per cache line");
  std::vector<Range> ranges(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    const uint64_t lo = static_cast<uint64_t>(n_tasks * w / workers), hi = static_cast<uint64_t>(n_tasks * (w + 1) / workers);
    ranges[static_cast<size_t>(w)].left.store(lo << 32 | hi, std::memory_order_relaxed);
  }
  // one task of range r, from its front (own) or its back (another's); -1 when the range is empty
  const auto take_from = [&](int r, bool own) -> int64_t {
    std::atomic<uint64_t>& left = ranges[static_cast<size_t>(r)].left;
    uint64_t cur = left.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
      if (lo >= hi) return -1;
      const uint64_t next = own ? (lo + 1) << 32 | hi : lo << 32 | (hi - 1);
      if (left.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return static_cast<int64_t>(own ? lo : hi - 1);
    }
  };
  run_tasks(workers, [&](int worker) {
    int64_t t = take_from(worker, true);
    for (int k = 1; t < 0 && k < workers; ++k) t = take_from((worker + k) % workers, false);
    if (t < 0) return false;
    fn(t, worker);
    return true;
  });
  return workers;
}

}  // namespace nsa::cpu
