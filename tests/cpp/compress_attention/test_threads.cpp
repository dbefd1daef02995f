// The parallel loops of the CPU backends (src/common/threads.h), which this operator's CPU forward and backward run
// on: every task exactly once, runs of consecutive tasks, owned ranges (front to back, then taken from the end),
// loops after idle pauses (polling or parked workers), workers reused across calls (a persistent pool, not new
// threads per loop), concurrent callers, loops started inside a loop body (inline on that thread), exceptions
// (rethrown to the caller, the pool still usable), and a forked child (a fresh pool).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__unix__)
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "common/threads.h"

namespace {

using nsa::cpu::parallel_for;
using nsa::cpu::parallel_for_owned;
using nsa::cpu::parallel_for_runs;

// The operating system's id of the calling thread (Linux: the kernel's thread id, new for every new thread; a
// std::thread::id may be reused by a later thread).
long os_thread_id() {
#if defined(__linux__)
  return static_cast<long>(syscall(SYS_gettid));
#else
  return static_cast<long>(std::hash<std::thread::id>()(std::this_thread::get_id()));
#endif
}

TEST(ParallelLoops, EveryTaskOnceWorkersInRange) {
  for (int64_t n : {0, 1, 2, 7, 1000})
    for (int threads : {1, 2, 3, 8}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      std::atomic<int> bad_worker{0};
      const int used = parallel_for(n, threads, [&](int64_t t, int w) {
        hits[static_cast<size_t>(t)].fetch_add(1);
        if (w < 0 || w >= threads) bad_worker.fetch_add(1);
      });
      EXPECT_EQ(used, n == 0 ? 0 : static_cast<int>(std::min<int64_t>(threads, n))) << n << " " << threads;
      EXPECT_EQ(bad_worker.load(), 0);
      for (int64_t t = 0; t < n; ++t) ASSERT_EQ(hits[static_cast<size_t>(t)].load(), 1) << "task " << t;
    }
}

TEST(ParallelLoops, RunsAreConsecutiveAndCoverEveryTaskOnce) {
  for (int64_t n : {1, 5, 64, 1001})
    for (int threads : {1, 2, 3})
      for (int64_t chunk : {1, 4, 8}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<int> bad{0};
        parallel_for_runs(n, threads, chunk, [&](int64_t b, int64_t e, int w) {
          if (b >= e || e > n || (threads > 1 && e - b > chunk) || w >= threads) bad.fetch_add(1);
          for (int64_t t = b; t < e; ++t) hits[static_cast<size_t>(t)].fetch_add(1);
        });
        EXPECT_EQ(bad.load(), 0);
        for (int64_t t = 0; t < n; ++t) ASSERT_EQ(hits[static_cast<size_t>(t)].load(), 1);
      }
}

// parallel_for_owned: every task once; worker w takes the tasks of its own range [w n / W, (w + 1) n / W) from the
// front, in increasing order with no gap (so they are a prefix of the range), and the other ranges' tasks from their
// backs, in decreasing order, all after that range's owner's tasks. Holds for any timing.
TEST(ParallelLoops, OwnedRangesFrontToBackThenTakenFromTheEnd) {
  for (int round = 0; round < 20; ++round)
    for (int64_t n : {0, 1, 2, 7, 64, 1000})
      for (int threads : {1, 2, 3, 8}) {
        std::mutex m;
        std::vector<std::vector<int64_t>> ran(static_cast<size_t>(threads));  // tasks per worker, in run order
        std::atomic<int> bad_worker{0};
        const int used = parallel_for_owned(n, threads, [&](int64_t t, int w) {
          if (w < 0 || w >= threads) {
            bad_worker.fetch_add(1);
            return;
          }
          if (t % 5 == round % 5) std::this_thread::yield();  // vary the timing
          std::lock_guard<std::mutex> lk(m);
          ran[static_cast<size_t>(w)].push_back(t);
        });
        const int workers = n == 0 ? 0 : static_cast<int>(std::min<int64_t>(threads, n));
        ASSERT_EQ(used, workers) << n << " " << threads;
        ASSERT_EQ(bad_worker.load(), 0);
        const auto range_of = [&](int64_t t) {  // the range holding task t
          int r = 0;
          while (t >= n * (r + 1) / workers) ++r;
          return r;
        };
        std::vector<int> hits(static_cast<size_t>(n), 0);
        std::vector<int64_t> owner_last(static_cast<size_t>(std::max(workers, 1)), -1);
        for (int w = 0; w < threads; ++w) {
          std::vector<int64_t> from_back(static_cast<size_t>(std::max(workers, 1)), INT64_MAX);
          int64_t expect_own = workers > 0 && w < workers ? n * w / workers : -1;
          for (const int64_t t : ran[static_cast<size_t>(w)]) {
            ASSERT_TRUE(t >= 0 && t < n);
            ++hits[static_cast<size_t>(t)];
            const int r = range_of(t);
            if (r == w) {
              ASSERT_EQ(t, expect_own) << "worker " << w << " skipped a task of its own range";
              ++expect_own;
              owner_last[static_cast<size_t>(r)] = t;
            } else {
              ASSERT_LT(t, from_back[static_cast<size_t>(r)]) << "range " << r << " not taken from its end";
              from_back[static_cast<size_t>(r)] = t;
            }
          }
        }
        for (int64_t t = 0; t < n; ++t) ASSERT_EQ(hits[static_cast<size_t>(t)], 1) << "task " << t;
        for (int w = 0; w < threads; ++w) {  // a range's stolen tasks all lie after its owner's last one
          for (const int64_t t : ran[static_cast<size_t>(w)]) {
            if (range_of(t) != w) {
              ASSERT_GT(t, owner_last[static_cast<size_t>(range_of(t))]);
            }
          }
        }
      }
}

// Between loops the pool threads poll for a while and then park (NSA_CPU_SPIN_US): loops that follow each other at
// once, after a pause shorter than the polling and after pauses long enough to park all give every task once.
TEST(ParallelLoops, LoopsAfterIdlePausesOfAnyLength) {
  for (const int pause_us : {0, 20, 150, 400, 3000, 0, 3000, 20})
    for (int threads : {2, 3}) {
      std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
      std::vector<std::atomic<int>> hits(100);
      parallel_for(100, threads, [&](int64_t t, int) { hits[static_cast<size_t>(t)].fetch_add(1); });
      for (int64_t t = 0; t < 100; ++t) ASSERT_EQ(hits[static_cast<size_t>(t)].load(), 1) << pause_us;
      std::atomic<int64_t> sum{0};
      parallel_for_owned(100, threads, [&](int64_t t, int) { sum.fetch_add(t); });
      ASSERT_EQ(sum.load(), 4950) << pause_us;
    }
}

// Many loops of one process run on the same few threads: the caller plus at most threads - 1 pool workers.
TEST(ParallelLoops, WorkersPersistAcrossCalls) {
  std::mutex m;
  std::set<long> seen;
  for (int call = 0; call < 200; ++call)
    parallel_for(64, 3, [&](int64_t, int) {
      std::lock_guard<std::mutex> lk(m);
      seen.insert(os_thread_id());
    });
  EXPECT_LE(seen.size(), 3u) << "threads that ran tasks over 200 loops of 3 workers";
  EXPECT_GE(seen.size(), 1u);
}

// A loop inside a loop body runs inline: the body's own thread, worker 0, every task once.
TEST(ParallelLoops, NestedLoopsRunInline) {
  std::atomic<int> wrong{0}, inner_tasks{0};
  parallel_for(6, 3, [&](int64_t, int) {
    const std::thread::id me = std::this_thread::get_id();
    const int used = parallel_for(5, 4, [&](int64_t, int w) {
      if (w != 0 || std::this_thread::get_id() != me) wrong.fetch_add(1);
      inner_tasks.fetch_add(1);
    });
    if (used != 1) wrong.fetch_add(1);
    parallel_for_runs(9, 4, 2, [&](int64_t b, int64_t e, int w) {
      if (w != 0 || b != 0 || e != 9 || std::this_thread::get_id() != me) wrong.fetch_add(1);
    });
  });
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(inner_tasks.load(), 30);
}

// Several callers at once (the pool serves one, the others get private workers): every sum is right, no deadlock.
TEST(ParallelLoops, ConcurrentCallers) {
  std::atomic<int> wrong{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&, c] {
      for (int round = 0; round < 100; ++round) {
        const int64_t n = 10 + (c * 7 + round) % 50;
        std::vector<int64_t> out(static_cast<size_t>(n), -1);
        parallel_for(n, 1 + (c + round) % 4, [&](int64_t t, int) { out[static_cast<size_t>(t)] = t * t; });
        for (int64_t t = 0; t < n; ++t)
          if (out[static_cast<size_t>(t)] != t * t) wrong.fetch_add(1);
      }
    });
  for (auto& th : callers) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

// An exception in a task reaches the caller after the workers stop; the next loops run normally.
TEST(ParallelLoops, ExceptionsReachTheCaller) {
  for (int threads : {1, 2, 3}) {
    EXPECT_THROW(parallel_for(100, threads,
                              [&](int64_t t, int) {
                                if (t == 17) throw std::runtime_error("task 17");
                              }),
                 std::runtime_error);
    EXPECT_THROW(parallel_for_runs(100, threads, 4,
                                   [&](int64_t b, int64_t e, int) {
                                     if (b <= 50 && 50 < e) throw std::length_error("run with 50");
                                   }),
                 std::length_error);
    EXPECT_THROW(parallel_for_owned(100, threads,
                                    [&](int64_t t, int) {
                                      if (t == 99) throw std::out_of_range("task 99");
                                    }),
                 std::out_of_range);
    std::atomic<int64_t> sum{0};
    parallel_for(100, threads, [&](int64_t t, int) { sum.fetch_add(t); });
    EXPECT_EQ(sum.load(), 4950);
  }
}

#if defined(__unix__) && !defined(__SANITIZE_THREAD__)
// After fork() the child has none of the parent's pool threads: its loops must still run (on a fresh pool).
TEST(ParallelLoops, ForkedChildRunsLoops) {
  std::atomic<int64_t> warm{0};
  parallel_for(8, 3, [&](int64_t t, int) { warm.fetch_add(t); });  // the parent's pool exists
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(20);  // a deadlock ends the child with SIGALRM instead of hanging the test
    std::atomic<int64_t> sum{0};
    parallel_for(100, 3, [&](int64_t t, int) { sum.fetch_add(t); });
    _exit(sum.load() == 4950 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}
#endif

}  // namespace
