// Backward of selected attention (docs/spec/select_attention.md §8, §10): the reference against central finite
// differences of the fp64 forward; the gradients of §10's worked example by hand on every backend and ISA path;
// select_attention_backward_cpu against the fp64 model of select_util.h with FlashAttention's rule on many shapes;
// exact zeros where nothing contributes (§6); bitwise invariance over thread counts and input layouts; inf / NaN in
// keys and values that an entry cannot see.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "select_util.h"

namespace sel_test {
namespace {

// Whether select_attention_backward_cpu rounds P and dS to the dtype on this ISA (its bf16 dot-product path).
bool cpu_rounds(DType dt, CpuIsa isa) {
  return dt == DType::kBF16 && isa == CpuIsa::kAvx512Bf16;
}

AssertionResult bitwise_grads(const Grads& a, const Grads& b) {
  if (!a.status.ok() || !b.status.ok()) return AssertionFailure() << a.status.message() << " / " << b.status.message();
  if (a.raw != b.raw) {
    for (size_t i = 0; i < a.dq.size(); ++i)
      if (std::memcmp(&a.dq[i], &b.dq[i], 8)) return AssertionFailure() << "grad_query differs at " << i;
    for (size_t i = 0; i < a.dk.size(); ++i)
      if (std::memcmp(&a.dk[i], &b.dk[i], 8)) return AssertionFailure() << "grad_key differs at " << i;
    for (size_t i = 0; i < a.dv.size(); ++i)
      if (std::memcmp(&a.dv[i], &b.dv[i], 8)) return AssertionFailure() << "grad_value differs at " << i;
    return AssertionFailure() << "gradient bytes differ";
  }
  return AssertionSuccess();
}

// ------------------------------------------------------------------------------------ gradcheck

// The reference backward in fp64 against central differences of forward_fp64 on L = sum(attention_out dO), for
// every element of query, key and value: varlen with an empty batch and a partial last block, -1 slots,
// duplicates, future blocks (causal) and a row without visible entry; causal on and off.
TEST(SelectBackwardReference, GradcheckAgainstFiniteDifferencesFp64) {
  for (bool causal : {true, false}) {
    std::mt19937_64 rng(causal ? 1234 : 4321);
    SCase cs = SCase::make(DType::kF64, {5, 0, 4}, {7, 2, 6}, 4, 2, 3, 2, 3, 3);
    cs.causal = causal;
    cs.extra_kv_rows = 1;
    cs.resize();
    cs.fill_uniform(rng, -1.5, 1.5);
    cs.random_indices(rng, 0.2, 0.25);
    cs.index(1, 0, 0) = cs.index(1, 0, 1) = cs.index(1, 0, 2) = -1;  // no visible entry for KV head 0 of row 1
    SCOPED_TRACE(cs.describe());
    BwdInputs in = make_bwd_inputs(cs, rng);
    const Grads ana = run_bwd(cs, in, BwdBackend::kReference);
    ASSERT_TRUE(ana.status.ok()) << ana.status.message();
    ASSERT_TRUE(check_structural_zeros(cs, ana));
    auto loss = [&](const SCase& c2) {
      const SResult r = run(c2, SBackend::kRefFp64);
      double l = 0;
      for (size_t i = 0; i < r.out.size(); ++i) l += r.out[i] * in.go[i];
      return l;
    };
    const double h = 1e-6;
    auto probe = [&](std::vector<double> SCase::*field, size_t i, double analytic, const char* name) {
      SCase c2 = cs;
      const double x = (c2.*field)[i];
      (c2.*field)[i] = x + h;
      const double lp = loss(c2);
      (c2.*field)[i] = x - h;
      const double lm = loss(c2);
      const double num = (lp - lm) / (2 * h);
      EXPECT_LE(std::fabs(num - analytic), 1e-6 + 1e-5 * std::fabs(num))
          << name << "[flat " << i << "]: numeric " << num << ", analytic " << analytic;
    };
    for (size_t i = 0; i < cs.q.size(); ++i) probe(&SCase::q, i, ana.dq[i], "grad_query");
    for (size_t i = 0; i < static_cast<size_t>(cs.kv_end() * cs.N2 * cs.D); ++i) probe(&SCase::k, i, ana.dk[i], "grad_key");
    for (size_t i = 0; i < static_cast<size_t>(cs.kv_end() * cs.N2 * cs.Dv); ++i) probe(&SCase::v, i, ana.dv[i], "grad_value");
    // the CPU backend in fp64 is the same derivative
    EXPECT_TRUE(bitwise_grads(ana, run_bwd(cs, in, BwdBackend::kCpu)));
  }
}

// ------------------------------------------------------------------------------------ §10 gradients

// dO[5] = 1, every other row 0: case i gives key_grad[0..5] = [-5, -3, -1, 1, 3, 5] / 12, value_grad[0..5] = 1/6
// and query_grad[5] = 0 (the keys are 0); case iii key_grad[4] = 0.25, [5] = 0.5, [0..3] = [-3, -2, -1, 0] / 8,
// value_grad[4] = value_grad[5] = 2/8, [0..3] = 1/8. Every other row of key_grad and value_grad is 0.
TEST(SelectBackwardWorkedExample, Section10Gradients) {
  struct Want {
    const char* name;
    std::vector<int64_t> idx;
    std::vector<double> dk, dv;  // rows 0..9
  };
  const Want wants[] = {
      {"i", {1, 0, 2}, {-5.0 / 12, -3.0 / 12, -1.0 / 12, 1.0 / 12, 3.0 / 12, 5.0 / 12, 0, 0, 0, 0},
       {1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6, 0, 0, 0, 0}},
      {"iii", {1, 1, 0}, {-3.0 / 8, -2.0 / 8, -1.0 / 8, 0.0, 0.25, 0.5, 0, 0, 0, 0},
       {1.0 / 8, 1.0 / 8, 1.0 / 8, 1.0 / 8, 2.0 / 8, 2.0 / 8, 0, 0, 0, 0}},
  };
  for (DType dt : kAllDtypes)
    for (const Want& w : wants) {
      SCase cs = SCase::make(dt, {10}, {10}, 1, 1, 1, 1, 4, 3);
      cs.scale = 1.0;
      for (int64_t t = 0; t < 10; ++t) {
        cs.q[cs.qi(t, 0, 0)] = 1.0;
        cs.v[cs.vi(t, 0, 0)] = static_cast<double>(t);
      }
      for (int64_t j = 0; j < 3; ++j) cs.index(5, 0, j) = w.idx[static_cast<size_t>(j)];
      SCOPED_TRACE(std::string("case ") + w.name + " " + cs.describe());
      std::mt19937_64 rng(0);
      BwdInputs in = make_bwd_inputs(cs, rng);
      std::fill(in.go.begin(), in.go.end(), 0.0);
      in.go[5] = 1.0;
      std::vector<std::pair<std::string, Grads>> results;
      results.push_back({"reference", run_bwd(cs, in, BwdBackend::kReference)});
      for (CpuIsa isa : supported_isas())
        results.push_back({nsa::cpu_isa_name(isa), run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa))});
      for (const auto& [name, g] : results) {
        SCOPED_TRACE(name);
        ASSERT_TRUE(g.status.ok()) << g.status.message();
        for (int64_t r = 0; r < 10; ++r) {
          const double wk = w.dk[static_cast<size_t>(r)], wv = w.dv[static_cast<size_t>(r)];
          // exact up to the fp32 value of P = 1/6 and one rounding to the dtype
          EXPECT_NEAR(g.dk[static_cast<size_t>(r)], wk, ulp_of(dt, wk) + 1e-6) << "key_grad[" << r << "]";
          EXPECT_NEAR(g.dv[static_cast<size_t>(r)], wv, ulp_of(dt, wv) + 1e-6) << "value_grad[" << r << "]";
          if (std::string(w.name) == "iii" && dt != DType::kF64) {  // exact: P = 1/8, dS = (p - 3) / 8
            EXPECT_EQ(g.dk[static_cast<size_t>(r)], wk) << "key_grad[" << r << "]";
            EXPECT_EQ(g.dv[static_cast<size_t>(r)], wv) << "value_grad[" << r << "]";
          }
        }
        for (int64_t t = 0; t < 10; ++t) EXPECT_EQ(g.dq[static_cast<size_t>(t)], 0.0) << "query_grad[" << t << "]";
        double sum_ds = 0;  // sum dS = sum key_grad / (scale q) = 0 (§10), up to the roundings of each row
        for (double x : g.dk) sum_ds += x;
        EXPECT_NEAR(sum_ds, 0.0, 6 * ulp_of(dt, 0.5));
      }
    }
}

// ------------------------------------------------------------------------------------ against the model

struct Shape {
  std::vector<int64_t> sq, skv;
  int64_t N1, N2, D, Dv, lp, K;
};

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

// select_attention_backward_cpu on every ISA path against the fp64 model: max error <= 3 x that of the plain
// same-dtype implementation (the fp32 reference; where the backend rounds P and dS, the plain implementation that
// rounds them too) + the floor of check_grad; exact zeros where nothing contributes.
TEST(SelectBackward, CpuMatchesTheModel) {
  uint64_t seed = 500;
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
        const BwdInputs in = make_bwd_inputs(cs, rng);
        const GradModel gm = make_grad_model(cs, in);
        const Grads ref = run_bwd(cs, in, dt == DType::kF64 ? BwdBackend::kRefFp64 : BwdBackend::kRefFp32);
        ASSERT_TRUE(ref.status.ok()) << ref.status.message();
        EXPECT_TRUE(check_grads(cs, ref, gm, ref, false)) << "the reference";
        EXPECT_TRUE(check_structural_zeros(cs, ref)) << "the reference";
        const Grads rounded = run_bwd(cs, in, BwdBackend::kPlainRounded);
        for (CpuIsa isa : supported_isas()) {
          SCOPED_TRACE(nsa::cpu_isa_name(isa));
          const Grads got = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa));
          const bool r = cpu_rounds(dt, isa);
          EXPECT_TRUE(check_grads(cs, got, gm, r ? rounded : ref, r));
          EXPECT_TRUE(check_structural_zeros(cs, got));
        }
      }
}

// Larger G and NSA-like selections: many entries per key block (phase-B chunks) and block 0 selected by every row.
TEST(SelectBackward, CausalSelectionsManyRowsPerBlock) {
  uint64_t seed = 700;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32})
    for (int64_t G : {1, 5, 16}) {
      SCase cs = SCase::make(dt, {130, 20}, {130, 20}, 2 * G, 2, 24, 16, 16, 3);
      std::mt19937_64 rng(++seed);
      cs.fill_uniform(rng, -2, 2);
      cs.causal_indices(rng);
      SCOPED_TRACE(cs.describe());
      const BwdInputs in = make_bwd_inputs(cs, rng);
      const GradModel gm = make_grad_model(cs, in);
      const Grads ref = run_bwd(cs, in, BwdBackend::kRefFp32);
      const Grads rounded = run_bwd(cs, in, BwdBackend::kPlainRounded);
      for (CpuIsa isa : supported_isas()) {
        if (isa == CpuIsa::kScalar) continue;  // covered on smaller shapes; its reference-order GEMM is slow
        SCOPED_TRACE(nsa::cpu_isa_name(isa));
        const bool r = cpu_rounds(dt, isa);
        EXPECT_TRUE(check_grads(cs, run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa)), gm, r ? rounded : ref, r));
      }
    }
}

// Tiny tiles, chunks and pieces (src/ops/select_attention/cpu.h): several phase-A tiles per batch, several chunks
// per key block, blocks cut into several pieces whose partials are summed afterwards; against the model, and
// identical bits for every thread count.
TEST(SelectBackward, SmallTilesChunksAndPieces) {
  uint64_t seed = 800;
  for (DType dt : {DType::kBF16, DType::kF32})
    for (int64_t G : {1, 3}) {
      SCase cs = SCase::make(dt, {60, 0, 25}, {60, 4, 25}, 2 * G, 2, 12, 8, 8, 4);
      std::mt19937_64 rng(++seed);
      cs.fill_uniform(rng, -2, 2);
      cs.random_indices(rng, 0.1, 0.2);
      for (int64_t t = 0; t < cs.T1(); ++t) cs.index(t, 1, 0) = 0;  // block 0 of KV head 1: every row
      SCOPED_TRACE(cs.describe());
      const BwdInputs in = make_bwd_inputs(cs, rng);
      const GradModel gm = make_grad_model(cs, in);
      const Grads ref = run_bwd(cs, in, BwdBackend::kRefFp32);
      const Grads rounded = run_bwd(cs, in, BwdBackend::kPlainRounded);
      for (const nsa::select_cpu::Tuning& tu : {nsa::select_cpu::Tuning{0, 1, 1, 1}, nsa::select_cpu::Tuning{0, 5, 7, 13},
                                                 nsa::select_cpu::Tuning{0, 4096, 4096, 30}}) {
        for (CpuIsa isa : supported_isas()) {
          SCOPED_TRACE(std::string(nsa::cpu_isa_name(isa)) + " tile " + std::to_string(tu.bwd_tile_rows) + " chunk " +
                       std::to_string(tu.bwd_chunk_rows) + " piece " + std::to_string(tu.bwd_piece_rows));
          const bool r = cpu_rounds(dt, isa);
          const Grads one = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 1, &tu);
          EXPECT_TRUE(check_grads(cs, one, gm, r ? rounded : ref, r));
          EXPECT_TRUE(check_structural_zeros(cs, one));
          EXPECT_TRUE(bitwise_grads(one, run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 3, &tu)));
        }
      }
    }
}

// ------------------------------------------------------------------------------------ invariances

TEST(SelectBackward, ThreadCountsGiveIdenticalBits) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {45, 0, 37, 9}, {45, 3, 50, 9}, 6, 2, 20, 12, 8, 5);
    std::mt19937_64 rng(12);
    cs.fill_uniform(rng, -1, 1);
    cs.random_indices(rng);
    for (int64_t t = 0; t < cs.T1(); ++t)
      if (cs.blocks(cs.batch_of(t)) > 0) cs.index(t, 0, 0) = 0;  // a block every row of a batch selects
    SCOPED_TRACE(cs.describe());
    const BwdInputs in = make_bwd_inputs(cs, rng);
    for (CpuIsa isa : supported_isas()) {
      const Grads one = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 1);
      ASSERT_TRUE(one.status.ok()) << one.status.message();
      for (int th : {2, 3, 7}) {
        EXPECT_TRUE(bitwise_grads(one, run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), th)))
            << nsa::cpu_isa_name(isa) << " threads " << th;
      }
    }
  }
}

// Strided query / key / value / indices (int64), grad, attention_out and statistics give the same bits.
TEST(SelectBackward, LayoutsDoNotChangeResults) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {17, 6}, {20, 6}, 4, 2, 10, 6, 4, 3);
    cs.extra_kv_rows = 1;
    cs.resize();
    std::mt19937_64 rng(22);
    cs.fill_uniform(rng, -1, 1);
    cs.random_indices(rng);
    const BwdInputs in = make_bwd_inputs(cs, rng);
    SCase st = cs;
    st.q_layout.order = {1, 2, 0};
    st.q_layout.pad = {1, 2, 3};
    st.k_layout.order = {2, 0, 1};
    st.k_layout.step = 2;
    st.v_layout.pad = {0, 1, 5};
    st.idx_layout.order = {2, 1, 0};
    st.index_dtype = IndexDType::kInt64;
    BwdInputs sin = in;
    sin.go_layout.order = {2, 0, 1};
    sin.out_layout.pad = {1, 1, 1};
    sin.out_layout.step = 2;
    sin.stat_layout.order = {1, 0, 2};
    sin.stat_layout.pad = {0, 3, 2};
    for (CpuIsa isa : supported_isas()) {
      EXPECT_TRUE(bitwise_grads(run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa)),
                                run_bwd(st, sin, BwdBackend::kCpu, static_cast<int>(isa))))
          << nsa::cpu_isa_name(isa);
    }
    EXPECT_TRUE(bitwise_grads(run_bwd(cs, in, BwdBackend::kReference), run_bwd(st, sin, BwdBackend::kReference)));
  }
}

// The packing of key and value rows in place or staged (SelectForward.KeyValueRowsInPlaceOrStagedGiveTheSameBits)
// for the backward's three packed operands.
TEST(SelectBackward, KeyValueRowsInPlaceOrStagedGiveTheSameBits) {
  for_each_padded_key_value_layout(25, [](const SCase& cs, const SCase& st, std::mt19937_64& rng) {
    const BwdInputs in = make_bwd_inputs(cs, rng);
    for (CpuIsa isa : supported_isas())
      EXPECT_TRUE(bitwise_grads(run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa)),
                                run_bwd(st, in, BwdBackend::kCpu, static_cast<int>(isa))))
          << nsa::cpu_isa_name(isa);
  });
}

// inf / NaN in the key and value of position 6 of block 0 (causal): rows 0..5 see block 0 only in part; their dQ
// must stay finite and within the model's tolerance (the CPU backend takes its exact path for such entries of a
// block holding inf / NaN), and every gradient is non-finite exactly where the model's is.
TEST(SelectBackward, InvisibleNonFiniteKeysDoNotLeak) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCase cs = SCase::make(dt, {16}, {16}, 2, 1, 8, 8, 8, 2);
    std::mt19937_64 rng(44);
    cs.fill_uniform(rng, -1, 1);
    for (int64_t t = 0; t < 16; ++t) {
      cs.index(t, 0, 0) = 0;
      cs.index(t, 0, 1) = t >= 8 ? 1 : -1;
    }
    for (int64_t d = 0; d < cs.D; ++d) cs.k[cs.ki(6, 0, d)] = d % 2 ? kNaN : std::numeric_limits<double>::infinity();
    for (int64_t d = 0; d < cs.Dv; ++d) cs.v[cs.vi(6, 0, d)] = kNaN;
    SCOPED_TRACE(cs.describe());
    const BwdInputs in = make_bwd_inputs(cs, rng);
    const GradModel gm = make_grad_model(cs, in);
    for (int64_t t = 0; t < 16; ++t) ASSERT_EQ(std::isfinite(gm.dq[cs.qi(t, 0, 0)]), t < 6);
    const Grads ref = run_bwd(cs, in, BwdBackend::kRefFp32);
    const Grads rounded = run_bwd(cs, in, BwdBackend::kPlainRounded);
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(nsa::cpu_isa_name(isa));
      const bool r = cpu_rounds(dt, isa);
      EXPECT_TRUE(check_grads(cs, run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa)), gm, r ? rounded : ref, r));
    }
  }
}

}  // namespace
}  // namespace sel_test
