// Fork-join parallel loops of the CPU backends (internal), on a persistent pool of worker threads (threads.cpp):
// the workers are created once, on demand, and reused by every loop (between loops they poll for the next one for
// NSA_CPU_SPIN_US microseconds, then sleep); a call made while another call holds the pool gets private workers; a
// loop started from inside a loop body runs inline on that thread. Tasks are handed out in index order through a
// counter owned by the call (parallel_for_owned: from per-worker ranges); which thread runs a task never changes a
// result, because each task writes its own outputs (docs/CONTRIBUTING.md rule 7: bitwise the same results for any thread count).
#pragma once

#include <cstdint>
#include <functional>

namespace nsa::cpu {

// Threads to use: requested > 0, else NSA_NUM_THREADS, else hardware_concurrency (at least 1).
int resolve_num_threads(int requested);

// Runs fn(task, worker) for task in [0, n_tasks) on up to n_threads workers (worker in [0, n_workers), 0 being the
// calling thread); returns the number of workers used. If fn throws, no further task is started and the first
// exception is rethrown here once every worker has stopped.
int parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t task, int worker)>& fn);

// Like parallel_for, but a worker takes runs of up to `chunk` consecutive tasks at a time and calls
// fn(begin, end, worker) once per run, so it knows which task comes next (to prefetch its data).
// The runs shrink to single tasks towards the end, keeping the workers' finish times close.
int parallel_for_runs(int64_t n_tasks, int n_threads, int64_t chunk,
                      const std::function<void(int64_t begin, int64_t end, int worker)>& fn);

// Like parallel_for, but worker w first runs its own share of the tasks, the contiguous range
// [w * n_tasks / n_workers, (w + 1) * n_tasks / n_workers), in increasing order, and then takes the tasks left at
// the ends of the other workers' ranges. Repeated calls of the same shape thus give each worker (and so, while the
// threads stay on their cores, each core) mostly the same tasks, whose outputs are still in its own cache: writing a
// line last written by another core costs a transfer between the cores (4 MB written by 2 threads of a Zen 5 VM:
// 40 us per pass when each thread writes the same half every time, 58 us when the halves swap).
int parallel_for_owned(int64_t n_tasks, int n_threads, const std::function<void(int64_t task, int worker)>& fn);

}  // namespace nsa::cpu
