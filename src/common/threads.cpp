// The CPU backends' parallel loops on a persistent worker pool (common/threads.h).
//
// Pool. Threads are created on first use and on demand (up to the largest worker count asked for so far) and then
// kept for the life of the process, parked on a condition variable between loops. One call at a time holds the
// pool: it publishes its job (a body and its worker count) under the pool's mutex, bumps the job generation and
// wakes the threads; pool thread i (1-based) runs body(i) when i < the job's worker count, the calling thread runs
// body(0), and the call returns once every participating thread has reported back. Job state and results are
// handed over under that mutex, so each job's writes happen-before the caller's return.
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

#include <atomic>
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
    // Only the holder of busy_ reads or writes threads_ and generation_ outside the mutex.
    try {
      while (static_cast<int>(threads_.size()) < workers - 1)
        threads_.emplace_back(&Pool::thread_main, this, static_cast<int>(threads_.size()) + 1, generation_);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      busy_ = false;
      throw;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      body_ = &body;
      workers_ = workers;
      pending_ = workers - 1;
      ++generation_;
    }
    wake_.notify_all();
    body(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return pending_ == 0; });
    body_ = nullptr;
    busy_ = false;
    return true;
  }

 private:
  void thread_main(int index, uint64_t seen) {
    ++t_in_loop;  // for good: a pool thread only ever runs loop bodies
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= workers_) continue;  // not needed by this job
      const Body* body = body_;
      lk.unlock();
      (*body)(index);
      lk.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;  // threads_[i] is worker i + 1; never joined (they live as long as the process)
  bool busy_ = false;
  uint64_t generation_ = 0;           // jobs published so far
  const Body* body_ = nullptr;        // the current job
  int workers_ = 0;                   // its worker count
  int pending_ = 0;                   // its pool threads still running
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

}  // namespace nsa::cpu
