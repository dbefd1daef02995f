// Minimal fork-join parallel loop for the CPU backend (internal). Each call starts its own workers,
// so concurrent calls from several caller threads never share state. Tasks are handed out in
// index order through an atomic counter; which thread runs a task never changes a result, because
// each task writes its own outputs (docs/CONTRIBUTING.md rule 7).
#pragma once

#include <cstdint>
#include <functional>

namespace nsa::cpu {

// Threads to use: requested > 0, else NSA_NUM_THREADS, else hardware_concurrency (at least 1).
int resolve_num_threads(int requested);

// Runs fn(task, worker) for task in [0, n_tasks) on up to n_threads workers (worker in
// [0, n_workers)); returns the number of workers used. fn must not throw.
int parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t task, int worker)>& fn);

// Like parallel_for, but a worker takes runs of up to `chunk` consecutive tasks at a time and calls
// fn(begin, end, worker) once per run, so it knows which task comes next (to prefetch its data).
// The runs shrink to single tasks towards the end, keeping the workers' finish times close.
int parallel_for_runs(int64_t n_tasks, int n_threads, int64_t chunk,
                      const std::function<void(int64_t begin, int64_t end, int worker)>& fn);

}  // namespace nsa::cpu
