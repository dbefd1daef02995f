// npu_nsa_compress_attention_infer (docs/spec/decode.md §3): the §5 worked example and the Sel' tail block by hand,
// random cases on the reference and every ISA path against the independent fp64 model (§6), bitwise over thread
// counts and between rows read in place and copied rows, and every argument rule with its message and nothing
// written.
#include <string>

#include "compress_attention_infer/cai_util.h"

namespace nsa_cai_test {
namespace {

using nsa_test::kAllDtypes;
using nsa_test::supported_isas;

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
std::string path_name(const Path& pa) {
  return pa.be == Backend::kReference ? std::string("reference")
                                      : std::string("cpu ") + nsa::cpu_isa_name(pa.isa) + " threads " + std::to_string(pa.threads);
}

// §5 "Compressed attention": batch 0 with C_0 = 4, S_0 = 80, l = 32, d = 16, l' = 64: Sel' = 2, forced {0, 1}; K = 3
// gives [0, 1, -1]. MTP with q_0 = 2 and atten_mask: token 0 (position 78) does not see compressed token 3 (window
// 48..79); token 1 sees all four. Zero queries make every visible score equal: P = 1/3 resp. 1/4; values 1, 1, 1
// and 100 make the masking visible in the output (3 * rne(1/3) vs 103 / 4).
TEST(CompressAttentionInferHand, WorkedExampleMtpAndPadding) {
  for (DType dt : kAllDtypes) {
    CACase cs;
    cs.dtype = dt;
    cs.D = cs.Dv = 16;
    cs.P = 2;
    cs.K = 3;
    cs.q = {2};
    cs.C = {4};
    cs.S = {80};
    cs.atten = true;
    cs.table = {{3, 0, -1}};
    cs.num_pages = 4;
    cs.resize();
    for (int64_t c = 0; c < 4; ++c)
      for (int64_t j = 0; j < cs.Dv; ++j) {
        const int64_t page = cs.table[0][c / 2];
        cs.value[((page * cs.P + c % 2) * cs.N2) * cs.Dv + j] = c == 3 ? 100.0 : 1.0;
      }
    const double third = round_to(dt, 1.0 / 3.0);
    for (const Path& pa : all_paths()) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " " + path_name(pa));
      const CARun r = run(cs, pa.be, pa.isa, pa.threads);
      ASSERT_TRUE(r.status.ok()) << r.status.message();
      for (int64_t row = 0; row < 2; ++row) {
        EXPECT_EQ(r.topk[row * 3 + 0], 0);
        EXPECT_EQ(r.topk[row * 3 + 1], 1);
        EXPECT_EQ(r.topk[row * 3 + 2], -1);  // K = 3 > Sel' = 2 (the NPU rejects it)
      }
      for (int64_t j = 0; j < cs.Dv; ++j) {
        EXPECT_NEAR(r.out[j], 3 * third, 2 * ulp_of(dt, 1.0)) << "token 0 must not see compressed token 3";
        EXPECT_EQ(r.out[cs.Dv + j], 25.75) << "token 1 sees all four";
      }
    }
    // without atten_mask nothing is masked: both tokens average all four (a valid call, not an MTP error)
    cs.atten = false;
    cs.S.clear();
    const CARun r = run(cs, Backend::kCpu, CpuIsa::kScalar, 1);
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    EXPECT_EQ(r.out[0], 25.75);
  }
}

// §3 step 6 note: C = 64, d = 16, l = 32, l' = 64 gives Sel' = 17 (training: 16). Uniform P = 1/64: every full block
// k in [1, 14] scores 8/64 (weights 1, 2, 2, 2, 1), block 16 scores 0; forced blocks 0, 15, 16 come first in
// ascending order, then the ties by smaller index: [0, 15, 16, 1, 2]. G = 2 adds two equal heads (exact).
TEST(CompressAttentionInferHand, SelPrimeTailBlockAndForcedOrder) {
  for (const Path& pa : all_paths()) {
    CACase cs;
    cs.dtype = DType::kBF16;
    cs.N1 = 4;
    cs.N2 = 2;
    cs.D = 8;
    cs.Dv = 8;
    cs.P = 16;
    cs.K = 5;
    cs.q = {1};
    cs.C = {64};
    cs.num_pages = 4;
    cs.table = {{2, 0, 3, 1}};
    cs.resize();
    const CARun r = run(cs, pa.be, pa.isa, pa.threads);
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    for (int64_t n2 = 0; n2 < 2; ++n2) {
      const std::vector<int32_t> want{0, 15, 16, 1, 2};
      EXPECT_EQ(std::vector<int32_t>(r.topk.begin() + n2 * 5, r.topk.begin() + n2 * 5 + 5), want) << path_name(pa);
    }
    EXPECT_TRUE(check_model(cs, r)) << path_name(pa);
  }
}

// Random cases against the fp64 model; every CPU path bitwise equal over thread counts.
struct Geo {
  DecodeLayout layout;
  int64_t N1, N2, D, Dv, P, l, d, lp, K, Sq;
  std::vector<int64_t> q, C;
  bool atten;
};

CACase random_case(const Geo& g, DType dt, std::mt19937& rng) {
  CACase cs;
  cs.dtype = dt;
  cs.layout = g.layout;
  cs.N1 = g.N1;
  cs.N2 = g.N2;
  cs.D = g.D;
  cs.Dv = g.Dv;
  cs.P = g.P;
  cs.l = g.l;
  cs.d = g.d;
  cs.lp = g.lp;
  cs.K = g.K;
  cs.Sq = g.Sq;
  cs.q = g.q;
  cs.C = g.C;
  cs.atten = g.atten;
  cs.scale = 1.0 / std::sqrt(static_cast<double>(g.D));
  std::uniform_int_distribution<int64_t> extra(0, g.d - 1);
  // S_b consistent with C_b = (S_b - l)/d + 1; even batches end exactly on a window (their MTP tokens before the
  // last are masked from the last compressed token), odd ones a random distance past it
  for (size_t b = 0; b < g.C.size(); ++b) cs.S.push_back((g.C[b] - 1) * g.d + g.l + (b % 2 == 0 ? 0 : extra(rng)));
  cs.random_pages(rng);
  cs.resize();
  cs.fill_uniform(rng, -1.5, 1.5);
  return cs;
}

TEST(CompressAttentionInferCpu, RandomCasesVsModelOnEveryPath) {
  const Geo geos[] = {
      // TND decode, G = 1, D != Dv, P not dividing, K > Sel' for the short batch (-1 padding)
      {DecodeLayout::kTND, 2, 2, 24, 16, 5, 32, 16, 64, 4, 1, {1, 1, 1}, {7, 33, 70}, false},
      // TND MTP with causality, G = 4, P = 1
      {DecodeLayout::kTND, 4, 1, 32, 32, 1, 32, 16, 64, 3, 1, {2, 3, 1}, {5, 40, 2}, true},
      // BSND, q_b < Sq (padding rows), MTP, G = 2, odd D
      {DecodeLayout::kBSND, 4, 2, 19, 12, 16, 32, 16, 64, 5, 3, {3, 1, 2}, {50, 9, 130}, true},
      // small d: M = 4, N = 2, K > 32 (the general top-k), q_b > 1 without atten_mask
      {DecodeLayout::kTND, 3, 1, 16, 8, 7, 4, 2, 8, 40, 1, {1, 2}, {150, 61}, false},
      // l = d = l' (M = N = 1), G = 8
      {DecodeLayout::kTND, 8, 1, 64, 64, 64, 16, 16, 16, 6, 1, {1, 1}, {3, 200}, false},
  };
  std::mt19937 rng(77);
  for (DType dt : kAllDtypes)
    for (size_t gi = 0; gi < std::size(geos); ++gi) {
      CACase cs = random_case(geos[gi], dt, rng);
      cs.kv_step = gi % 2 ? 2 : 1;  // key / value with a strided last dim (read element by element) or contiguous
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " geometry " + std::to_string(gi));
      const CARun ref = run(cs, Backend::kReference);
      ASSERT_TRUE(ref.status.ok()) << ref.status.message();
      EXPECT_TRUE(check_model(cs, ref)) << "reference";
      for (CpuIsa isa : supported_isas()) {
        const CARun r1 = run(cs, Backend::kCpu, isa, 1);
        ASSERT_TRUE(r1.status.ok()) << r1.status.message();
        EXPECT_TRUE(check_model(cs, r1)) << nsa::cpu_isa_name(isa);
        for (int t : {2, 5}) {
          const CARun rt = run(cs, Backend::kCpu, isa, t);
          EXPECT_TRUE(rt.out_bytes == r1.out_bytes && rt.topk == r1.topk) << nsa::cpu_isa_name(isa) << " threads " << t;
        }
      }
    }
}

// The in-place reads of the CPU backend over longer rows (cpu.cpp steps 2 and 4): score tiles over many shuffled pages;
// P.V in several reduction chunks (512 tokens on bf16 pairs, 256 in fp32) and sub-blocks with an odd last token;
// value rows whose length is not a multiple of 32 (masked lanes, and a second block of 64 values with no valid lane
// in its upper half); more than 64 query rows (two query panels); a short odd C; G = 1. Every path against the
// model, and bitwise equal for 1, 2 and 7 threads, including B = 1.
TEST(CompressAttentionInferCpu, LongRowsInPlaceReadsOnEveryPath) {
  const Geo geos[] = {
      // B = 1, G = 16, C = 1101 (three bf16 chunks, the last odd), P = 64, D even (keys in place), Dv = 40
      {DecodeLayout::kTND, 16, 1, 48, 40, 64, 32, 16, 64, 8, 1, {1}, {1101}, false},
      // G = 1, N2 = 2, C = 37 < one sub-block and odd, P = 7, Dv = 72 (lanes 8 of the second value block), odd D
      {DecodeLayout::kTND, 2, 2, 73, 72, 7, 32, 16, 64, 3, 1, {1}, {37}, false},
      // MTP with q_b = 5 and G = 16: R = 80 query rows (two query panels), C = 600 and 513, P = 64
      {DecodeLayout::kTND, 32, 2, 24, 16, 64, 32, 16, 64, 6, 1, {5, 2}, {600, 513}, true},
      // G = 6 and q_b = 11: token 10's query rows 60 .. 65 straddle the two query panels (their words transposed in
      // two calls); BSND, even D
      {DecodeLayout::kBSND, 12, 2, 40, 24, 16, 32, 16, 64, 4, 11, {11, 3}, {300, 90}, true},
  };
  std::mt19937 rng(2024);
  for (DType dt : kAllDtypes)
    for (size_t gi = 0; gi < std::size(geos); ++gi) {
      CACase cs = random_case(geos[gi], dt, rng);
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " geometry " + std::to_string(gi));
      for (CpuIsa isa : supported_isas()) {
        const CARun r1 = run(cs, Backend::kCpu, isa, 1);
        ASSERT_TRUE(r1.status.ok()) << r1.status.message();
        EXPECT_TRUE(check_model(cs, r1)) << nsa::cpu_isa_name(isa);
        for (int t : {2, 7}) {
          const CARun rt = run(cs, Backend::kCpu, isa, t);
          EXPECT_TRUE(rt.out_bytes == r1.out_bytes && rt.topk == r1.topk) << nsa::cpu_isa_name(isa) << " threads " << t;
        }
      }
    }
}

// Contiguous bf16 rows (even D) are read where they lie: key rows as the score GEMM's A operand and, on avx512bf16,
// value rows through KernelTable::gemm.pv_bf16; rows with an element stride of 2 are copied / packed first. Both give
// the same outputs and indices on every path (C across P.V chunks and sub-blocks with an odd last token, G = 16 with
// R = 16 and MTP R = 80, pages of 64 and 16, Dv = 40 and 128).
TEST(CompressAttentionInferCpu, InPlaceRowsMatchCopiedRowsBitwise) {
  const Geo geos[] = {
      {DecodeLayout::kTND, 16, 1, 48, 40, 64, 32, 16, 64, 8, 1, {1}, {1101}, false},
      {DecodeLayout::kTND, 32, 2, 192, 128, 16, 32, 16, 64, 16, 1, {1, 1}, {777, 64}, false},
      {DecodeLayout::kTND, 32, 2, 24, 16, 64, 32, 16, 64, 6, 1, {5, 2}, {600, 513}, true},
  };
  std::mt19937 rng(2025);
  for (size_t gi = 0; gi < std::size(geos); ++gi) {
    CACase cs = random_case(geos[gi], DType::kBF16, rng);
    for (CpuIsa isa : supported_isas()) {
      cs.kv_step = 1;
      const CARun in_place = run(cs, Backend::kCpu, isa, 2);
      cs.kv_step = 2;
      const CARun copied = run(cs, Backend::kCpu, isa, 2);
      ASSERT_TRUE(in_place.status.ok() && copied.status.ok());
      EXPECT_TRUE(in_place.out_bytes == copied.out_bytes && in_place.topk == copied.topk)
          << nsa::cpu_isa_name(isa) << " geometry " << gi;
    }
  }
}

// ------------------------------------------------------------------ argument rules (§3)
CACase valid_case() {
  std::mt19937 rng(5);
  return random_case({DecodeLayout::kTND, 4, 2, 16, 8, 4, 32, 16, 64, 2, 1, {2, 1}, {6, 9}, true}, DType::kBF16, rng);
}

void expect_error(const CACase& cs, void (*mutate)(nsa::CompressAttentionInferParams&), const std::string& needle) {
  for (Backend be : {Backend::kReference, Backend::kCpu}) {
    Bound bd;
    bind(cs, bd);
    if (mutate) mutate(bd.p);
    const std::vector<unsigned char> out = bd.out;
    const std::vector<int32_t> topk = bd.topk;
    const Status st = run_backend(bd.p, be, CpuIsa::kScalar, 2);
    ASSERT_FALSE(st.ok()) << needle;
    EXPECT_NE(st.message().find(needle), std::string::npos) << "message: " << st.message() << "\nexpected: " << needle;
    EXPECT_TRUE(bd.out == out && bd.topk == topk) << "written on error: " << needle;
  }
}

using P_ = nsa::CompressAttentionInferParams;

TEST(CompressAttentionInferValidation, EveryRuleNamesItsArgument) {
  const CACase base = valid_case();
  ASSERT_TRUE(run(base, Backend::kCpu).status.ok());
  expect_error(base, [](P_& p) { p.layout = static_cast<DecodeLayout>(7); }, "layout must be \"TND\" or \"BSND\"");
  expect_error(base, [](P_& p) { p.head_num = 3; }, "head_num (3) must equal the number of query heads N1");
  expect_error(base, [](P_& p) { p.key_value_head_num = 0; }, "key_value_head_num must be >= 1");
  expect_error(base, [](P_& p) { p.key_value_head_num = 3; }, "head_num (4) must be a multiple of key_value_head_num (3)");
  expect_error(base, [](P_& p) { p.key.size[2] = 31; }, "key must have shape [num_pages, page_block_size, N2 * D]");
  expect_error(base, [](P_& p) { p.value.size[2] = 15; }, "must be a positive multiple of key_value_head_num");
  expect_error(base, [](P_& p) { p.value.size[2] = 34; }, "value's head dim Dv (17) must be <= query's head dim D (16)");
  expect_error(base, [](P_& p) { p.value.size[0] -= 1; }, "key and value must have the same [num_pages, page_block_size]");
  expect_error(base, [](P_& p) { p.page_block_size = 8; }, "page_block_size (8) must equal key.shape[1]");
  expect_error(base, [](P_& p) { p.compress_stride = 0; }, "compress_stride must be >= 1");
  expect_error(base, [](P_& p) { p.compress_block_size = 8; }, "compress_block_size (8) must be >= compress_stride (16)");
  expect_error(base, [](P_& p) { p.select_block_size = 16; }, "select_block_size (16) must be >= compress_block_size (32)");
  expect_error(base, [](P_& p) { p.select_block_size = 40; }, "select_block_size (40) must be a multiple of compress_stride (16)");
  expect_error(base, [](P_& p) { p.select_block_count = 0; }, "select_block_count must be >= 1");
  expect_error(base, [](P_& p) { p.actual_cmp_seq_kvlen.data = nullptr; }, "actual_cmp_seq_kvlen must be given");
  expect_error(base, [](P_& p) { p.block_table = nullptr; }, "block_table must be given");
  expect_error(base, [](P_& p) { p.block_table_rows = 3; }, "block_table must have B = 2 rows");
  expect_error(base, [](P_& p) { p.actual_seq_qlen.size = 1; }, "actual_seq_qlen must have B = 2 entries");
  expect_error(base, [](P_& p) { p.query_size[1] = 4; }, "query (TND) must have T = sum(actual_seq_qlen) = 3 rows, got T = 4");
  expect_error(base, [](P_& p) { p.actual_sel_seq_kvlen.data = nullptr; }, "actual_sel_seq_kvlen must be given");
  expect_error(base, [](P_& p) { p.actual_sel_seq_kvlen.size = 1; }, "actual_sel_seq_kvlen must have B = 2 entries");
  expect_error(base, [](P_& p) { p.attention_out = nullptr; }, "attention_out must not be null");
  expect_error(base, [](P_& p) { p.topk_indices = nullptr; }, "topk_indices must not be null");
  {
    CACase cs = base;
    cs.q = {0, 3};
    expect_error(cs, nullptr, "actual_seq_qlen[0] must be >= 1");
  }
  {
    CACase cs = base;
    cs.C = {0, 9};
    cs.atten = false;
    expect_error(cs, nullptr, "actual_cmp_seq_kvlen[0] must be >= 1");
  }
  {  // MTP: C_b must equal (S_b - l) / d + 1; q_b <= S_b
    CACase cs = base;
    cs.S[1] += 16;
    expect_error(cs, nullptr, "actual_cmp_seq_kvlen[1] (9) must equal (S_b - l) / d + 1 = 10");
    cs = base;
    cs.C = {1, 9};
    cs.S[0] = 1;
    expect_error(cs, nullptr, "actual_sel_seq_kvlen[0] (1) must be >= actual_seq_qlen[0] (2)");
  }
  {  // pages: the table too short, a page out of range (-1 in a needed column)
    CACase cs = base;
    cs.C = {6, 9};
    cs.table[1].resize(2);
    cs.table[0].resize(2);
    cs.atten = false;
    expect_error(cs, nullptr, "block_table has max_pages = 2 columns, but batch 1 has C_b = 9 compressed tokens which need page index 2");
    cs = base;
    cs.table[1][2] = -1;
    expect_error(cs, nullptr, "block_table[1, 2] = -1 must be a page of key/value in [0, ");
    cs.table[1][2] = static_cast<int32_t>(cs.num_pages);
    expect_error(cs, nullptr, "must be a page of key/value in [0, ");
  }
  {  // TND without actual_seq_qlen: one token per batch (T must be B)
    CACase cs = base;
    cs.pass_q = false;
    expect_error(cs, nullptr, "query (TND) must have T = B (one token per batch) = 2 rows, got T = 3");
  }
  {  // BSND: q_b <= Sq; Sq = 1 without actual_seq_qlen; B rows in dim 0
    std::mt19937 rng(6);
    CACase cs = random_case({DecodeLayout::kBSND, 2, 1, 8, 8, 4, 32, 16, 64, 2, 2, {2, 1}, {6, 9}, false}, DType::kF32, rng);
    ASSERT_TRUE(run(cs, Backend::kCpu).status.ok());
    expect_error(cs, [](P_& p) { p.query_size[1] = 1; }, "actual_seq_qlen[0] (2) must be <= Sq = query.shape[1] (1) for layout BSND");
    expect_error(cs, [](P_& p) { p.query_size[0] = 3; }, "query (BSND) must have B = 2 batches in dim 0");
    cs.pass_q = false;
    expect_error(cs, nullptr, "actual_seq_qlen must be given for layout BSND when Sq = query.shape[1] (2) is not 1");
  }
}

// Only what the call reads is checked: q_b > 1 without atten_mask needs no S_b; pages past C_b may be -1; K may
// exceed Sel'.
TEST(CompressAttentionInferValidation, UnreadArgumentsAreFree) {
  CACase cs = valid_case();
  cs.atten = false;
  cs.pass_s = false;
  cs.K = 9;
  const CARun r = run(cs, Backend::kCpu, CpuIsa::kScalar, 2);
  ASSERT_TRUE(r.status.ok()) << r.status.message();
  EXPECT_TRUE(check_model(cs, r));
}

}  // namespace
}  // namespace nsa_cai_test
