// Optimized CPU backend of the compression operator (docs/spec/compress.md §4, §6).
//
// Forward: tasks of consecutive compressed rows of one batch (all heads). Output element (r, n, j) is the
// weighted sum of the window's l input rows, added in the order w = 0, 1, ..., l-1 (KernelTable::weighted_rows,
// vectorized over j), rounded half away from zero: the reference's order, so the result equals it bit for bit.
// A task's windows go in pairs (c, c + 1): KernelTable::weighted_rows2 reads each of their l + d rows once and adds
// it to both sums (bench-8k-keys, one Zen 5 thread: 0.25 -> 0.19 ms; bench-64k-keys, 2 threads: 1.51 -> 1.30 ms).
//
// Backward, one parallel pass over two kinds of tasks (the weight_grad chunks spread among the input_grad tasks):
//   input_grad  tokens of one batch, head by head. Gather formulation (§6): token p's element (n, j) is the
//               weighted sum of the grad rows of the windows covering p (at most ceil(l/d), by increasing c),
//               weight[p - c*d, n] as weights; no atomics, one writer per element, the reference's order. Runs of
//               consecutive tokens covered by the same windows share those grad rows, widened to fp32 once per
//               head and task (kept in ceil(l/d) + 1 slots: consecutive runs share all but one window), their
//               weights read in place (KernelTable::weighted_rows_shared).
//   weight_grad fixed chunks of compressed rows (their number depends on R only, at most kWgMaxChunks). For each
//               (n, w), 16 partial sums: lane k adds grad[r, n, j] * input[start_b + c*d + w, n, j] for the
//               chunk's rows r = (b, c) in increasing order and, within a row, j = k, k+16, ... in increasing
//               order (KernelTable::dot_lanes; rows r and r + 1 of a batch in one pass over their l + d input rows,
//               KernelTable::dot_lanes2, the same sums); the chunk's partial is their canonical tree (kernels.h).
//               The partials are then summed in chunk order and rounded to nearest even.
// Both passes hand out their tasks with cpu::parallel_for_owned: each worker runs its own contiguous share first, so
// repeated calls of one shape write the same outputs from the same core (2 threads of a Zen 5, C++ calls on reused
// buffers: bench-8k-keys forward 0.100 -> 0.086 ms, backward 0.28 -> 0.21 ms; bench-8k-values backward 0.187 ->
// 0.155 ms; with the tasks handed out in index order the two workers' shares of the outputs changed from call to call).
// Results depend neither on the number of threads nor on the ISA path (kernels.h), only on the data. Extra
// memory: per worker l + d row pointers, N*l*16 partial sums, ceil(l/d) + 1 widened rows, and (for views whose last
// dimension is strided) (l+d+1)*D gathered elements; plus kWgMaxChunks*N*l chunk sums.
//
// Memory traffic (the operator is memory-bound): the forward reads each input row once from memory (a window
// re-reads the l - d rows it shares with its predecessor from cache) and writes the R output rows; the backward
// reads input and grad and writes input_grad (T rows) and weight_grad. Calls whose input is larger than
// CpuTuning::stream_bytes read each task's input rows in one sequential pass first (stream_in).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "common/aligned_buffer.h"
#include "common/numeric.h"
#include "common/threads.h"
#include "cpu/isa.h"
#include "ops/compress/batches.h"
#include "ops/compress/cpu_tuning.h"
#include "ops/compress/kernels.h"
#include "ops/compress/rounding.h"

namespace nsa {
namespace {

using compress_detail::Batch;
using compress_kernels::KernelTable;
using compress_kernels::Round;

constexpr int64_t kWgMaxChunks = 64;  // weight_grad: most chunks of compressed rows (fixed by R)
constexpr int64_t kWgMinRows = 8;     // weight_grad: fewest rows per chunk

std::atomic<int64_t> g_task_bytes{compress_detail::CpuTuning().task_bytes};
std::atomic<int64_t> g_bytes_per_worker{compress_detail::CpuTuning().bytes_per_worker};
std::atomic<int64_t> g_stream_bytes{compress_detail::CpuTuning().stream_bytes};
std::atomic<int64_t> g_stream_task_bytes{compress_detail::CpuTuning().stream_task_bytes};
std::atomic<int64_t> g_stream_out_bytes{compress_detail::CpuTuning().stream_out_bytes};

// D contiguous elements of (row t, head n) of a view: the tensor's memory when its last dimension is contiguous,
// else a copy in `gather` (D elements).
inline const void* row_ptr(const Tensor3& x, int64_t t, int64_t n, int64_t D, int64_t esz, unsigned char* gather) {
  const unsigned char* base = static_cast<const unsigned char*>(x.data) + (t * x.stride[0] + n * x.stride[1]) * esz;
  if (x.stride[2] == 1) return base;
  const int64_t step = x.stride[2] * esz;
  for (int64_t j = 0; j < D; ++j) std::memcpy(gather + j * esz, base + j * step, static_cast<size_t>(esz));
  return gather;
}

// Reads one byte of every 64-byte line of the (row, head) spans of input rows [t0, t1) of x (views whose last
// dimension is contiguous; others are gathered row by row and skipped): the rows a task is about to walk window by
// window, head by head (a strided order the hardware prefetchers follow poorly from memory), come into the caches as
// one sequential stream first. bench-64k-keys forward (50 MB of input), 2 threads of the development machine (a 2-core
// Zen 4 VM): about 5 ms without, 3.5-4.5 ms with (the software prefetches below alone: no change); the backward's
// weight_grad, 1 thread: 17 -> 15 ms (2 threads: no change). The loads are volatile, so the compiler keeps them.
void stream_in(const Tensor3& x, int64_t t0, int64_t t1, int64_t N, int64_t D, int64_t esz) {
  if (x.stride[2] != 1 || t1 <= t0) return;
  const unsigned char* base = static_cast<const unsigned char*>(x.data);
  const bool packed = x.stride[1] == D;  // a row's heads are one span of N*D elements
  const int64_t span = (packed ? N : 1) * D * esz;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t n = 0; n < (packed ? 1 : N); ++n) {
      const unsigned char* a = base + (t * x.stride[0] + n * x.stride[1]) * esz;
      const unsigned char* e = a + span;
      (void)*reinterpret_cast<const volatile unsigned char*>(a);
      for (a = reinterpret_cast<const unsigned char*>((reinterpret_cast<uintptr_t>(a) | 63) + 1); a < e; a += 64)
        (void)*reinterpret_cast<const volatile unsigned char*>(a);
    }
}

// Distance of the prefetches: input rows are requested kPrefetchWindows windows (kPrefetchWindows * d rows) before
// their window is summed; the kernels interleave these prefetches with the sums. The windows walk the rows in a
// strided pattern (one head's D elements of each row, then the next head) that the hardware prefetchers follow
// poorly from memory (bench-64k-keys forward on one thread of the development machine, a shared 2-core Zen 4 VM:
// 8-16 ms without, 7-8.5 ms with it; no change within the caches).
// The backward's weight_grad issues none: large inputs are streamed in (stream_in) and small ones are in the caches,
// where they only cost issue slots (Zen 5, bench-8k-keys 1 thread: 0.505 -> 0.485 ms without; bench-64k-keys
// 2 threads: 3.22 -> 3.12 ms; 1 thread: 6.1 -> 5.8 ms).
constexpr int64_t kPrefetchWindows = 2;

// The byte distance for rows of view x (0: none, for views whose rows are gathered).
int64_t prefetch_distance(const Tensor3& x, int64_t d, int64_t esz) {
  return x.stride[2] == 1 ? kPrefetchWindows * d * x.stride[0] * esz : 0;
}

// ------------------------------------------------------------------ fp64 kernels (no rounding, §4)
// The same orders as the fp32 KernelTable functions, in double.
void weighted_rows_f64(const void* const* rows, const double* wts, int64_t m, int64_t D, void* out_v) {
  double* out = static_cast<double*>(out_v);
  for (int64_t j = 0; j < D; ++j) out[j] = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    const double* r = static_cast<const double*>(rows[i]);
    const double w = wts[i];
    for (int64_t j = 0; j < D; ++j) out[j] = out[j] + w * r[j];
  }
}

void weighted_rows_shared_f64(const double* const* rows, const double* const* wts, int64_t P, int64_t m, int64_t D,
                              void* out_v, int64_t out_stride) {
  for (int64_t p = 0; p < P; ++p) {
    double* out = static_cast<double*>(out_v) + p * out_stride;
    for (int64_t j = 0; j < D; ++j) out[j] = 0.0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < D; ++j) out[j] = out[j] + wts[i][p] * rows[i][j];
  }
}

void dot_lanes_f64(const double* g, const void* const* rows, int64_t m, int64_t D, double* lanes) {
  for (int64_t i = 0; i < m; ++i) {
    const double* r = static_cast<const double*>(rows[i]);
    double* lane = lanes + i * 16;
    for (int64_t j = 0; j < D; ++j) lane[j % 16] = lane[j % 16] + g[j] * r[j];
  }
}

// Per-call state shared by the tasks.
struct Plan {
  DType dt = DType::kBF16;
  CompressShape sh;
  int64_t esz = 2;
  bool f64 = false;
  std::vector<Batch> batches;
  const KernelTable* kt = nullptr;
  std::vector<float> wt32;   // [N][l]: weight[w, n] widened, per head contiguous
  std::vector<double> wt64;  // the same for fp64 inputs
  int threads = 1;
};

Status make_plan(const CompressParams& p, const CompressShape& sh, const CpuOptions& options, Plan* pl) {
  CpuIsa isa;
  const Status st = cpu::resolve_isa(options.isa, &isa);
  if (!st.ok()) return st;
  pl->dt = p.dtype;
  pl->sh = sh;
  pl->esz = static_cast<int64_t>(dtype_size(p.dtype));
  pl->f64 = p.dtype == DType::kF64;
  pl->kt = compress_kernels::kernels_for(isa);
  pl->batches = compress_detail::make_batches(p.actual_seq_len, sh.l, sh.d);
  pl->threads = cpu::resolve_num_threads(options.num_threads);
  const size_t wn = static_cast<size_t>(sh.N * sh.l);
  if (pl->f64) pl->wt64.resize(wn);
  else pl->wt32.resize(wn);
  for (int64_t w = 0; w < sh.l; ++w)
    for (int64_t n = 0; n < sh.N; ++n) {
      const int64_t off = w * p.weight.stride[0] + n * p.weight.stride[1];
      if (pl->f64) pl->wt64[static_cast<size_t>(n * sh.l + w)] = static_cast<const double*>(p.weight.data)[off];
      else pl->wt32[static_cast<size_t>(n * sh.l + w)] = detail::load_f32(p.weight.data, off, p.dtype);
    }
  return Status::Ok();
}

// Worker threads for a call moving `bytes`: enough work per started thread to pay for starting it.
int workers_for(const Plan& pl, int64_t bytes, int64_t tasks) {
  const int64_t by_size = std::max<int64_t>(1, bytes / std::max<int64_t>(1, g_bytes_per_worker.load()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(pl.threads), by_size, tasks})));
}

// Per-worker scratch (allocated before any output is written), every array in cache lines of its own
// (detail::LineVector): the workers store to theirs all the time.
struct Scratch {
  detail::LineVector<const void*> rows;      // row pointers (a window's l rows)
  detail::LineVector<float> rows32, g32, lanes32;
  detail::LineVector<double> rows64, g64, lanes64;
  detail::LineVector<const float*> rowp32, wtp32;  // input_grad: the m widened grad rows of a run and their weights
  detail::LineVector<const double*> rowp64, wtp64;
  detail::LineVector<int64_t> slot_row;            // input_grad: the grad row held by each slot of rows32 / rows64
  detail::LineVector<unsigned char> gather;  // rows of views whose last dimension is strided
  int64_t D = 0, esz = 0;
  unsigned char* gather_row(int64_t i) { return gather.empty() ? nullptr : gather.data() + i * D * esz; }
};

// s.rows[u] = row_ptr of input rows t0 + u, u < span, head n: computed once from the row step where the last
// dimension is contiguous, gathered row by row otherwise.
inline void window_rows(const Tensor3& x, int64_t t0, int64_t span, int64_t n, int64_t D, int64_t esz, Scratch& s) {
  if (x.stride[2] == 1) {
    const unsigned char* base = static_cast<const unsigned char*>(x.data) + (t0 * x.stride[0] + n * x.stride[1]) * esz;
    const int64_t step = x.stride[0] * esz;
    const void** rows = s.rows.data();
    for (int64_t u = 0; u < span; ++u) rows[u] = base + u * step;
    return;
  }
  for (int64_t u = 0; u < span; ++u) s.rows[static_cast<size_t>(u)] = row_ptr(x, t0 + u, n, D, esz, s.gather_row(u));
}

// A task: items [i0, i1) of batch b (forward: its compressed rows; backward: its tokens).
struct Task {
  int64_t b, i0, i1;
};

// Each batch's `count` items (Batch::C rows or Batch::S tokens) cut into runs of `per_task` (the last one shorter),
// batch after batch.
inline std::vector<Task> split_batches(const std::vector<Batch>& batches, int64_t Batch::*count, int64_t per_task) {
  std::vector<Task> tasks;
  for (size_t b = 0; b < batches.size(); ++b) {
    const int64_t n = batches[b].*count;
    for (int64_t i0 = 0; i0 < n; i0 += per_task)
      tasks.push_back({static_cast<int64_t>(b), i0, std::min(n, i0 + per_task)});
  }
  return tasks;
}

// ------------------------------------------------------------------ forward
Status forward(const CompressParams& p, const CpuOptions& options) {
  CompressShape sh;
  Status st = validate_compress(p, &sh);
  if (!st.ok()) return st;
  Plan pl;
  if (!(st = make_plan(p, sh, options, &pl)).ok()) return st;
  if (sh.R == 0) return Status::Ok();  // §5: no windows, empty output
  const int64_t l = sh.l, d = sh.d, N = sh.N, D = sh.D, esz = pl.esz;

  // tasks: (batch, first row, end row), about CpuTuning::task_bytes (stream_task_bytes when streaming) of new input
  // each (d rows per compressed row)
  const bool stream = sh.T * N * D * esz > g_stream_bytes.load();
  const int64_t per_row = std::max<int64_t>(1, d * N * D * esz);
  const int64_t rows_per_task =
      std::max<int64_t>(1, (stream ? g_stream_task_bytes.load() : g_task_bytes.load()) / per_row);
  const std::vector<Task> tasks = split_batches(pl.batches, &Batch::C, rows_per_task);
  const int64_t bytes = (sh.T + sh.R) * N * D * esz;
  const int workers = workers_for(pl, bytes, static_cast<int64_t>(tasks.size()));
  const bool strided = p.input.stride[2] != 1;
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  for (Scratch& s : scratch) {
    s.D = D;
    s.esz = esz;
    s.rows.resize(static_cast<size_t>(l + d));
    if (strided) s.gather.resize(static_cast<size_t>((l + d) * D * esz));
  }

  unsigned char* out = static_cast<unsigned char*>(p.output);
  cpu::parallel_for_owned(static_cast<int64_t>(tasks.size()), workers, [&](int64_t ti, int worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    const Task& tk = tasks[static_cast<size_t>(ti)];
    const Batch& bt = pl.batches[static_cast<size_t>(tk.b)];
    const int64_t pf = prefetch_distance(p.input, d, esz);
    if (stream) stream_in(p.input, bt.start + tk.i0 * d, bt.start + (tk.i1 - 1) * d + l, N, D, esz);
    // windows c and c + 1 together where both are in the task (rows [t0, t0 + l + d) read once for both)
    for (int64_t c = tk.i0; c < tk.i1;) {
      const bool two = c + 1 < tk.i1;
      const int64_t span = two ? l + d : l;
      for (int64_t n = 0; n < N; ++n) {
        // §4: window c covers input rows [start_b + c*d, start_b + c*d + l)
        const int64_t t0 = bt.start + c * d;
        window_rows(p.input, t0, span, n, D, esz, s);
        const float* wts = pl.wt32.data() + n * l;
        unsigned char* dst = out + ((bt.row_begin + c) * N + n) * D * esz;  // §3: output row R_b + c
        unsigned char* dst_next = dst + N * D * esz;                         // R_b + c + 1
        if (pl.f64) {
          weighted_rows_f64(s.rows.data(), pl.wt64.data() + n * l, l, D, dst);
          if (two) weighted_rows_f64(s.rows.data() + d, pl.wt64.data() + n * l, l, D, dst_next);
        } else if (two) {
          pl.kt->weighted_rows2(pl.dt, s.rows.data(), wts, l, d, D, dst, dst_next, Round::kAway, pf);
        } else {
          pl.kt->weighted_rows(pl.dt, s.rows.data(), wts, l, D, dst, Round::kAway, pf);
        }
      }
      c += two ? 2 : 1;
    }
  });
  return Status::Ok();
}

// ------------------------------------------------------------------ backward
Status backward(const CompressGradParams& g, const CpuOptions& options) {
  CompressShape sh;
  Status st = validate_compress_backward(g, &sh);
  if (!st.ok()) return st;
  const CompressParams& p = g.fwd;
  Plan pl;
  if (!(st = make_plan(p, sh, options, &pl)).ok()) return st;
  const int64_t l = sh.l, d = sh.d, N = sh.N, D = sh.D, esz = pl.esz, R = sh.R;
  const int64_t max_cover = (l + d - 1) / d;  // windows covering one token (§5)
  // input_grad: widened grad rows are kept in max_cover + 1 slots (slot = row % slots), so that each is widened once
  // per head and task although consecutive runs share all but one of their windows
  const int64_t slots = max_cover + 1;
  constexpr int64_t kMaxRun = 64;             // tokens per weighted_rows_shared call

  // weight_grad chunks: a function of R only (not of the thread count)
  const int64_t chunk_rows = std::max(kWgMinRows, (R + kWgMaxChunks - 1) / kWgMaxChunks);
  const int64_t n_chunks = (R + chunk_rows - 1) / chunk_rows;
  std::vector<float> part32(pl.f64 ? 0 : static_cast<size_t>(n_chunks * N * l));
  std::vector<double> part64(pl.f64 ? static_cast<size_t>(n_chunks * N * l) : 0);
  // batches that own rows, for the chunks' row -> batch lookup
  std::vector<const Batch*> owners;
  for (const Batch& bt : pl.batches)
    if (bt.C > 0) owners.push_back(&bt);

  // input_grad tasks: (batch, first token, end token), about CpuTuning::task_bytes of output each
  const int64_t tokens_per_task = std::max<int64_t>(1, g_task_bytes.load() / std::max<int64_t>(1, N * D * esz));
  const std::vector<Task> tasks = split_batches(pl.batches, &Batch::S, tokens_per_task);
  const int64_t n_tasks = n_chunks + static_cast<int64_t>(tasks.size());
  const bool stream = sh.T * N * D * esz > g_stream_bytes.load();
  const int64_t stream_rows = std::max<int64_t>(1, g_stream_task_bytes.load() / std::max<int64_t>(1, d * N * D * esz));
  const int64_t bytes = (2 * sh.T + 2 * R) * N * D * esz;
  const int workers = workers_for(pl, bytes, n_tasks);
  const bool strided = p.input.stride[2] != 1 || g.grad.stride[2] != 1;
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  for (Scratch& s : scratch) {
    s.D = D;
    s.esz = esz;
    s.rows.resize(static_cast<size_t>(l + d));
    const size_t nc = static_cast<size_t>(max_cover), nr = static_cast<size_t>(slots * D),
                 nl = static_cast<size_t>(N * l * 16);
    s.slot_row.resize(static_cast<size_t>(slots));
    if (pl.f64) {
      s.rowp64.resize(nc), s.wtp64.resize(nc), s.rows64.resize(nr), s.g64.resize(static_cast<size_t>(D));
      s.lanes64.resize(nl);
    } else {
      s.rowp32.resize(nc), s.wtp32.resize(nc), s.rows32.resize(nr), s.g32.resize(static_cast<size_t>(2 * D));
      s.lanes32.resize(nl);
    }
    if (strided) s.gather.resize(static_cast<size_t>((l + d + 1) * D * esz));
  }

  unsigned char* in_grad = static_cast<unsigned char*>(g.input_grad);
  // input_grad by non-temporal stores (CpuTuning::stream_out_bytes): every row of every head starts on a 64-byte line
  const bool stream_out = !pl.f64 && sh.T * N * D * esz > g_stream_out_bytes.load() &&
                          reinterpret_cast<uintptr_t>(in_grad) % 64 == 0 && (D * esz) % 64 == 0;
  // task order: the weight_grad chunks (which read the input) spread evenly among the input_grad tasks (which write
  // input_grad), so that the workers read and write memory at the same time instead of in two phases
  // (bench-64k-keys, 2 threads of a Zen 5: 3.57 -> 3.24 ms)
  std::vector<int64_t> order(static_cast<size_t>(n_tasks));
  {
    int64_t c = 0, i = 0;
    for (int64_t k = 0; k < n_tasks; ++k) {
      const bool chunk_next = i >= n_tasks - n_chunks || (c < n_chunks && c * (n_tasks - n_chunks) <= i * n_chunks);
      order[static_cast<size_t>(k)] = chunk_next ? c++ : n_chunks + i++;
    }
  }
  cpu::parallel_for_owned(n_tasks, workers, [&](int64_t task, int worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    const int64_t ti = order[static_cast<size_t>(task)];
    if (ti < n_chunks) {
      // ---- weight_grad partial of rows [r0, r1): 16 lanes per (n, w), accumulated row after row, then reduced
      const int64_t r0 = ti * chunk_rows, r1 = std::min(R, r0 + chunk_rows);
      if (pl.f64) std::fill(s.lanes64.begin(), s.lanes64.end(), 0.0);
      else std::fill(s.lanes32.begin(), s.lanes32.end(), 0.0f);
      size_t ob = static_cast<size_t>(std::upper_bound(owners.begin(), owners.end(), r0,
                                                       [](int64_t r, const Batch* b) { return r < b->row_begin; }) -
                                      owners.begin()) - 1;
      int64_t streamed_to = r0;  // rows [r0, streamed_to) have had their windows streamed in
      // rows r and r + 1 together where both are in the chunk and the batch (their l + d input rows read once)
      for (int64_t r = r0; r < r1;) {
        while (r >= owners[ob]->row_begin + owners[ob]->C) ++ob;
        const Batch& bt = *owners[ob];
        const bool two = r + 1 < std::min(r1, bt.row_begin + bt.C);
        const int64_t t0 = bt.start + (r - bt.row_begin) * d;  // window of row r: input rows [t0, t0 + l)
        if (stream && r + (two ? 1 : 0) >= streamed_to) {  // the windows of the next rows of this batch
          streamed_to = std::min({r1, bt.row_begin + bt.C, r + std::max<int64_t>(2, stream_rows)});
          stream_in(p.input, t0, t0 + (streamed_to - 1 - r) * d + l, N, D, esz);
        }
        const int64_t span = two ? l + d : l;
        unsigned char* grad_copy = s.gather_row(l + d);
        for (int64_t n = 0; n < N; ++n) {
          window_rows(p.input, t0, span, n, D, esz, s);
          if (pl.f64) {
            double* lanes = s.lanes64.data() + n * l * 16;
            for (int64_t k = 0; k < (two ? 2 : 1); ++k) {  // row r, then row r + 1 (window rows from d on)
              std::memcpy(s.g64.data(), row_ptr(g.grad, r + k, n, D, esz, grad_copy), static_cast<size_t>(D) * sizeof(double));
              dot_lanes_f64(s.g64.data(), s.rows.data() + k * d, l, D, lanes);
            }
          } else {
            float* lanes = s.lanes32.data() + n * l * 16;
            pl.kt->widen(pl.dt, row_ptr(g.grad, r, n, D, esz, grad_copy), D, s.g32.data());
            if (two) {
              pl.kt->widen(pl.dt, row_ptr(g.grad, r + 1, n, D, esz, grad_copy), D, s.g32.data() + D);
              pl.kt->dot_lanes2(pl.dt, s.g32.data(), s.g32.data() + D, s.rows.data(), l, d, D, lanes);
            } else {
              pl.kt->dot_lanes(pl.dt, s.g32.data(), s.rows.data(), l, D, lanes);
            }
          }
        }
        r += two ? 2 : 1;
      }
      for (int64_t i = 0; i < N * l; ++i) {
        if (pl.f64) part64[static_cast<size_t>(ti * N * l + i)] = compress_kernels::canonical16(s.lanes64.data() + i * 16);
        else part32[static_cast<size_t>(ti * N * l + i)] = compress_kernels::canonical16(s.lanes32.data() + i * 16);
      }
      return;
    }
    // ---- input_grad of tokens [p0, p1) of one batch, head by head, in runs of tokens covered by the same windows
    const Task& tk = tasks[static_cast<size_t>(ti - n_chunks)];
    const Batch& bt = pl.batches[static_cast<size_t>(tk.b)];
    // windows cover the batch's positions [0, covered) without a gap (d <= l); the others receive +0 (§5)
    const int64_t covered = bt.C > 0 ? (bt.C - 1) * d + l : 0;
    const int64_t p_end = std::min(tk.i1, std::max(tk.i0, covered));
    if (p_end < tk.i1)
      std::memset(in_grad + (bt.start + p_end) * N * D * esz, 0, static_cast<size_t>((tk.i1 - p_end) * N * D * esz));
    for (int64_t n = 0; n < N; ++n) {
      std::fill(s.slot_row.begin(), s.slot_row.end(), int64_t{-1});
      for (int64_t pos = tk.i0; pos < p_end;) {
        int64_t first, last;
        compress_detail::covering_windows(pos, bt.C, l, d, &first, &last);
        const int64_t end = std::min({p_end, pos + kMaxRun, compress_detail::covering_run_end(pos, l, d)});
        const int64_t m = last - first + 1;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t row = bt.row_begin + first + i;
          const int64_t slot = row % slots;
          const int64_t widx = n * l + pos - (first + i) * d;  // weight of token pos in window first + i
          const bool fresh = s.slot_row[static_cast<size_t>(slot)] != row;
          s.slot_row[static_cast<size_t>(slot)] = row;
          if (pl.f64) {
            double* dst_row = s.rows64.data() + slot * D;
            if (fresh) std::memcpy(dst_row, row_ptr(g.grad, row, n, D, esz, s.gather_row(0)), static_cast<size_t>(D) * 8);
            s.rowp64[static_cast<size_t>(i)] = dst_row;
            s.wtp64[static_cast<size_t>(i)] = pl.wt64.data() + widx;
          } else {
            float* dst_row = s.rows32.data() + slot * D;
            if (fresh) pl.kt->widen(pl.dt, row_ptr(g.grad, row, n, D, esz, s.gather_row(0)), D, dst_row);
            s.rowp32[static_cast<size_t>(i)] = dst_row;
            s.wtp32[static_cast<size_t>(i)] = pl.wt32.data() + widx;
          }
        }
        unsigned char* dst = in_grad + ((bt.start + pos) * N + n) * D * esz;
        if (pl.f64) weighted_rows_shared_f64(s.rowp64.data(), s.wtp64.data(), end - pos, m, D, dst, N * D);
        else pl.kt->weighted_rows_shared(pl.dt, s.rowp32.data(), s.wtp32.data(), end - pos, m, D, dst, N * D,
                                         Round::kEven, stream_out);
        pos = end;
      }
    }
    if (stream_out) pl.kt->store_fence();  // before the task is reported done (and its rows read by another thread)
  });

  // weight_grad[w, n] = rne_T(sum of the chunks' partials, in chunk order) (§6)
  for (int64_t w = 0; w < l; ++w)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = w * N + n;
      if (pl.f64) {
        double acc = 0.0;
        for (int64_t k = 0; k < n_chunks; ++k) acc = acc + part64[static_cast<size_t>(k * N * l + n * l + w)];
        static_cast<double*>(g.weight_grad)[o] = acc;
      } else {
        float acc = 0.0f;
        for (int64_t k = 0; k < n_chunks; ++k) acc = acc + part32[static_cast<size_t>(k * N * l + n * l + w)];
        switch (pl.dt) {
          case DType::kBF16: static_cast<uint16_t*>(g.weight_grad)[o] = compress_detail::f32_to_bf16_rne(acc); break;
          case DType::kF16: static_cast<uint16_t*>(g.weight_grad)[o] = compress_detail::f32_to_f16_rne(acc); break;
          default: static_cast<float*>(g.weight_grad)[o] = acc; break;
        }
      }
    }
  return Status::Ok();
}

}  // namespace

namespace compress_detail {
CpuTuning cpu_tuning() {
  CpuTuning t;
  t.task_bytes = g_task_bytes.load();
  t.bytes_per_worker = g_bytes_per_worker.load();
  t.stream_bytes = g_stream_bytes.load();
  t.stream_task_bytes = g_stream_task_bytes.load();
  t.stream_out_bytes = g_stream_out_bytes.load();
  return t;
}
void set_cpu_tuning(const CpuTuning& t) {
  g_task_bytes.store(t.task_bytes);
  g_bytes_per_worker.store(t.bytes_per_worker);
  g_stream_bytes.store(t.stream_bytes);
  g_stream_task_bytes.store(t.stream_task_bytes);
  g_stream_out_bytes.store(t.stream_out_bytes);
}
}  // namespace compress_detail

Status compress_cpu(const CompressParams& p, const CpuOptions& options) {
  try {
    return forward(p, options);
  } catch (const std::bad_alloc&) {
    return Status::Error("compress_cpu: out of memory for the backend's scratch buffers");
  }
}

Status compress_backward_cpu(const CompressGradParams& p, const CpuOptions& options) {
  try {
    return backward(p, options);
  } catch (const std::bad_alloc&) {
    return Status::Error("compress_backward_cpu: out of memory for the backend's scratch buffers");
  }
}

}  // namespace nsa
