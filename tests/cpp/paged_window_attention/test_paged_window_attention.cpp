// paged_window_attention (docs/spec/decode.md §9): a hand-worked window on the reference and every ISA path; the
// output rounding of window_attention.md §5 step 4 (half away from zero) on exact ties; the reference and the CPU
// backend against the fp64 model of select_attention_infer/paged_util.h (every dtype, B several, G = 1 and G > 1,
// D != Dv, P = 1 and P not dividing the lengths, shuffled pages, -1 table padding, MTP q_b > 1, windows shorter and
// longer than the sequences); bitwise invariance over thread counts and between rows read in place and packed rows;
// every argument rule with its message, nothing written on error.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nsa/paged_window_attention.h"
#include "select_attention_infer/paged_util.h"

namespace paged_test {
namespace {

using Runner = Status (*)(const nsa::PagedWindowAttentionParams&, CpuIsa, int);

Status run_ref(const nsa::PagedWindowAttentionParams& p, CpuIsa, int) {
  return nsa::paged_window_attention_reference(p);
}
Status run_cpu(const nsa::PagedWindowAttentionParams& p, CpuIsa isa, int threads) {
  return nsa::paged_window_attention_cpu(p, nsa::CpuOptions{static_cast<int>(isa), threads});
}

template <typename F>
void for_each_backend(F&& f) {
  f(std::string("reference"), &run_ref, CpuIsa::kScalar);
  for (CpuIsa isa : supported_isas()) f(std::string("cpu ") + nsa::cpu_isa_name(isa), &run_cpu, isa);
}

// One sequence of S = 6 tokens in pages of 4 (shuffled), window 4, queries and keys 0 (every visible position has
// P = 1/n), v[p] = 2p: the last token (position 5) sees {2, 3, 4, 5}: mean 7. With q_b = 2, token 0 (position 4)
// sees {1, 2, 3, 4}: mean 5. A window of 100 sees everything: {0..5}, mean 5.
TEST(PagedWindowAttentionWorked, HandWindowsOnEveryBackend) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    struct Case {
      int64_t q, window;
      std::vector<double> expected;
    };
    const Case cases[] = {{1, 4, {7.0}}, {2, 4, {5.0, 7.0}}, {1, 100, {5.0}}, {1, 1, {10.0}}};
    for (const Case& k : cases) {
      std::mt19937 rng(5);
      PCase c = PCase::make(dt, {k.q}, {6}, 1, 1, 1, 1, 4, rng);
      for (int64_t p = 0; p < 6; ++p) {
        c.kv[static_cast<size_t>(c.ki(c.page_of(0, p), p % 4, 0, 0))] = 0.0;
        c.vv[static_cast<size_t>(c.vi(c.page_of(0, p), p % 4, 0, 0))] = 2.0 * static_cast<double>(p);
      }
      c.window = k.window;
      c.pack();
      for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
        SCOPED_TRACE(name + " window " + std::to_string(k.window) + " q " + std::to_string(k.q));
        std::vector<unsigned char> out = out_buffer(c);
        ASSERT_TRUE(run(c.window_params(out.data()), isa, 2).ok());
        for (size_t i = 0; i < k.expected.size(); ++i)
          EXPECT_EQ(nsa::detail::load_f64(out.data(), static_cast<int64_t>(i), dt), k.expected[i]);
      });
    }
  }
}

// window_attention.md §5 step 4: P = 1/2 each (exact) and values 1, 1 + 2u: the output tie 1 + u rounds half away
// from zero (up) for bf16 and fp16.
TEST(PagedWindowAttentionRounding, OutputTiesHalfAway) {
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    const double u = std::ldexp(1.0, dt == DType::kBF16 ? -8 : -11);
    std::mt19937 rng(6);
    PCase c = PCase::make(dt, {1}, {2}, 1, 1, 1, 1, 1, rng);
    for (int64_t p = 0; p < 2; ++p) {
      c.kv[static_cast<size_t>(c.ki(c.page_of(0, p), 0, 0, 0))] = 0.0;
      c.vv[static_cast<size_t>(c.vi(c.page_of(0, p), 0, 0, 0))] = p == 0 ? 1.0 : 1.0 + 2 * u;
    }
    c.window = 2;
    c.pass_query_lens = false;  // 1 each
    c.pack();
    for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
      SCOPED_TRACE(name);
      std::vector<unsigned char> out = out_buffer(c);
      ASSERT_TRUE(run(c.window_params(out.data()), isa, 1).ok());
      EXPECT_EQ(nsa::detail::load_f64(out.data(), 0, dt), 1.0 + 2 * u);
    });
  }
}

struct Shape {
  const char* name;
  std::vector<int64_t> q, s;
  int64_t N1, N2, D, Dv, P, window;
};

const Shape kShapes[] = {
    {"decode G=1", {1, 1, 1}, {37, 5, 64}, 2, 2, 16, 16, 16, 16},
    {"decode G=4 D!=Dv", {1, 1}, {100, 33}, 8, 2, 24, 16, 32, 40},
    {"P=1", {1, 1}, {9, 4}, 2, 1, 8, 5, 1, 6},
    {"MTP q_b>1, P not dividing", {3, 1, 2}, {70, 3, 45}, 4, 2, 16, 8, 24, 20},
    {"window > one panel", {1, 2}, {300, 200}, 2, 1, 16, 16, 64, 130},
    {"odd D, Dv > one panel", {1, 2}, {23, 11}, 3, 1, 7, 80, 4, 9},
};

TEST(PagedWindowAttentionModel, EveryBackendWithinTolerance) {
  std::mt19937 rng(43);
  for (const Shape& sh : kShapes)
    for (DType dt : kAllDtypes) {
      SCOPED_TRACE(std::string(sh.name) + " " + nsa::dtype_name(dt));
      PCase c = PCase::make(dt, sh.q, sh.s, sh.N1, sh.N2, sh.D, sh.Dv, sh.P, rng);
      c.window = sh.window;
      c.scale = 0.41;
      c.fill_uniform(rng, -2, 2);
      c.pack();
      const Model m = model(c, /*select=*/false);
      for_each_backend([&](const std::string& name, Runner run, CpuIsa isa) {
        SCOPED_TRACE(name);
        std::vector<unsigned char> out = out_buffer(c);
        ASSERT_TRUE(run(c.window_params(out.data()), isa, 2).ok());
        EXPECT_TRUE(check(c, m, out));
      });
    }
}

TEST(PagedWindowAttentionCpu, BitwiseOverThreadCounts) {
  std::mt19937 rng(8);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    PCase c = PCase::make(dt, {2, 1, 1, 3}, {90, 17, 1, 64}, 4, 2, 16, 16, 16, rng);
    c.window = 33;
    c.fill_uniform(rng, -1, 1);
    c.pack();
    for (CpuIsa isa : supported_isas()) {
      std::vector<unsigned char> one = out_buffer(c);
      ASSERT_TRUE(run_cpu(c.window_params(one.data()), isa, 1).ok());
      for (int th : {2, 3, 8}) {
        std::vector<unsigned char> out = out_buffer(c);
        ASSERT_TRUE(run_cpu(c.window_params(out.data()), isa, th).ok());
        EXPECT_EQ(out, one) << nsa::cpu_isa_name(isa) << " threads " << th;
      }
    }
  }
}

// Contiguous bf16 rows with an even D read in place (avx512bf16) and the same rows with gaps, packed: the same bits
// on every path (G = 16 and 2, windows across page boundaries, pages of 64 and 7, an odd number of entries, MTP).
TEST(PagedWindowAttentionCpu, InPlaceRowsMatchPackedRowsBitwise) {
  struct Geo {
    std::vector<int64_t> q, s;
    int64_t N1, N2, D, Dv, P, window;
  };
  const Geo geos[] = {{{1, 1}, {600, 129}, 16, 1, 48, 80, 64, 513}, {{2, 1, 3}, {90, 17, 64}, 4, 2, 24, 16, 7, 33}};
  std::mt19937 rng(12);
  for (const Geo& g : geos) {
    PCase c = PCase::make(DType::kBF16, g.q, g.s, g.N1, g.N2, g.D, g.Dv, g.P, rng);
    c.window = g.window;
    c.fill_uniform(rng, -2, 2);
    c.pack();
    std::vector<unsigned char> ks, vs;
    nsa::PagedWindowAttentionParams spread = c.window_params(nullptr);
    spread.key_cache = c.spread_cache(c.kb, c.D, ks);
    spread.value_cache = c.spread_cache(c.vb, c.Dv, vs);
    for (CpuIsa isa : supported_isas()) {
      std::vector<unsigned char> in_place = out_buffer(c), packed = out_buffer(c);
      ASSERT_TRUE(run_cpu(c.window_params(in_place.data()), isa, 2).ok());
      spread.attention_out = packed.data();
      ASSERT_TRUE(run_cpu(spread, isa, 2).ok());
      EXPECT_EQ(in_place, packed) << nsa::cpu_isa_name(isa) << " G = " << g.N1 / g.N2 << " P = " << g.P;
    }
  }
}

struct Rule {
  const char* expect;
  void (*edit)(nsa::PagedWindowAttentionParams&, PCase&);
};

TEST(PagedWindowAttentionValidation, EveryRuleNamedAndNothingWritten) {
  static int64_t bad_len[2];
  static int32_t bad_table[4];
  const Rule rules[] = {
      {"multiple of the number of key/value heads", [](auto& p, auto&) { p.query.size[1] = 3; }},
      {"key_cache must have the head dim", [](auto& p, auto&) { p.key_cache.size[3] = 3; }},
      {"value_cache must have the pages", [](auto& p, auto&) { p.value_cache.size[2] = 1; }},
      {"window must be >= 1", [](auto& p, auto&) { p.window = 0; }},
      {"scale must be finite", [](auto& p, auto&) { p.scale = INFINITY; }},
      {"block_table must be given", [](auto& p, auto&) { p.block_table.data = nullptr; }},
      {"block_table must be non-empty", [](auto& p, auto&) { p.block_table.size[1] = 0; }},
      {"block_table must have one row per batch", [](auto& p, auto&) { p.block_table.size[0] = 1; }},
      {"seq_lens must be given", [](auto& p, auto&) { p.seq_lens.data = nullptr; }},
      {"query_lens must have one entry per batch", [](auto& p, auto&) { p.query_lens.size = 1; }},
      {"query_lens[1] must be >= 1", [](auto& p, auto&) {
         bad_len[0] = 1; bad_len[1] = 0; p.query_lens.data = bad_len; }},
      {"seq_lens[1] = 1 must be >= q_b = 2", [](auto& p, auto&) {
         bad_len[0] = 30; bad_len[1] = 1; p.seq_lens.data = bad_len; }},
      {"query must have sum(query_lens) = 3 rows", [](auto& p, auto&) { p.query.size[0] = 4; }},
      {"query must have sum(query_lens) = 2 rows", [](auto& p, auto&) { p.query_lens.data = nullptr; }},
      {"block_table[0][1] = 7 is not a valid page", [](auto& p, auto& c) {
         bad_table[0] = c.table[0]; bad_table[1] = 7; bad_table[2] = c.table[2]; bad_table[3] = c.table[3];
         p.block_table.data = bad_table; }},
      {"block_table[1][0] = -1 is not a valid page", [](auto& p, auto& c) {
         bad_table[0] = c.table[0]; bad_table[1] = c.table[1]; bad_table[2] = -1; bad_table[3] = c.table[3];
         p.block_table.data = bad_table; }},
      {"block_table must have a page for every position", [](auto& p, auto&) { p.block_table.size[1] = 1; }},
      {"attention_out must not be null", [](auto& p, auto&) { p.attention_out = nullptr; }},
  };
  for (const Rule& r : rules) {
    SCOPED_TRACE(r.expect);
    std::mt19937 rng(9);
    // batch 0: S = 30 in pages 3, 1 (P = 16), q = 1, window 20 (positions 10..29: both pages); batch 1: S = 3 in
    // page 2, q = 2; the table row of batch 1 padded with -1.
    PCase c = PCase::make(DType::kF32, {1, 2}, {30, 3}, 2, 2, 4, 4, 16, rng, 1);
    c.table = {3, 1, 2, -1};
    c.max_pages = 2;
    c.window = 20;
    c.fill_uniform(rng, -1, 1);
    c.pack();
    std::vector<unsigned char> out = out_buffer(c);
    nsa::PagedWindowAttentionParams p = c.window_params(out.data());
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
