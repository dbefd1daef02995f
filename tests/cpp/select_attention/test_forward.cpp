// Forward of selected attention (docs/spec/select_attention.md §3-§6, §10): the worked example of §10 by hand on
// every backend and ISA path; the references and select_attention_cpu against the fp64 model of select_util.h on
// many shapes (every dtype, varlen with empty and short sequences, G = 1 and G > 1, D != Dv, causal on and off, -1
// slots, duplicates, unsorted indices, partial last blocks, rows without visible entry, l' below and above one
// panel); bitwise invariance over thread counts, memory layouts and index dtypes; inputs that no entry reaches
// (NaN there changes nothing).
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <random>
#include <vector>

#include "select_util.h"

namespace sel_test {
namespace {

// ------------------------------------------------------------------------------------ §10 worked example

// One batch, Sq = Skv = 10, N1 = N2 = 1, D = Dv = 1, l' = 4, K = 3, scale 1; every key 0, q[t] = 1, v[p] = p. Every
// row other than those set has only -1 slots (no visible entry).
SCase worked_case(DType dt, bool causal) {
  SCase cs = SCase::make(dt, {10}, {10}, 1, 1, 1, 1, 4, 3);
  cs.scale = 1.0;
  cs.causal = causal;
  for (int64_t t = 0; t < 10; ++t) {
    cs.q[cs.qi(t, 0, 0)] = 1.0;
    cs.k[cs.ki(t, 0, 0)] = 0.0;
    cs.v[cs.vi(t, 0, 0)] = static_cast<double>(t);
  }
  return cs;
}

void set_row(SCase& cs, int64_t t, std::vector<int64_t> x) {
  for (int64_t j = 0; j < 3; ++j) cs.index(t, 0, j) = x[static_cast<size_t>(j)];
}

struct WorkedRow {
  const char* name;
  std::vector<int64_t> idx;
  bool causal;
  double out_bf16;  // §10 table, bf16
  double out_exact; // the exact mean of the visible values (fp32 / fp64)
  float m, l;
};

TEST(SelectForwardWorkedExample, Section10TableOnEveryBackend) {
  const WorkedRow rows[] = {
      {"i", {1, 0, 2}, true, 2.5, 2.5, 0.0f, 6.0f},
      {"ii", {1, 0, 2}, false, 4.5, 4.5, 0.0f, 10.0f},
      {"iii", {1, 1, 0}, true, 3.0, 3.0, 0.0f, 8.0f},
      {"iv", {0, 1, 2}, true, 2.5, 2.5, 0.0f, 6.0f},
  };
  for (DType dt : kAllDtypes)
    for (const WorkedRow& wr : rows) {
      SCase cs = worked_case(dt, wr.causal);
      set_row(cs, 5, wr.idx);
      set_row(cs, 1, {2, 1, 2});     // every selected block in the future (causal) or a partial block (not)
      set_row(cs, 3, {-1, -1, -1});  // only empty slots
      SCOPED_TRACE(std::string("case ") + wr.name + " " + cs.describe());
      std::vector<std::pair<std::string, SResult>> results;
      results.push_back({"reference", run(cs, SBackend::kReference)});
      results.push_back({"reference fp64", run(cs, SBackend::kRefFp64)});
      for (CpuIsa isa : supported_isas()) results.push_back({nsa::cpu_isa_name(isa), run_cpu(cs, isa)});
      for (const auto& [name, r] : results) {
        SCOPED_TRACE(name);
        ASSERT_TRUE(r.status.ok()) << r.status.message();
        if (dt == DType::kBF16 || dt == DType::kF16 || std::string(wr.name) == "iii") {
          EXPECT_EQ(r.out[5], wr.out_bf16);  // the roundings of §4 step 4 make it exact (iii: P = 1/8 exact)
        } else {  // fp32 / fp64: P = 1/6 or 1/10 is inexact; the sum within a few ulps of the exact mean
          EXPECT_NEAR(r.out[5], wr.out_exact, 8 * ulp_of(DType::kF32, wr.out_exact));
        }
        EXPECT_EQ(r.smax[5 * 8], wr.m);
        EXPECT_EQ(r.ssum[5 * 8], wr.l);
        // row 3: no visible entry (§6)
        EXPECT_EQ(r.out[3], 0.0);
        EXPECT_EQ(r.smax[3 * 8], -FLT_MAX);
        EXPECT_EQ(r.ssum[3 * 8], FLT_MAX);
        if (wr.causal) {  // row 1 = s 1 with [2, 1, 2]: every block in the future
          EXPECT_EQ(r.out[1], 0.0);
          EXPECT_EQ(r.smax[1 * 8], -FLT_MAX);
          EXPECT_EQ(r.ssum[1 * 8], FLT_MAX);
        } else {  // blocks 2 (positions 8, 9), 1 (4..7), 2 again: 8 entries, mean (8+9+4+5+6+7+8+9)/8 = 7
          EXPECT_EQ(r.ssum[1 * 8], 8.0f);
          EXPECT_EQ(r.out[1], 7.0);
        }
      }
      // the bf16 roundings of §10 case i / ii: P = 1/6 -> 0.1669921875 (rha), sum 2.5048828125 -> 2.5 (rne)
      if (dt == DType::kBF16 && std::string(wr.name) == "i") {
        EXPECT_EQ(rha(DType::kBF16, 1.0 / 6.0), 0.1669921875);
        EXPECT_EQ(15 * 0.1669921875, 2.5048828125);
        EXPECT_EQ(rne(DType::kBF16, 2.5048828125), 2.5);
      }
      if (dt == DType::kBF16 && std::string(wr.name) == "ii") {
        EXPECT_EQ(rha(DType::kBF16, 0.1), 0.10009765625);
      }
    }
}

// The roundings themselves: rha ties away from zero where rne goes to even (bf16 and fp16), subnormal fp16 at the
// 2^-24 spacing without flush to zero (§12 item 2), NaN and overflow.
TEST(SelectForwardWorkedExample, RhaRoundingOfP) {
  using nsa::select_detail::f32_to_bf16_rha;
  using nsa::select_detail::f32_to_f16_rha;
  const float tie_bf16 = nsa::detail::bits_f32(0x3f808000u);  // halfway between bf16 1.0 and 1.0078125
  EXPECT_EQ(f32_to_bf16_rha(tie_bf16), 0x3f81);
  EXPECT_EQ(nsa::detail::f32_to_bf16(tie_bf16), 0x3f80);
  EXPECT_EQ(f32_to_bf16_rha(-tie_bf16), 0xbf81);
  EXPECT_EQ(f32_to_bf16_rha(nsa::detail::bits_f32(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(f32_to_f16_rha(1.0f + 1.0f / 2048.0f), 0x3c01);  // tie between 1 and 1 + 2^-10
  EXPECT_EQ(nsa::detail::f32_to_f16(1.0f + 1.0f / 2048.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16_rha(std::ldexp(1.0f, -25)), 0x0001);          // tie between 0 and 2^-24: away
  EXPECT_EQ(f32_to_f16_rha(std::ldexp(0.99f, -25)), 0x0000);         // below the tie
  EXPECT_EQ(f32_to_f16_rha(std::ldexp(3.0f, -25)), 0x0002);          // 1.5 x 2^-24 -> 2 x 2^-24
  EXPECT_EQ(f32_to_f16_rha(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16_rha(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16_rha(std::nanf("")) & 0x7e00, 0x7e00);
  EXPECT_EQ(f32_to_bf16_rha(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16_rha(FLT_MAX), 0x7f80);  // rounds up to inf
}

// ------------------------------------------------------------------------------------ against the model

struct Shape {
  std::vector<int64_t> sq, skv;
  int64_t N1, N2, D, Dv, lp, K;
};

// Many shapes: varlen with empty and short sequences (Sq = 0, Skv = 0, Skv < l'), G in {1, 2, 3, 8}, D != Dv and
// odd head dims, l' in {1, 3, 4, 16, 64, 80}, K up to 9, Sq != Skv.
const Shape kShapes[] = {
    {{7, 0, 12, 3}, {7, 0, 12, 5}, 2, 1, 8, 8, 4, 3},
    {{13}, {13}, 3, 3, 5, 3, 4, 4},
    {{20, 1}, {20, 2}, 6, 2, 12, 7, 3, 5},
    {{9, 11}, {6, 17}, 8, 1, 16, 16, 16, 2},
    {{40}, {40}, 4, 4, 24, 17, 1, 9},
    {{70, 5}, {70, 5}, 2, 2, 20, 20, 64, 2},
    {{30}, {100}, 3, 1, 9, 9, 80, 2},
    {{0, 6}, {4, 0}, 2, 2, 4, 4, 2, 3},
};

// The CPU backend on every ISA path and both references against the fp64 model; -1 slots, duplicates, unsorted
// indices, future and partial blocks, causal on and off, for every dtype.
TEST(SelectForward, CpuAndReferencesMatchTheModel) {
  uint64_t seed = 100;
  for (const Shape& s : kShapes)
    for (DType dt : kAllDtypes)
      for (bool causal : {true, false}) {
        SCase cs = SCase::make(dt, s.sq, s.skv, s.N1, s.N2, s.D, s.Dv, s.lp, s.K);
        cs.causal = causal;
        cs.extra_kv_rows = 2;
        cs.resize();
        std::mt19937_64 rng(++seed);
        cs.fill_uniform(rng, -2, 2);
        cs.random_indices(rng, 0.15, 0.15);
        SCOPED_TRACE(cs.describe() + " seed " + std::to_string(seed));
        const SOracle o = make_oracle(cs);
        EXPECT_TRUE(check_forward(cs, o, o.ref64)) << "forward_fp64";
        EXPECT_TRUE(check_forward(cs, o, run(cs, SBackend::kReference))) << "select_attention_reference";
        for (CpuIsa isa : supported_isas()) {
          SCOPED_TRACE(nsa::cpu_isa_name(isa));
          EXPECT_TRUE(check_forward(cs, o, run_cpu(cs, isa)));
        }
      }
}

// NSA-like selections (own block and block 0 first, earlier blocks only) with sharp softmaxes (large scores).
TEST(SelectForward, CausalSelectionsWithLargeScores) {
  uint64_t seed = 300;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (int64_t G : {1, 4, 16}) {
      SCase cs = SCase::make(dt, {150, 33}, {150, 33}, 2 * G, 2, 32, 24, 16, 4);
      std::mt19937_64 rng(++seed);
      cs.fill_uniform(rng, -3, 3);
      cs.causal_indices(rng);
      SCOPED_TRACE(cs.describe());
      const SOracle o = make_oracle(cs);
      for (CpuIsa isa : supported_isas()) {
        SCOPED_TRACE(nsa::cpu_isa_name(isa));
        EXPECT_TRUE(check_forward(cs, o, run_cpu(cs, isa)));
      }
    }
}

// Small-integer data whose rows have all-equal scores and power-of-two visible counts: P is exact, so every
// backend, ISA and thread count agrees bit for bit (§10).
TEST(SelectForward, ExactRowsAgreeBitwiseAcrossBackends) {
  for (DType dt : kAllDtypes) {
    SCase cs = SCase::make(dt, {32}, {32}, 4, 2, 6, 5, 8, 2);
    std::mt19937_64 rng(5);
    cs.fill_ints(rng, -4, 4);
    for (double& x : cs.k) x = 0.0;  // every score 0
    for (int64_t t = 0; t < 32; ++t)
      for (int64_t n2 = 0; n2 < 2; ++n2) {
        const int64_t own = t / 8;  // full blocks only: blocks before the own one (8 or 16 visible entries)
        cs.index(t, n2, 0) = own > 0 ? own - 1 : -1;
        cs.index(t, n2, 1) = own > 1 ? 0 : -1;
      }
    SCOPED_TRACE(cs.describe());
    const SResult ref = run(cs, SBackend::kReference);
    ASSERT_TRUE(ref.status.ok());
    EXPECT_TRUE(bitwise_equal(ref, run(cs, SBackend::kRefFp64)));
    for (CpuIsa isa : supported_isas())
      for (int th : {1, 3}) {
        EXPECT_TRUE(bitwise_equal(ref, run_cpu(cs, isa, th))) << nsa::cpu_isa_name(isa) << " threads " << th;
      }
  }
}

// Tiles of one query row and of every row of a batch (src/ops/select_attention/cpu.h): against the model, and
// identical bits for every thread count.
TEST(SelectForward, TileSizes) {
  uint64_t seed = 400;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (int64_t G : {1, 3}) {
      SCase cs = SCase::make(dt, {60, 0, 25}, {60, 4, 25}, 2 * G, 2, 12, 8, 8, 4);
      std::mt19937_64 rng(++seed);
      cs.fill_uniform(rng, -2, 2);
      cs.random_indices(rng, 0.1, 0.2);
      SCOPED_TRACE(cs.describe());
      const SOracle o = make_oracle(cs);
      for (int64_t rows : {int64_t(1), int64_t(7), int64_t(4096)})
        for (CpuIsa isa : supported_isas()) {
          SCOPED_TRACE(std::string(nsa::cpu_isa_name(isa)) + " tile rows " + std::to_string(rows));
          const nsa::select_cpu::Tuning tu{rows, 0, 0, 0};
          const SResult one = run_cpu_tuned(cs, isa, 1, tu);
          EXPECT_TRUE(check_forward(cs, o, one));
          EXPECT_TRUE(bitwise_equal(one, run_cpu_tuned(cs, isa, 3, tu)));
        }
    }
}

// ------------------------------------------------------------------------------------ invariances

// Threads 1, 2, 3, 7: identical bits on every ISA path.
TEST(SelectForward, ThreadCountsGiveIdenticalBits) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {45, 0, 37, 9}, {45, 3, 50, 9}, 6, 2, 20, 12, 8, 5);
    std::mt19937_64 rng(11);
    cs.fill_uniform(rng, -1, 1);
    cs.random_indices(rng);
    SCOPED_TRACE(cs.describe());
    for (CpuIsa isa : supported_isas()) {
      const SResult one = run_cpu(cs, isa, 1);
      ASSERT_TRUE(one.status.ok()) << one.status.message();
      for (int th : {2, 3, 7}) {
        EXPECT_TRUE(bitwise_equal(one, run_cpu(cs, isa, th))) << nsa::cpu_isa_name(isa) << " threads " << th;
      }
    }
  }
}

// Strided inputs (permuted dims, padding, inner step 2, stride-0 dims over constant data) and int64 indices in
// their own layout give the same bits as the contiguous int32 call.
TEST(SelectForward, LayoutsAndIndexDtypeDoNotChangeResults) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {17, 6}, {20, 6}, 4, 2, 10, 6, 4, 3);
    cs.extra_kv_rows = 1;
    cs.resize();
    std::mt19937_64 rng(21);
    cs.fill_uniform(rng, -1, 1);
    cs.random_indices(rng);
    const SResult base = run_cpu(cs, nsa::cpu_active_isa());
    ASSERT_TRUE(base.status.ok());
    SCase st = cs;
    st.q_layout.order = {1, 2, 0};
    st.q_layout.pad = {1, 2, 3};
    st.k_layout.order = {2, 0, 1};
    st.k_layout.step = 2;
    st.v_layout.pad = {0, 1, 5};
    st.v_layout.order = {0, 2, 1};
    st.idx_layout.order = {2, 1, 0};
    st.idx_layout.pad = {2, 0, 1};
    st.index_dtype = IndexDType::kInt64;
    SCOPED_TRACE(st.describe());
    for (CpuIsa isa : supported_isas()) {
      EXPECT_TRUE(bitwise_equal(run_cpu(cs, isa), run_cpu(st, isa))) << nsa::cpu_isa_name(isa);
    }
    EXPECT_TRUE(bitwise_equal(run(cs, SBackend::kReference), run(st, SBackend::kReference)));
    // stride 0 along the heads of the value (the same values for every KV head)
    SCase z = cs;
    for (int64_t r = 0; r < z.T2(); ++r)
      for (int64_t j = 0; j < z.Dv; ++j) z.v[z.vi(r, 1, j)] = z.v[z.vi(r, 0, j)];
    const SResult zbase = run_cpu(z, nsa::cpu_active_isa());
    z.v_layout.zero_dim = 1;
    EXPECT_TRUE(bitwise_equal(zbase, run_cpu(z, nsa::cpu_active_isa())));
  }
}

// Key and value rows are packed from the tensor in place where they already are operand rows (pairs path: bf16,
// unit element stride, even D, rows at 32-bit aligned addresses and an even row stride; fp32 path: fp32 with unit
// element stride) and staged otherwise. Padded heads (every other head's rows misaligned), an odd row stride (one
// KV head) and padded rows must give the bits of the contiguous layout; the last blocks hold 3 keys (an odd pair).
TEST(SelectForward, KeyValueRowsInPlaceOrStagedGiveTheSameBits) {
  for_each_padded_key_value_layout(23, [](const SCase& cs, const SCase& st, std::mt19937_64&) {
    for (CpuIsa isa : supported_isas())
      EXPECT_TRUE(bitwise_equal(run_cpu(cs, isa), run_cpu(st, isa))) << nsa::cpu_isa_name(isa);
  });
}

// Inputs no visible entry reaches do not matter: NaN in key/value rows past Skv_b of a partial last block (the next
// batch's rows), past the last prefix sum, and in blocks no row selects; NaN or inf in future positions of a
// selected block (causal) changes nothing for the rows that cannot see them.
TEST(SelectForward, UnreachedInputsAreNeverRead) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {12, 9}, {10, 9}, 2, 1, 8, 8, 4, 3);
    cs.extra_kv_rows = 3;
    cs.resize();
    std::mt19937_64 rng(33);
    cs.fill_uniform(rng, -1, 1);
    cs.random_indices(rng, 0.0, 0.2);
    for (int64_t t = 0; t < cs.T1(); ++t) cs.index(t, 0, 0) = 2;  // partial last block of batch 0 / block 2 of batch 1
    for (int64_t t = cs.sq[0]; t < cs.T1(); ++t)
      for (int64_t j = 0; j < cs.K; ++j)
        if (cs.index(t, 0, j) == 1) cs.index(t, 0, j) = 0;  // nobody in batch 1 selects block 1 (rows 14..17)
    SCOPED_TRACE(cs.describe());
    const SOracle o = make_oracle(cs);
    for (CpuIsa isa : supported_isas()) {
      const SResult base = run_cpu(cs, isa);
      ASSERT_TRUE(check_forward(cs, o, base));
      SCase poisoned = cs;
      for (int64_t n = 0; n < cs.D; ++n) poisoned.k[poisoned.ki(14, 0, n)] = kNaN;  // batch 1, block 1
      for (int64_t n = 0; n < cs.Dv; ++n) poisoned.v[poisoned.vi(15, 0, n)] = kNaN;
      EXPECT_TRUE(bitwise_equal(base, run_cpu(poisoned, isa))) << nsa::cpu_isa_name(isa) << ": unselected block";
    }
  }
}

// inf / NaN in the key and value of position 6 of block 0 (causal): rows 0..5 see block 0 only in part and must
// not see them (0 x inf is NaN: the CPU backend takes its exact path for such entries of a block holding inf /
// NaN); rows 6.. see them and give NaN as the model does.
TEST(SelectForward, InvisibleNonFiniteValuesDoNotLeak) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {16}, {16}, 2, 1, 8, 8, 8, 2);
    std::mt19937_64 rng(44);
    cs.fill_uniform(rng, -1, 1);
    for (int64_t t = 0; t < 16; ++t) {
      cs.index(t, 0, 0) = 0;
      cs.index(t, 0, 1) = t >= 8 ? 1 : -1;
    }
    for (int64_t d = 0; d < cs.D; ++d) cs.k[cs.ki(6, 0, d)] = d % 2 ? kNaN : std::numeric_limits<double>::infinity();
    for (int64_t d = 0; d < cs.Dv; ++d) cs.v[cs.vi(6, 0, d)] = d % 2 ? kNaN : -std::numeric_limits<double>::infinity();
    SCOPED_TRACE(cs.describe());
    const SOracle o = make_oracle(cs);
    for (int64_t t = 0; t < 16; ++t) ASSERT_EQ(std::isfinite(o.md.out[static_cast<size_t>(t * cs.N1 * cs.Dv)]), t < 6);
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(nsa::cpu_isa_name(isa));
      EXPECT_TRUE(check_forward(cs, o, run_cpu(cs, isa)));
    }
  }
}

// T1 = 0 (no query rows at all) is valid and writes nothing; so is Skv = 0 everywhere with -1 indices.
TEST(SelectForward, DegenerateSizes) {
  SCase cs = SCase::make(DType::kBF16, {0}, {5}, 2, 2, 4, 4, 4, 2);
  std::mt19937_64 rng(1);
  cs.fill_uniform(rng, -1, 1);
  for (SBackend b : {SBackend::kReference, SBackend::kCpu}) {
    EXPECT_TRUE(run(cs, b).status.ok()) << backend_name(b);
  }
  SCase z = SCase::make(DType::kF32, {3, 2}, {0, 0}, 2, 1, 4, 4, 4, 2);
  z.fill_uniform(rng, -1, 1);
  const SOracle o = make_oracle(z);
  for (CpuIsa isa : supported_isas()) {
    EXPECT_TRUE(check_forward(z, o, run_cpu(z, isa)));
  }
}

}  // namespace
}  // namespace sel_test
