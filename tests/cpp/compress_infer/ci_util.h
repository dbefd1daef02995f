// Test support for npu_nsa_compress_infer (docs/spec/decode.md §2): a case owning logical fp64 values of the paged
// input [num_pages][P][N][D], the weight [l][N] and the cache [num_slots][N][D] (representable in the case's dtype),
// the block table, slots and lengths; materialized with an optional inner step (every other element: the last
// dimension strided, the gaps filled with NaN so that a backend reading them is caught); a runner for the reference
// and the CPU backend; and an independent fp64 model (the window read token by token through the block table).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/test_tensors.h"
#include "nsa/compress_infer.h"

namespace nsa_ci_test {

using nsa::CpuIsa;
using nsa::DType;
using nsa::Status;
using nsa_test::round_to;

enum class Backend { kReference, kCpu };

struct CICase {
  DType dtype = DType::kF32;
  int64_t num_pages = 1, P = 1, N = 1, D = 1, l = 1, d = 1, num_slots = 1;
  std::vector<int64_t> lens;              // S_b
  std::vector<std::vector<int32_t>> table;  // [B][max_pages]
  std::vector<int32_t> slots;             // [B]
  std::vector<double> input, weight, cache;  // logical values
  int64_t step = 1;                       // inner step of input and cache (1: contiguous)

  int64_t B() const { return static_cast<int64_t>(lens.size()); }
  int64_t max_pages() const { return table.empty() ? 0 : static_cast<int64_t>(table[0].size()); }
  void resize() {
    input.assign(static_cast<size_t>(num_pages * P * N * D), 0.0);
    weight.assign(static_cast<size_t>(l * N), 0.0);
    cache.assign(static_cast<size_t>(num_slots * N * D), 0.0);
  }
  double& x(int64_t page, int64_t row, int64_t n, int64_t j) {
    return input[static_cast<size_t>(((page * P + row) * N + n) * D + j)];
  }
  double& w(int64_t i, int64_t n) { return weight[static_cast<size_t>(i * N + n)]; }
  // uniform values in [lo, hi) rounded to the dtype; the cache gets distinct sentinels
  void fill_uniform(std::mt19937& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (double& v : input) v = round_to(dtype, u(rng));
    for (double& v : weight) v = round_to(dtype, u(rng));
    for (size_t i = 0; i < cache.size(); ++i) v_cache(i) = round_to(dtype, 1000.0 + static_cast<double>(i % 97));
  }
  double& v_cache(size_t i) { return cache[i]; }
};

// Element bytes of the dtype.
inline size_t esz(DType dt) { return nsa::dtype_size(dt); }

// A case's buffers in its dtype and the params pointing at them.
struct Bound {
  std::vector<unsigned char> input, weight, cache;
  std::vector<int32_t> table, slots;
  nsa::CompressInferParams p;
};

inline void bind(const CICase& cs, Bound& bd) {
  const size_t e = esz(cs.dtype);
  const int64_t st = cs.step;
  bd.input.assign(cs.input.size() * static_cast<size_t>(st) * e, 0);
  for (size_t i = 0; i < cs.input.size() * static_cast<size_t>(st); ++i)
    nsa::detail::store_f64(bd.input.data(), static_cast<int64_t>(i),
                           i % static_cast<size_t>(st) ? std::numeric_limits<double>::quiet_NaN()
                                                       : cs.input[i / static_cast<size_t>(st)],
                           cs.dtype);
  bd.weight.assign(cs.weight.size() * e, 0);
  for (size_t i = 0; i < cs.weight.size(); ++i)
    nsa::detail::store_f64(bd.weight.data(), static_cast<int64_t>(i), cs.weight[i], cs.dtype);
  bd.cache.assign(cs.cache.size() * static_cast<size_t>(st) * e, 0);
  for (size_t i = 0; i < cs.cache.size() * static_cast<size_t>(st); ++i)
    nsa::detail::store_f64(bd.cache.data(), static_cast<int64_t>(i),
                           i % static_cast<size_t>(st) ? -7.0 : cs.cache[i / static_cast<size_t>(st)], cs.dtype);
  bd.table.clear();
  for (const auto& r : cs.table) bd.table.insert(bd.table.end(), r.begin(), r.end());
  bd.slots = cs.slots;
  nsa::CompressInferParams& p = bd.p;
  p = nsa::CompressInferParams();
  p.dtype = cs.dtype;
  p.input = bd.input.data();
  const int64_t isz[4] = {cs.num_pages, cs.P, cs.N, cs.D};
  const int64_t istr[4] = {cs.P * cs.N * cs.D * st, cs.N * cs.D * st, cs.D * st, st};
  for (int i = 0; i < 4; ++i) {
    p.input_size[i] = isz[i];
    p.input_stride[i] = istr[i];
  }
  p.weight.data = bd.weight.data();
  p.weight.size[0] = cs.l;
  p.weight.size[1] = cs.N;
  p.weight.stride[0] = cs.N;
  p.weight.stride[1] = 1;
  p.cache = bd.cache.data();
  const int64_t csz[3] = {cs.num_slots, cs.N, cs.D};
  const int64_t cstr[3] = {cs.N * cs.D * st, cs.D * st, st};
  for (int i = 0; i < 3; ++i) {
    p.cache_size[i] = csz[i];
    p.cache_stride[i] = cstr[i];
  }
  p.slot_mapping = bd.slots.data();
  p.slot_mapping_size = static_cast<int64_t>(bd.slots.size());
  p.block_table = bd.table.data();
  p.block_table_rows = cs.B();
  p.block_table_cols = cs.max_pages();
  p.block_table_row_stride = cs.max_pages();
  p.compress_block_size = cs.l;
  p.compress_stride = cs.d;
  p.page_block_size = cs.P;
  p.actual_seq_len = nsa::IntList{cs.lens.data(), cs.B()};
}

inline Status run_backend(const nsa::CompressInferParams& p, Backend be, CpuIsa isa = CpuIsa::kScalar, int threads = 1) {
  if (be == Backend::kReference) return nsa::compress_infer_reference(p);
  return nsa::compress_infer_cpu(p, nsa::CpuOptions{static_cast<int>(isa), threads});
}

// The cache bytes after one run of a backend.
struct CIRun {
  Status status;
  std::vector<unsigned char> cache;
};
inline CIRun run(const CICase& cs, Backend be, CpuIsa isa = CpuIsa::kScalar, int threads = 1) {
  Bound bd;
  bind(cs, bd);
  CIRun r;
  r.status = run_backend(bd.p, be, isa, threads);
  r.cache = bd.cache;
  return r;
}

// Logical cache element (slot, n, j) of a run's bytes.
inline double cache_at(const CICase& cs, const CIRun& r, int64_t slot, int64_t n, int64_t j) {
  return nsa::detail::load_f64(r.cache.data(), ((slot * cs.N + n) * cs.D + j) * cs.step, cs.dtype);
}

// The independent fp64 model of §2: exact window sums (products and sums in double), as the cache after the call.
// Returns, per element, the exact value (before the final rounding) and the bound of the fp32 accumulation error.
struct Model {
  std::vector<double> exact, err;  // [num_slots][N][D]; err 0 for untouched rows
  std::vector<char> written;
};
inline Model model(const CICase& cs) {
  Model m;
  m.exact = cs.cache;
  m.err.assign(cs.cache.size(), 0.0);
  m.written.assign(cs.cache.size(), 0);
  const double eps = cs.dtype == DType::kF64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t S = cs.lens[static_cast<size_t>(b)];
    if (!(S >= cs.l && (S - cs.l) % cs.d == 0)) continue;
    for (int64_t n = 0; n < cs.N; ++n)
      for (int64_t j = 0; j < cs.D; ++j) {
        double s = 0, a = 0;
        for (int64_t t = S - cs.l; t < S; ++t) {  // raw positions of the window, page by page
          const int64_t page = cs.table[static_cast<size_t>(b)][static_cast<size_t>(t / cs.P)];
          const double term = cs.weight[static_cast<size_t>((t - (S - cs.l)) * cs.N + n)] *
                              cs.input[static_cast<size_t>(((page * cs.P + t % cs.P) * cs.N + n) * cs.D + j)];
          s += term;
          a += std::fabs(term);
        }
        const size_t o = static_cast<size_t>((cs.slots[static_cast<size_t>(b)] * cs.N + n) * cs.D + j);
        m.exact[o] = s;
        m.err[o] = 2.0 * static_cast<double>(cs.l) * eps * a;
        m.written[o] = 1;
      }
  }
  return m;
}

// §6: every written element within half an ulp of the dtype (the final rne) plus the fp32 accumulation bound of the
// exact sum; every other element unchanged.
inline ::testing::AssertionResult check_model(const CICase& cs, const CIRun& r) {
  const Model m = model(cs);
  for (int64_t s = 0; s < cs.num_slots; ++s)
    for (int64_t n = 0; n < cs.N; ++n)
      for (int64_t j = 0; j < cs.D; ++j) {
        const size_t o = static_cast<size_t>((s * cs.N + n) * cs.D + j);
        const double got = cache_at(cs, r, s, n, j);
        if (!m.written[o]) {
          if (got != cs.cache[o]) return ::testing::AssertionFailure() << "untouched cache[" << s << "," << n << "," << j << "] changed";
          continue;
        }
        const double tol = 0.5 * nsa_test::ulp_of(cs.dtype, m.exact[o]) + m.err[o] +
                           (cs.dtype == DType::kF64 ? 0 : 0.5 * nsa_test::ulp_of(cs.dtype, got));
        if (!(std::fabs(got - m.exact[o]) <= tol))
          return ::testing::AssertionFailure() << "cache[" << s << "," << n << "," << j << "] = " << got
                                               << ", model " << m.exact[o] << ", tolerance " << tol;
      }
  return ::testing::AssertionSuccess();
}

}  // namespace nsa_ci_test
