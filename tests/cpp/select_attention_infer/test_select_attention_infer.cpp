// select_attention_infer (docs/spec/decode.md §4): the §5 worked example by hand on the reference and every ISA
// path; the output roundings of §4 step 4 on exact ties; the reference and the CPU backend against the fp64 model of
// paged_util.h on many shapes (every dtype, B several, G = 1 and G > 1, D != Dv, P = 1 and P not dividing the
// lengths, shuffled pages, -1 table padding, -1 slots anywhere, duplicates, MTP q_b > 1, batch-major rows past q_b);
// bitwise invariance over thread counts and between rows read in place and packed rows; every argument rule with its
// message, nothing written on error.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nsa/select_attention_infer.h"
#include "select_attention_infer/paged_util.h"

namespace paged_test {
namespace {

using Runner = Status (*)(const nsa::SelectAttentionInferParams&, CpuIsa, int);

Status run_ref(const nsa::SelectAttentionInferParams& p, CpuIsa, int) { return nsa::select_attention_infer_reference(p); }
Status run_cpu(const nsa::SelectAttentionInferParams& p, CpuIsa isa, int threads) {
  return nsa::select_attention_infer_cpu(p, nsa::CpuOptions{static_cast<int>(isa), threads});
}

// Every backend: the reference, then the CPU backend on each ISA path (2 threads).
template <typename F>
void for_each_backend(F&& f) {
  f(std::string("reference"), &run_ref, CpuIsa::kScalar);
  for (CpuIsa isa : supported_isas()) f(std::string("cpu ") + nsa::cpu_isa_name(isa), &run_cpu, isa);
}

// §5 "Selected attention": S_0 = 80, l' = 64, P = 64, block table [5, 2] (positions 0..63 in page 5, 64..79 in page
// 2), topk [1, 0, -1]. Queries 0 and keys 0, so every entry has P = 1 and the output is the mean of the visible
// values; v[p] = p.
PCase worked_case(DType dt, int64_t q0) {
  std::mt19937 rng(1);
  PCase c = PCase::make(dt, {q0}, {80}, 1, 1, 1, 1, 64, rng);
  c.table = {5, 2};
  c.max_pages = 2;
  c.num_pages = 6;
  c.kv.assign(static_cast<size_t>(6 * 64), kNaN);
  c.vv.assign(static_cast<size_t>(6 * 64), kNaN);
  for (int64_t p = 0; p < 80; ++p) {
    c.kv[static_cast<size_t>(c.ki(c.page_of(0, p), p % 64, 0, 0))] = 0.0;
    c.vv[static_cast<size_t>(c.vi(c.page_of(0, p), p % 64, 0, 0))] = static_cast<double>(p);
  }
  c.lp = 64;
  c.K = 3;
  c.topk.assign(static_cast<size_t>(q0 * 3), -1);
  return c;
}

TEST(SelectAttentionInferWorked, Section5OnEveryBackend) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    // q_0 = 1: block 1 gives 64..79 (partial), block 0 gives 0..63: the mean of 0..79 = 39.5
    PCase c = worked_case(dt, 1);
    c.topk = {1, 0, -1};
    c.pack();
    for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
      SCOPED_TRACE(name);
      std::vector<unsigned char> out = out_buffer(c);
      ASSERT_TRUE(run(c.select_params(out.data()), isa, 2).ok());
      EXPECT_EQ(nsa::detail::load_f64(out.data(), 0, dt), 39.5);
    });
    // q_0 = 2: token 0 (position 78) sees 64..78 and 0..63 (mean 39), token 1 all 80 (39.5)
    PCase m = worked_case(dt, 2);
    m.topk = {1, 0, -1, -1, 0, 1};
    m.pack();
    // [-1, -1, -1]: a zero row
    PCase z = worked_case(dt, 1);
    z.pack();
    for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
      SCOPED_TRACE(name);
      std::vector<unsigned char> out = out_buffer(m);
      ASSERT_TRUE(run(m.select_params(out.data()), isa, 2).ok());
      EXPECT_EQ(nsa::detail::load_f64(out.data(), 0, dt), 39.0);
      EXPECT_EQ(nsa::detail::load_f64(out.data(), 1, dt), 39.5);
      std::vector<unsigned char> zo = out_buffer(z);
      ASSERT_TRUE(run(z.select_params(zo.data()), isa, 2).ok());
      EXPECT_EQ(nsa::detail::load_f64(zo.data(), 0, dt), 0.0);
    });
  }
}

// §4 step 4: the output is rounded to nearest even for bf16 and half away from zero for fp16. Two entries with
// P = 1 and values 1 and 1 + 2u (u half an ulp at 1) average to the tie 1 + u.
TEST(SelectAttentionInferRounding, OutputTiesRneForBf16RhaForFp16) {
  struct Tie {
    DType dt;
    double u, expected;
  };
  const Tie ties[] = {{DType::kBF16, std::ldexp(1.0, -8), 1.0}, {DType::kF16, std::ldexp(1.0, -11), 1.0 + std::ldexp(1.0, -10)}};
  for (const Tie& tie : ties) {
    SCOPED_TRACE(nsa::dtype_name(tie.dt));
    std::mt19937 rng(2);
    PCase c = PCase::make(tie.dt, {1}, {2}, 1, 1, 1, 1, 1, rng);
    for (int64_t p = 0; p < 2; ++p) {
      c.kv[static_cast<size_t>(c.ki(c.page_of(0, p), 0, 0, 0))] = 0.0;
      c.vv[static_cast<size_t>(c.vi(c.page_of(0, p), 0, 0, 0))] = p == 0 ? 1.0 : 1.0 + 2 * tie.u;
    }
    c.lp = 1;
    c.K = 2;
    c.topk = {0, 1};
    c.pack();
    for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
      SCOPED_TRACE(name);
      std::vector<unsigned char> out = out_buffer(c);
      ASSERT_TRUE(run(c.select_params(out.data()), isa, 1).ok());
      EXPECT_EQ(nsa::detail::load_f64(out.data(), 0, tie.dt), tie.expected);
    });
  }
}

struct Shape {
  const char* name;
  std::vector<int64_t> q, s;
  int64_t N1, N2, D, Dv, P, lp, K, batch_rows;
};

const Shape kShapes[] = {
    {"decode G=1", {1, 1, 1}, {37, 5, 64}, 2, 2, 16, 16, 16, 8, 4, 0},
    {"decode G=4 D!=Dv", {1, 1}, {100, 33}, 8, 2, 24, 16, 32, 16, 3, 0},
    {"P=1", {1, 1}, {9, 4}, 2, 1, 8, 5, 1, 4, 3, 0},
    {"MTP q_b>1, P not dividing", {3, 1, 2}, {70, 3, 45}, 4, 2, 16, 8, 24, 16, 4, 0},
    {"batch-major q_b<Sq", {2, 1, 3}, {50, 20, 9}, 3, 1, 8, 8, 7, 8, 3, 3},
    {"K l' > one panel", {1, 2}, {300, 200}, 2, 1, 16, 16, 64, 64, 4, 0},
    {"odd D, Dv > one panel", {1, 2}, {23, 11}, 3, 1, 7, 80, 4, 4, 3, 0},
};

TEST(SelectAttentionInferModel, EveryBackendWithinTolerance) {
  std::mt19937 rng(42);
  for (const Shape& sh : kShapes)
    for (DType dt : kAllDtypes) {
      SCOPED_TRACE(std::string(sh.name) + " " + nsa::dtype_name(dt));
      PCase c = PCase::make(dt, sh.q, sh.s, sh.N1, sh.N2, sh.D, sh.Dv, sh.P, rng);
      c.batch_rows = sh.batch_rows;
      c.scale = 0.37;
      if (c.batch_rows > 0) c.qv.assign(static_cast<size_t>(c.T() * c.N1 * c.D), 0.0);
      c.fill_uniform(rng, -2, 2);
      c.random_indices(rng, sh.lp, sh.K);
      // a duplicated slot and a -1 slot first in row 0
      c.index(0, 0, 0) = -1;
      if (c.K > 2) c.index(0, 0, 2) = c.index(0, 0, 1) = 0;
      c.topk64 = dt == DType::kF32;  // int64 indices on one dtype
      c.pack();
      const Model m = model(c, /*select=*/true);
      for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
        SCOPED_TRACE(name);
        std::vector<unsigned char> out = out_buffer(c);
        ASSERT_TRUE(run(c.select_params(out.data()), isa, 2).ok());
        EXPECT_TRUE(check(c, m, out));
      });
    }
}

TEST(SelectAttentionInferCpu, BitwiseOverThreadCounts) {
  std::mt19937 rng(7);
  for (DType dt : {DType::kBF16, DType::kF32}) {
    PCase c = PCase::make(dt, {2, 1, 1, 3}, {90, 17, 1, 64}, 4, 2, 16, 16, 16, rng);
    c.fill_uniform(rng, -1, 1);
    c.random_indices(rng, 8, 5);
    c.pack();
    for (CpuIsa isa : supported_isas()) {
      std::vector<unsigned char> one = out_buffer(c);
      ASSERT_TRUE(run_cpu(c.select_params(one.data()), isa, 1).ok());
      for (int th : {2, 3, 8}) {
        std::vector<unsigned char> out = out_buffer(c);
        ASSERT_TRUE(run_cpu(c.select_params(out.data()), isa, th).ok());
        EXPECT_EQ(out, one) << nsa::cpu_isa_name(isa) << " threads " << th;
      }
    }
  }
}

// Contiguous bf16 rows with an even D are read where they lie on a path with an in-place P.V (avx512bf16: key rows
// as the score GEMM's A operand, value rows through KernelTable::gemm.pv_bf16); rows with gaps between their
// elements are packed first. Both give the same bits on every path (shapes: G = 1, 4, 16; pages of 16, 64 and 7, so
// groups of consecutive rows that end at page and slot boundaries; duplicates and -1 slots; Dv = 80 over two value
// blocks; an odd number of entries; MTP).
TEST(SelectAttentionInferCpu, InPlaceRowsMatchPackedRowsBitwise) {
  struct Geo {
    std::vector<int64_t> q, s;
    int64_t N1, N2, D, Dv, P, lp, K;
  };
  const Geo geos[] = {{{1, 1}, {300, 129}, 16, 1, 48, 80, 64, 64, 4},
                      {{1, 2, 1}, {77, 200, 5}, 8, 2, 16, 16, 16, 32, 5},
                      {{1, 1}, {150, 61}, 2, 2, 24, 8, 7, 16, 6},
                      // G = 80: the query rows of a KV head fill more than one 64-column panel
                      {{1, 1}, {100, 65}, 80, 1, 16, 16, 16, 16, 3}};
  std::mt19937 rng(11);
  for (const Geo& g : geos) {
    PCase c = PCase::make(DType::kBF16, g.q, g.s, g.N1, g.N2, g.D, g.Dv, g.P, rng);
    c.fill_uniform(rng, -2, 2);
    c.random_indices(rng, g.lp, g.K);
    c.index(0, 0, 0) = -1;
    c.index(0, 0, 2) = c.index(0, 0, 1);
    c.pack();
    std::vector<unsigned char> ks, vs;
    nsa::SelectAttentionInferParams spread = c.select_params(nullptr);
    spread.key = c.spread_cache(c.kb, c.D, ks);
    spread.value = c.spread_cache(c.vb, c.Dv, vs);
    for (CpuIsa isa : supported_isas()) {
      std::vector<unsigned char> in_place = out_buffer(c), packed = out_buffer(c);
      ASSERT_TRUE(run_cpu(c.select_params(in_place.data()), isa, 2).ok());
      spread.attention_out = packed.data();
      ASSERT_TRUE(run_cpu(spread, isa, 2).ok());
      EXPECT_EQ(in_place, packed) << nsa::cpu_isa_name(isa) << " G = " << g.N1 / g.N2 << " P = " << g.P;
    }
  }
}

// ------------------------------------------------------------------------------------ argument rules

struct Rule {
  const char* expect;  // a substring of the message
  void (*edit)(nsa::SelectAttentionInferParams&, PCase&);
};

TEST(SelectAttentionInferValidation, EveryRuleNamedAndNothingWritten) {
  static int64_t bad_len[2];
  static int32_t bad_table[4];
  const Rule rules[] = {
      {"head_num", [](auto& p, auto&) { p.head_num = 3; }},
      {"key_value_head_num", [](auto& p, auto&) { p.key_value_head_num = 1; }},
      {"page_block_size", [](auto& p, auto&) { p.page_block_size = 5; }},
      {"select_block_size", [](auto& p, auto&) { p.select_block_size = 0; }},
      {"select_block_count", [](auto& p, auto&) { p.select_block_count = 0; }},
      {"topk_indices must have select_block_count", [](auto& p, auto&) { p.select_block_count = 3; }},
      {"key must have the head dim", [](auto& p, auto&) { p.key.size[3] = 3; }},
      {"value must have the pages", [](auto& p, auto&) { p.value.size[1] = 3; }},
      {"scale_value", [](auto& p, auto&) { p.scale_value = 1e39; }},
      {"block_table must be given", [](auto& p, auto&) { p.block_table.data = nullptr; }},
      {"block_table must be non-empty", [](auto& p, auto&) { p.block_table.size[1] = 0; }},
      {"block_table must have one row per batch", [](auto& p, auto&) { p.block_table.size[0] = 1; }},
      {"actual_seq_kvlen must be given", [](auto& p, auto&) { p.actual_seq_kvlen.data = nullptr; }},
      {"actual_seq_qlen must be given", [](auto& p, auto&) { p.actual_seq_qlen.data = nullptr; }},
      {"actual_seq_qlen must have one entry per batch", [](auto& p, auto&) { p.actual_seq_qlen.size = 1; }},
      {"actual_seq_qlen[0] must be >= 1", [](auto& p, auto&) {
         bad_len[0] = 0; bad_len[1] = 1; p.actual_seq_qlen.data = bad_len; }},
      {"actual_seq_kvlen[1] = 1 must be >= q_b = 2", [](auto& p, auto&) {
         bad_len[0] = 30; bad_len[1] = 1; p.actual_seq_kvlen.data = bad_len; }},
      {"actual_seq_qlen must sum to the query rows", [](auto& p, auto&) { p.query.size[0] = 2; p.topk_indices.size[0] = 2; }},
      {"topk_indices[0][0][1] = 5 is out of range", [](auto&, auto& c) { c.topk32[1] = 5; }},
      {"topk_indices[0][0][1] = -2 is out of range", [](auto&, auto& c) { c.topk32[1] = -2; }},
      {"block_table[0][1] = 9 is not a valid page", [](auto& p, auto& c) {
         bad_table[0] = c.table[0]; bad_table[1] = 9; bad_table[2] = c.table[2]; bad_table[3] = c.table[3];
         p.block_table.data = bad_table; }},
      {"block_table[1][0] = -1 is not a valid page", [](auto& p, auto& c) {
         bad_table[0] = c.table[0]; bad_table[1] = c.table[1]; bad_table[2] = -1; bad_table[3] = c.table[3];
         p.block_table.data = bad_table; }},
      {"block_table must have a page for every position", [](auto& p, auto&) { p.block_table.size[1] = 1; }},
      {"attention_out must not be null", [](auto& p, auto&) { p.attention_out = nullptr; }},
      {"query must have B = 2 batches of Sq = 2 rows", [](auto& p, auto&) { p.batch_rows = 2; }},
  };
  for (const Rule& r : rules) {
    SCOPED_TRACE(r.expect);
    std::mt19937 rng(3);
    // batch 0: S = 30 in pages 3, 1 (P = 16), q = 1; batch 1: S = 3 in page 2, q = 2 (its table row padded with
    // -1); l' = 8, K = 2, G = 1. Row 0 reads blocks 0 and 3 (page entries 0 and 1) with KV head 0.
    PCase c = PCase::make(DType::kF32, {1, 2}, {30, 3}, 2, 2, 4, 4, 16, rng, 1);
    c.table = {3, 1, 2, -1};
    c.max_pages = 2;
    c.fill_uniform(rng, -1, 1);
    c.lp = 8;
    c.K = 2;
    c.topk = {0, 3, 1, -1, 0, -1, -1, 0, 0, 0, 0, -1};
    c.pack();
    std::vector<unsigned char> out = out_buffer(c);
    nsa::SelectAttentionInferParams p = c.select_params(out.data());
    r.edit(p, c);
    for (Runner run : {&run_ref, &run_cpu}) {
      const Status st = run(p, CpuIsa::kScalar, 2);
      ASSERT_FALSE(st.ok());
      EXPECT_NE(st.message().find(r.expect), std::string::npos) << st.message();
      EXPECT_EQ(out, out_buffer(c)) << "written on error";
    }
  }
}

}  // namespace
}  // namespace paged_test
