// Fork-join parallel loops of the CPU backends (internal), on a persistent pool of worker threads (threads.cpp):
// the workers are created once, on demand, and reused by every loop; a call made while another call holds the pool
// gets private workers; a loop started from inside a loop body runs inline on that thread. Tasks are handed out in
// index order through a counter owned by the call; which thread runs a task never changes a result, because each
// task writes its own outputs (docs/CONTRIBUTING.md rule 7: bitwise the same results for any thread count).
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

}  // namespace nsa::cpu
