// docs/spec/compress.md worked by hand: §8 A-D exactly, on the reference and on every CPU ISA path this host
// runs; the two rounding rules (rounding.h) against the independent model of the test utility; the row-count
// helpers of §3.
#include <cfloat>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "compress_test_util.h"
#include "ops/compress/batches.h"

namespace nsa_compress_test {
namespace {

// Every backend: the reference and the CPU backend on each supported ISA with 1 and 3 threads.
struct BackendRun {
  std::string name;
  Backend be;
  int isa, threads;
};
std::vector<BackendRun> all_runs() {
  std::vector<BackendRun> v{{"reference", Backend::kReference, -1, 1}};
  for (CpuIsa isa : supported_isas())
    for (int th : {1, 3}) v.push_back({std::string("cpu/") + nsa::cpu_isa_name(isa) + "/t" + std::to_string(th), Backend::kCpu, static_cast<int>(isa), th});
  return v;
}

// ---------------------------------------------------------------------------------------- §8 A
TEST(CompressHand, ExampleA_Fp32ByHand) {
  Case cs = Case::make(DType::kF32, {3}, 1, 1, 2, 1);
  cs.input = {1, 2, 3};
  cs.weight = {0.5, 0.25};
  ASSERT_EQ(cs.R(), 2);
  cs.grad = {1, 1};
  for (const BackendRun& run : all_runs()) {
    SCOPED_TRACE(run.name);
    const FwdResult f = run_forward(cs, run.be, run.isa, run.threads);
    ASSERT_TRUE(f.status.ok()) << f.status.message();
    EXPECT_EQ(f.out, (std::vector<double>{1.0, 1.75}));
    const BwdResult b = run_backward(cs, run.be, run.isa, run.threads);
    ASSERT_TRUE(b.status.ok()) << b.status.message();
    EXPECT_EQ(b.in_grad, (std::vector<double>{0.5, 0.75, 0.25}));
    EXPECT_EQ(b.w_grad, (std::vector<double>{3, 5}));
  }
}

// ---------------------------------------------------------------------------------------- §8 B
TEST(CompressHand, ExampleB_ForwardRoundsHalfAwayFromZero) {
  struct Tie {
    DType dt;
    double a, b, want;  // input [a, b], weight [1, 1]: a + b is halfway; want = rha
  };
  const Tie ties[] = {
      {DType::kBF16, 256, 1, 258},   {DType::kBF16, -256, -1, -258},  // rne would give +-256
      {DType::kF16, 2048, 1, 2050},  {DType::kF16, -2048, -1, -2050},  // rne would give +-2048
      {DType::kBF16, 1, 0.00390625, 1.0078125},                        // 1 + 2^-8: between 1 and 1 + 2^-7
      {DType::kF16, 65504, 16, INFINITY},                              // 65520: the tie above the largest value
      {DType::kBF16, 258, 1, 260},                                     // odd neighbour: rha and rne agree
  };
  // D = 1 as in §8, and D = 37 (the same tie in every column: whole vectors of every width and a scalar tail)
  for (const Tie& t : ties) {
    for (int64_t D : {1, 37}) {
      SCOPED_TRACE(std::string(nsa::dtype_name(t.dt)) + " " + std::to_string(t.a) + " + " + std::to_string(t.b) +
                   " D=" + std::to_string(D));
      Case cs = Case::make(t.dt, {2}, 1, D, 2, 2);
      for (int64_t j = 0; j < D; ++j) {
        cs.input[cs.ii(0, 0, j)] = t.a;
        cs.input[cs.ii(1, 0, j)] = t.b;
      }
      cs.weight = {1, 1};
      for (const BackendRun& run : all_runs()) {
        SCOPED_TRACE(run.name);
        const FwdResult f = run_forward(cs, run.be, run.isa, run.threads);
        ASSERT_TRUE(f.status.ok()) << f.status.message();
        for (int64_t j = 0; j < D; ++j) EXPECT_EQ(f.out[static_cast<size_t>(j)], t.want) << "column " << j;
      }
    }
  }
}

TEST(CompressHand, ExampleB_BackwardRoundsToNearestEven) {
  // l = d = 1, input = [256, 1] (C = 2), weight = [1], grad = [1, 1]: weight_grad = 257 -> 256 in bf16
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case cs = Case::make(dt, {2}, 1, 1, 1, 1);
    const double big = dt == DType::kBF16 ? 256 : 2048;
    cs.input = {big, 1};
    cs.weight = {1};
    cs.grad = {1, 1};
    for (const BackendRun& run : all_runs()) {
      SCOPED_TRACE(run.name);
      const BwdResult b = run_backward(cs, run.be, run.isa, run.threads);
      ASSERT_TRUE(b.status.ok()) << b.status.message();
      EXPECT_EQ(b.w_grad[0], big);  // rne: the even neighbour (rha would give big + 2)
      EXPECT_EQ(b.in_grad, (std::vector<double>{1, 1}));
    }
  }
  // input_grad ties too: l = 2, d = 1, three tokens; the middle token is in windows 0 and 1: with weight = [1, 1]
  // and grad = [256, 1] in every column, input_grad[1] = 1*256 + 1*1 = 257 -> 256 (D = 37: every lane path)
  const int64_t D = 37;
  Case cs = Case::make(DType::kBF16, {3}, 1, D, 2, 1);
  std::fill(cs.input.begin(), cs.input.end(), 1.0);
  cs.weight = {1, 1};
  for (int64_t j = 0; j < D; ++j) {
    cs.grad[cs.gi(0, 0, j)] = 256;
    cs.grad[cs.gi(1, 0, j)] = 1;
  }
  for (const BackendRun& run : all_runs()) {
    SCOPED_TRACE(run.name);
    const BwdResult b = run_backward(cs, run.be, run.isa, run.threads);
    ASSERT_TRUE(b.status.ok()) << b.status.message();
    for (int64_t j = 0; j < D; ++j) {
      EXPECT_EQ(b.in_grad[cs.ii(0, 0, j)], 256) << j;
      EXPECT_EQ(b.in_grad[cs.ii(1, 0, j)], 256) << j;
      EXPECT_EQ(b.in_grad[cs.ii(2, 0, j)], 1) << j;
    }
  }
}

// ---------------------------------------------------------------------------------------- §8 C
TEST(CompressHand, ExampleC_LengthsOfTheNpuBackwardTest) {
  const int64_t N = 2, D = 16;
  Case cs;
  cs.dtype = DType::kF32;
  cs.N = N;
  cs.D = D;
  cs.l = 32;
  cs.d = 16;
  cs.lens = {0, 5, 49};
  cs.resize();
  ASSERT_EQ(cs.T(), 49);
  ASSERT_EQ(cs.R(), 1);
  std::mt19937_64 rng(3);
  cs.fill_ints(rng, -4, 4);  // small integers: every sum exact
  for (const BackendRun& run : all_runs()) {
    SCOPED_TRACE(run.name);
    const FwdResult f = run_forward(cs, run.be, run.isa, run.threads);
    ASSERT_TRUE(f.status.ok()) << f.status.message();
    ASSERT_EQ(f.out.size(), static_cast<size_t>(N * D));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < D; ++j) {
        double want = 0;
        for (int64_t w = 0; w < 32; ++w) want += cs.weight[cs.wi(w, n)] * cs.input[cs.ii(5 + w, n, j)];
        EXPECT_EQ(f.out[cs.gi(0, n, j)], want);
      }
    const BwdResult b = run_backward(cs, run.be, run.isa, run.threads);
    ASSERT_TRUE(b.status.ok()) << b.status.message();
    for (int64_t t = 0; t < 49; ++t)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < D; ++j) {
          const double got = b.in_grad[cs.ii(t, n, j)];
          if (t < 5 || t >= 37) EXPECT_EQ(got, 0.0) << "row " << t;
          else EXPECT_EQ(got, cs.weight[cs.wi(t - 5, n)] * cs.grad[cs.gi(0, n, j)]) << "row " << t;
        }
    for (int64_t w = 0; w < 32; ++w)
      for (int64_t n = 0; n < N; ++n) {
        double want = 0;
        for (int64_t j = 0; j < D; ++j) want += cs.grad[cs.gi(0, n, j)] * cs.input[cs.ii(5 + w, n, j)];
        EXPECT_EQ(b.w_grad[cs.wi(w, n)], want);
      }
  }
  // The leading 0 describes an empty first batch: [5, 49] gives the same output (§2).
  Case cs2 = cs;
  cs2.lens = {5, 49};
  EXPECT_TRUE(same_values(run_forward(cs, Backend::kCpu).bytes, run_forward(cs2, Backend::kCpu).bytes, cs.dtype, "output"));
}

// ---------------------------------------------------------------------------------------- §8 D
TEST(CompressHand, ExampleD_OneNsaSequence) {
  for (int64_t S : {1024, 1030}) {
    SCOPED_TRACE("S = " + std::to_string(S));
    Case cs = Case::make(DType::kF32, {S}, 1, 2, 32, 16);
    ASSERT_EQ(cs.R(), 63);
    std::mt19937_64 rng(4);
    cs.fill_ints(rng, -3, 3);
    for (int64_t w = 0; w < 32; ++w) cs.weight[cs.wi(w, 0)] = static_cast<double>(w + 1);  // distinct weights
    for (const BackendRun& run : all_runs()) {
      SCOPED_TRACE(run.name);
      const FwdResult f = run_forward(cs, run.be, run.isa, run.threads);
      ASSERT_TRUE(f.status.ok()) << f.status.message();
      for (int64_t c : {0, 31, 62})
        for (int64_t j = 0; j < 2; ++j) {
          double want = 0;
          for (int64_t w = 0; w < 32; ++w) want += cs.weight[cs.wi(w, 0)] * cs.input[cs.ii(16 * c + w, 0, j)];
          EXPECT_EQ(f.out[cs.gi(c, 0, j)], want) << "c = " << c;
        }
      const BwdResult b = run_backward(cs, run.be, run.isa, run.threads);
      ASSERT_TRUE(b.status.ok()) << b.status.message();
      for (int64_t j = 0; j < 2; ++j) {
        // token 1010: window 62 only; token 1000: windows 61 and 62
        EXPECT_EQ(b.in_grad[cs.ii(1010, 0, j)], cs.weight[cs.wi(18, 0)] * cs.grad[cs.gi(62, 0, j)]);
        EXPECT_EQ(b.in_grad[cs.ii(1000, 0, j)],
                  cs.weight[cs.wi(24, 0)] * cs.grad[cs.gi(61, 0, j)] + cs.weight[cs.wi(8, 0)] * cs.grad[cs.gi(62, 0, j)]);
        for (int64_t t = 1024; t < S; ++t) EXPECT_EQ(b.in_grad[cs.ii(t, 0, j)], 0.0) << "uncovered token " << t;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- §3 helpers
TEST(CompressHand, RowCountHelpers) {
  EXPECT_EQ(nsa::compress_count(1024, 32, 16), 63);
  EXPECT_EQ(nsa::compress_count(44, 32, 16), 1);
  EXPECT_EQ(nsa::compress_count(31, 32, 16), 0);
  EXPECT_EQ(nsa::compress_count(0, 32, 16), 0);
  EXPECT_EQ(nsa::compress_count(32, 32, 32), 1);
  EXPECT_EQ(nsa::compress_count(3, 2, 1), 2);
  const int64_t lens[] = {0, 5, 49, 49, 1073};
  int64_t R = -1, cu[6] = {-1, -1, -1, -1, -1, -1};
  ASSERT_TRUE(nsa::compress_output_rows(nsa::IntList{lens, 5}, 32, 16, &R, cu).ok());
  EXPECT_EQ(R, 64);
  EXPECT_EQ((std::vector<int64_t>(cu, cu + 6)), (std::vector<int64_t>{0, 0, 0, 1, 1, 64}));
  // errors name the argument and write nothing
  const int64_t bad[] = {5, 3};
  R = -1;
  Status st = nsa::compress_output_rows(nsa::IntList{bad, 2}, 32, 16, &R, cu);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("actual_seq_len"), std::string::npos) << st.message();
  EXPECT_EQ(R, -1);
  st = nsa::compress_output_rows(nsa::IntList{lens, 5}, 16, 32, &R, nullptr);
  EXPECT_NE(st.message().find("compress_stride"), std::string::npos) << st.message();
  st = nsa::compress_output_rows(nsa::IntList{nullptr, 0}, 16, 16, &R, nullptr);
  EXPECT_NE(st.message().find("actual_seq_len"), std::string::npos) << st.message();
  EXPECT_EQ(R, -1);
}

// The backward's runs of tokens with the same covering windows (batches.h): every position of
// [p, covering_run_end(p)) has p's windows (counted directly from §5's definition), and the run is not empty.
TEST(CompressHand, CoveringRunsKeepTheirWindows) {
  const auto direct = [](int64_t p, int64_t C, int64_t l, int64_t d) {
    int64_t first = C, last = -1;
    for (int64_t c = 0; c < C; ++c)
      if (c * d <= p && p < c * d + l) first = std::min(first, c), last = std::max(last, c);
    return std::pair<int64_t, int64_t>(first, last);
  };
  for (int64_t l = 1; l <= 20; ++l)
    for (int64_t d = 1; d <= l; ++d)
      for (int64_t S : {l - 1, l, l + d + 3, 5 * l + 7}) {
        const int64_t C = nsa::compress_count(S, l, d);
        for (int64_t p = 0; p < S; ++p) {
          const int64_t end = nsa::compress_detail::covering_run_end(p, l, d);
          ASSERT_GT(end, p);
          const auto want = direct(p, C, l, d);
          int64_t first, last;
          nsa::compress_detail::covering_windows(p, C, l, d, &first, &last);
          if (want.second >= 0) EXPECT_EQ(std::make_pair(first, last), want) << "l=" << l << " d=" << d << " p=" << p;
          else EXPECT_GT(first, last) << "l=" << l << " d=" << d << " p=" << p;
          for (int64_t q = p + 1; q < std::min(end, S); ++q)
            ASSERT_EQ(direct(q, C, l, d), want) << "l=" << l << " d=" << d << " p=" << p << " q=" << q;
        }
      }
}

// ---------------------------------------------------------------------------------------- rounding helpers
float bits_f32(uint32_t u) { return nsa::detail::bits_f32(u); }

// rounding.h (bf16/fp16, rha/rne) equals the test utility's direct model on: every fp32 pattern around the
// boundaries of interest, and random patterns of every exponent.
void check_rounding(float x) {
  namespace cd = nsa::compress_detail;
  const double xd = x;
  const auto bf = [](uint16_t h) { return static_cast<double>(nsa::detail::bf16_to_f32(h)); };
  const auto hf = [](uint16_t h) { return static_cast<double>(nsa::detail::f16_to_f32(h)); };
  // the high-half form of the SIMD stores gives the same 16 bits, NaN payloads included, for both rules
  const uint32_t u = nsa::detail::f32_bits(x);
  for (bool away : {true, false})
    ASSERT_EQ(nsa::detail::bf16_bits_high_of(u, away) >> 16, nsa::detail::bf16_bits_of(u, away))
        << std::hex << "bits 0x" << u << (away ? " rha" : " rne");
  if (std::isnan(x)) {
    EXPECT_TRUE(std::isnan(bf(cd::f32_to_bf16_rha(x))));
    EXPECT_TRUE(std::isnan(hf(cd::f32_to_f16_rha(x))));
    EXPECT_TRUE(std::isnan(hf(cd::f32_to_f16_rne(x))));
    return;
  }
  ASSERT_EQ(bf(cd::f32_to_bf16_rha(x)), round_model(xd, DType::kBF16, true)) << "bf16 rha of " << x;
  ASSERT_EQ(bf(cd::f32_to_bf16_rne(x)), round_model(xd, DType::kBF16, false)) << "bf16 rne of " << x;
  ASSERT_EQ(hf(cd::f32_to_f16_rha(x)), round_model(xd, DType::kF16, true)) << "fp16 rha of " << x;
  ASSERT_EQ(hf(cd::f32_to_f16_rne(x)), round_model(xd, DType::kF16, false)) << "fp16 rne of " << x;
  // the sign of zero is kept
  if (x == 0) {
    EXPECT_EQ(std::signbit(bf(cd::f32_to_bf16_rha(x))), std::signbit(x));
  }
  // rne equals the library's existing nearest-even conversions bit for bit
  EXPECT_EQ(cd::f32_to_bf16_rne(x), nsa::detail::f32_to_bf16(x));
  EXPECT_EQ(cd::f32_to_f16_rne(x), nsa::detail::f32_to_f16(x));
}

TEST(CompressHand, RoundingHelpersMatchTheModel) {
  // ties and their neighbours: bf16 (16 dropped bits), fp16 normal (13) and subnormal results
  const float specials[] = {0.0f, -0.0f, 257.0f, -257.0f, 2049.0f, -2049.0f, 2051.0f, 65504.0f, 65519.99f, 65520.0f,
                            -65520.0f, 65536.0f, 1e30f, FLT_MAX, -FLT_MAX, INFINITY, -INFINITY, NAN, -NAN,
                            std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(3.0f, -26), std::ldexp(1.0f, -26),
                            std::ldexp(1.5f, -24), std::ldexp(2.5f, -24), std::ldexp(1023.5f, -24),
                            std::ldexp(2047.0f, -25), std::ldexp(1.0f, -14), FLT_MIN, std::ldexp(1.0f, -149)};
  for (float x : specials) check_rounding(x);
  for (uint32_t nan : {0x7f800001u, 0x7fbfffffu, 0xffc00000u, 0xff800123u, 0x7fff8000u}) check_rounding(bits_f32(nan));
  // every pattern of the low 17 bits around a few bf16 values, and the low 14 around fp16 values
  for (uint32_t base : {0x3f800000u, 0x43800000u, 0xc3808000u, 0x7f7f0000u, 0x00010000u}) {
    for (uint32_t low = 0; low < (1u << 17); low += 7) check_rounding(bits_f32(base + low));
    check_rounding(bits_f32(base + 0x8000u));
    check_rounding(bits_f32(base + 0x18000u));
  }
  for (uint32_t base : {0x45000000u, 0x38800000u, 0x33000000u, 0x387fc000u, 0x477fe000u, 0xb8000000u}) {
    for (uint32_t low = 0; low < (1u << 14); ++low) check_rounding(bits_f32(base + low));
  }
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200000; ++i) check_rounding(bits_f32(static_cast<uint32_t>(rng())));
}

}  // namespace
}  // namespace nsa_compress_test
