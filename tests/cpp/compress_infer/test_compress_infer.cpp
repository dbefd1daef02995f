// npu_nsa_compress_infer (docs/spec/decode.md §2): the §5 worked example by hand, the rne rounding, the CPU backend
// on every ISA path and thread count bit for bit against the reference and within §6 of the fp64 model, and every
// argument rule with its message and nothing written.
#include <algorithm>
#include <numeric>
#include <string>

#include "compress_infer/ci_util.h"

namespace nsa_ci_test {
namespace {

using nsa_test::kAllDtypes;
using nsa_test::supported_isas;

// Every backend and path the host runs: (backend, isa, threads).
struct Path {
  Backend be;
  CpuIsa isa;
  int threads;
};
std::vector<Path> all_paths() {
  std::vector<Path> out{{Backend::kReference, CpuIsa::kScalar, 1}};
  for (CpuIsa isa : supported_isas())
    for (int t : {1, 3}) out.push_back({Backend::kCpu, isa, t});
  return out;
}

// §5 "Compression": P = 64, l = 32, d = 16, B = 3, lengths [80, 81, 20], block_table [[5, 2], [7, 1], [3, 0]],
// slots [10, 11, 12]. Small integers: every sum is exact, so the expected cache row is computed by hand.
CICase worked_example(DType dt) {
  CICase cs;
  cs.dtype = dt;
  cs.num_pages = 8;
  cs.P = 64;
  cs.N = 2;
  cs.D = 3;
  cs.l = 32;
  cs.d = 16;
  cs.num_slots = 16;
  cs.lens = {80, 81, 20};
  cs.table = {{5, 2}, {7, 1}, {3, 0}};
  cs.slots = {10, 11, 12};
  cs.resize();
  for (int64_t pg = 0; pg < cs.num_pages; ++pg)
    for (int64_t r = 0; r < cs.P; ++r)
      for (int64_t n = 0; n < cs.N; ++n)
        for (int64_t j = 0; j < cs.D; ++j) cs.x(pg, r, n, j) = static_cast<double>((pg * 7 + r + 3 * n + j) % 9 - 4);
  for (int64_t w = 0; w < cs.l; ++w)
    for (int64_t n = 0; n < cs.N; ++n) cs.w(w, n) = static_cast<double>((w + 2 * n) % 5 - 2);
  for (size_t i = 0; i < cs.cache.size(); ++i) cs.cache[i] = 100.0 + static_cast<double>(i % 50);
  return cs;
}

TEST(CompressInferHand, WorkedExampleOnEveryPath) {
  for (DType dt : kAllDtypes) {
    const CICase cs = worked_example(dt);
    // batch 0: tokens 48..63 from page 5 rows 48..63, 64..79 from page 2 rows 0..15
    std::vector<double> want(static_cast<size_t>(cs.N * cs.D));
    for (int64_t n = 0; n < cs.N; ++n)
      for (int64_t j = 0; j < cs.D; ++j) {
        double s = 0;
        for (int64_t w = 0; w < 16; ++w) s += cs.weight[w * cs.N + n] * cs.input[((5 * 64 + 48 + w) * cs.N + n) * cs.D + j];
        for (int64_t w = 16; w < 32; ++w) s += cs.weight[w * cs.N + n] * cs.input[((2 * 64 + w - 16) * cs.N + n) * cs.D + j];
        want[n * cs.D + j] = s;
      }
    for (const Path& pa : all_paths()) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " " + nsa::cpu_isa_name(pa.isa) + " threads " + std::to_string(pa.threads) +
                   (pa.be == Backend::kReference ? " reference" : " cpu"));
      const CIRun r = run(cs, pa.be, pa.isa, pa.threads);
      ASSERT_TRUE(r.status.ok()) << r.status.message();
      for (int64_t s = 0; s < cs.num_slots; ++s)
        for (int64_t n = 0; n < cs.N; ++n)
          for (int64_t j = 0; j < cs.D; ++j) {
            const double got = cache_at(cs, r, s, n, j);
            // slot 10 is batch 0's compressed token c = 3; slots 11 and 12 (ineligible batches) and all others unchanged
            const double expect = s == 10 ? want[n * cs.D + j] : cs.cache[(s * cs.N + n) * cs.D + j];
            EXPECT_EQ(got, expect) << "slot " << s << " n " << n << " j " << j;
          }
    }
  }
}

// The slots of ineligible batches are not read: out of range or duplicated, they are no error (§2, §4 "What is
// validated"); block-table entries no window needs may be -1.
TEST(CompressInferHand, IneligibleSlotsAndUnusedPagesNotRead) {
  CICase cs = worked_example(DType::kF32);
  cs.slots = {10, -5, 10};           // batch 1 out of range, batch 2 a duplicate of batch 0: neither writes
  cs.table = {{5, 2}, {-1, -1}, {-1, 99}};
  for (const Path& pa : all_paths()) {
    const CIRun r = run(cs, pa.be, pa.isa, pa.threads);
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    EXPECT_TRUE(check_model(cs, r));
  }
}

// §2: the result is rounded to nearest EVEN (not half away as in the training op): l = 2, d = 1, weights 1, tokens
// (1, u/2) with u the dtype's ulp at 1 give the exact tie 1 + u/2 -> 1; (1 + u, u/2) gives 1 + 3u/2 -> 1 + 2u.
TEST(CompressInferHand, RoundsTiesToEven) {
  for (DType dt : {DType::kBF16, DType::kF16}) {
    const double u = dt == DType::kBF16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -10);
    CICase cs;
    cs.dtype = dt;
    cs.num_pages = 1;
    cs.P = 4;
    cs.N = 1;
    cs.D = 2;
    cs.l = 2;
    cs.d = 1;
    cs.num_slots = 1;
    cs.lens = {2};
    cs.table = {{0}};
    cs.slots = {0};
    cs.resize();
    cs.w(0, 0) = 1;
    cs.w(1, 0) = 1;
    cs.x(0, 0, 0, 0) = 1;
    cs.x(0, 1, 0, 0) = u / 2;
    cs.x(0, 0, 0, 1) = 1 + u;
    cs.x(0, 1, 0, 1) = u / 2;
    for (const Path& pa : all_paths()) {
      const CIRun r = run(cs, pa.be, pa.isa, pa.threads);
      ASSERT_TRUE(r.status.ok());
      EXPECT_EQ(cache_at(cs, r, 0, 0, 0), 1.0) << nsa::dtype_name(dt);
      EXPECT_EQ(cache_at(cs, r, 0, 0, 1), 1 + 2 * u) << nsa::dtype_name(dt);
    }
  }
}

// Random cases: odd sizes, several batches (eligible or not), shuffled pages, P = 1 and P not dividing the lengths,
// windows spanning many pages, -1 padding in the block tables, strided views. Every path equals the reference bit
// for bit, and the reference is within §6 of the fp64 model.
TEST(CompressInferCpu, RandomCasesBitwiseAndModel) {
  std::mt19937 rng(1234);
  struct Geo {
    int64_t P, N, D, l, d, step;
  };
  const Geo geos[] = {{5, 3, 19, 8, 4, 1}, {1, 2, 33, 6, 3, 1}, {16, 1, 70, 32, 16, 2}, {7, 4, 16, 5, 5, 1}, {64, 2, 8, 3, 1, 2}};
  for (DType dt : kAllDtypes)
    for (const Geo& g : geos) {
      CICase cs;
      cs.dtype = dt;
      cs.P = g.P;
      cs.N = g.N;
      cs.D = g.D;
      cs.l = g.l;
      cs.d = g.d;
      cs.step = g.step;
      const int64_t B = 6;
      std::uniform_int_distribution<int64_t> len(0, 5 * g.l);
      int64_t pages = 0;
      std::vector<int64_t> need;
      for (int64_t b = 0; b < B; ++b) {
        int64_t S = len(rng);
        if (b % 2 == 0) S = std::max<int64_t>(g.l, S - (S - g.l + 10 * g.d) % g.d);  // eligible
        cs.lens.push_back(S);
        need.push_back((S + g.P - 1) / g.P);
        pages += need.back();
      }
      const int64_t maxp = *std::max_element(need.begin(), need.end()) + 1;
      cs.num_pages = pages + 2;
      std::vector<int32_t> perm(static_cast<size_t>(cs.num_pages));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      size_t next = 0;
      for (int64_t b = 0; b < B; ++b) {
        std::vector<int32_t> row(static_cast<size_t>(maxp), -1);  // -1 padding past the batch's pages
        for (int64_t i = 0; i < need[b]; ++i) row[i] = perm[next++];
        cs.table.push_back(row);
      }
      cs.num_slots = 3 * B;
      std::vector<int32_t> sl(static_cast<size_t>(cs.num_slots));
      std::iota(sl.begin(), sl.end(), 0);
      std::shuffle(sl.begin(), sl.end(), rng);
      cs.slots.assign(sl.begin(), sl.begin() + B);
      cs.resize();
      cs.fill_uniform(rng, -2, 2);
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " P " + std::to_string(g.P) + " D " + std::to_string(g.D));
      const CIRun ref = run(cs, Backend::kReference);
      ASSERT_TRUE(ref.status.ok()) << ref.status.message();
      EXPECT_TRUE(check_model(cs, ref));
      for (CpuIsa isa : supported_isas())
        for (int t : {1, 2, 5}) {
          const CIRun r = run(cs, Backend::kCpu, isa, t);
          ASSERT_TRUE(r.status.ok()) << r.status.message();
          EXPECT_TRUE(r.cache == ref.cache) << nsa::cpu_isa_name(isa) << " threads " << t;
        }
    }
}

// ------------------------------------------------------------------ argument rules (§2)
// Each mutation must fail on both backends with a message containing `needle`, leaving the cache bytes unchanged.
void expect_error(const CICase& cs, void (*mutate)(nsa::CompressInferParams&), const std::string& needle) {
  for (Backend be : {Backend::kReference, Backend::kCpu}) {
    Bound bd;
    bind(cs, bd);
    if (mutate) mutate(bd.p);
    const std::vector<unsigned char> before = bd.cache;
    const Status st = run_backend(bd.p, be, CpuIsa::kScalar, 2);
    ASSERT_FALSE(st.ok()) << needle;
    EXPECT_NE(st.message().find(needle), std::string::npos) << "message: " << st.message() << "\nexpected: " << needle;
    EXPECT_TRUE(bd.cache == before) << "written on error: " << needle;
  }
}

TEST(CompressInferValidation, EveryRuleNamesItsArgument) {
  const CICase base = worked_example(DType::kBF16);
  expect_error(base, [](nsa::CompressInferParams& p) { p.compress_stride = 0; }, "compress_stride must be >= 1");
  expect_error(base, [](nsa::CompressInferParams& p) { p.compress_block_size = 0; }, "compress_block_size must be >= 1");
  expect_error(base, [](nsa::CompressInferParams& p) { p.compress_stride = 33; }, "compress_stride (33) must be <= compress_block_size (32)");
  expect_error(base, [](nsa::CompressInferParams& p) { p.page_block_size = 32; }, "page_block_size (32) must equal input.shape[1]");
  expect_error(base, [](nsa::CompressInferParams& p) { p.page_block_size = 0; }, "page_block_size must be >= 1");
  expect_error(base, [](nsa::CompressInferParams& p) { p.weight.size[0] = 31; }, "weight must have shape [compress_block_size, N] = [32, 2]");
  expect_error(base, [](nsa::CompressInferParams& p) { p.weight.size[1] = 3; }, "weight must have shape");
  expect_error(base, [](nsa::CompressInferParams& p) { p.cache_size[2] = 4; }, "cache must have shape [num_slots, N, D]");
  expect_error(base, [](nsa::CompressInferParams& p) { p.cache_size[1] = 1; }, "cache must have shape [num_slots, N, D]");
  expect_error(base, [](nsa::CompressInferParams& p) { p.block_table = nullptr; }, "block_table must be given");
  expect_error(base, [](nsa::CompressInferParams& p) { p.actual_seq_len.data = nullptr; }, "actual_seq_len must be given");
  expect_error(base, [](nsa::CompressInferParams& p) { p.slot_mapping = nullptr; }, "slot_mapping must be given");
  expect_error(base, [](nsa::CompressInferParams& p) { p.slot_mapping_size = 2; }, "slot_mapping must have B = 3 entries");
  expect_error(base, [](nsa::CompressInferParams& p) { p.block_table_rows = 4; }, "block_table must have B = 3 rows");
  expect_error(base, [](nsa::CompressInferParams& p) { p.actual_seq_len.size = 0; }, "actual_seq_len must have at least one element");
  expect_error(base, [](nsa::CompressInferParams& p) { p.weight.data = nullptr; }, "weight must not be null");
  expect_error(base, [](nsa::CompressInferParams& p) { p.cache = nullptr; }, "cache must not be null");
  // negative length
  {
    CICase cs = base;
    cs.lens = {80, -1, 20};
    expect_error(cs, nullptr, "actual_seq_len[1] must be >= 0");
  }
  // the eligible window needs page index 2 of a 2-column table (S = 144: tokens 112..143, pages 1 and 2)
  {
    CICase cs = base;
    cs.lens = {144, 81, 20};
    expect_error(cs, nullptr, "block_table has max_pages = 2 columns, but batch 0 (S_b = 144) compresses tokens [112, 144) which need page index 2");
  }
  // pages out of range: -1 and num_pages, in a needed column
  {
    CICase cs = base;
    cs.table[0][1] = -1;
    expect_error(cs, nullptr, "block_table[0, 1] = -1 must be a page of input in [0, 8)");
    cs.table[0][1] = 8;
    expect_error(cs, nullptr, "block_table[0, 1] = 8 must be a page of input in [0, 8)");
  }
  // slots: out of range, duplicate between eligible batches
  {
    CICase cs = base;
    cs.slots = {16, 11, 12};
    expect_error(cs, nullptr, "slot_mapping[0] = 16 must be a row of cache in [0, 16)");
    cs.slots = {-1, 11, 12};
    expect_error(cs, nullptr, "slot_mapping[0] = -1 must be a row of cache");
    cs.lens = {80, 96, 20};  // batch 1 eligible too ((96 - 32) % 16 == 0), same slot as batch 0
    cs.slots = {10, 10, 12};
    expect_error(cs, nullptr, "slot_mapping must name distinct cache rows for the batches that write this step, but batches 0 and 1 both write row 10");
  }
}

// Wider than the NPU (§2): any l >= d >= 1, any P, odd N and D, fp32/fp64 — accepted (covered above); l == d and
// l = 1 too.
TEST(CompressInferValidation, WiderThanTheNpuAccepted) {
  CICase cs;
  cs.dtype = DType::kF32;
  cs.num_pages = 3;
  cs.P = 3;
  cs.N = 1;
  cs.D = 1;
  cs.l = 1;
  cs.d = 1;
  cs.num_slots = 2;
  cs.lens = {7};
  cs.table = {{2, 0, 1}};
  cs.slots = {1};
  cs.resize();
  cs.x(1, 0, 0, 0) = 3;  // token 6 = page table[2] = 1, row 0
  cs.w(0, 0) = 2;
  const CIRun r = run(cs, Backend::kCpu, CpuIsa::kScalar, 1);
  ASSERT_TRUE(r.status.ok()) << r.status.message();
  EXPECT_EQ(cache_at(cs, r, 1, 0, 0), 6.0);
}

}  // namespace
}  // namespace nsa_ci_test
