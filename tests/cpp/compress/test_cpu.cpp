// compress_cpu / compress_backward_cpu on EVERY CpuIsa path this host runs and thread counts 1, 2, 3, 7:
//   - output and input_grad bitwise equal to the reference (same order of additions, kernels.h), which itself
//     satisfies the §9 rule against the test's independent fp64 model;
//   - weight_grad within the §9 rule of the model, and bitwise equal across ISA paths and thread counts;
//   - shapes: bf16/fp16/fp32/fp64, l = d and l > d (up to 64 windows per token), varlen with empty and short
//     batches (S_b < l: no rows), R = 0, T = 0, odd D and N, D below / above the vector width, strided inputs
//     (permuted, padded, inner step 2, stride 0, negative strides), weight transposed / strided;
//   - small-integer inputs: every sum exact, so the results equal the model exactly;
//   - batch packing does not change output or input_grad rows (§9); uncovered rows are never read.
// The work-splitting knobs (cpu_tuning.h) are lowered so that small cases run many tasks on many workers, with the
// large-call path on (stream_in).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/rounding.h"
#include "compress_test_util.h"
#include "ops/compress/cpu_tuning.h"
#include "ops/compress/kernels.h"

namespace nsa_compress_test {
namespace {

class SmallTasks : public ::testing::Environment {
 public:
  void SetUp() override {
    nsa::compress_detail::CpuTuning t;
    t.task_bytes = 64;         // a few rows per task
    t.bytes_per_worker = 1;    // every requested worker starts
    t.stream_bytes = 0;        // every call reads its tasks' input rows in one pass first (stream_in) ...
    t.stream_task_bytes = 64;  // ... in tasks of a few rows
    t.stream_out_bytes = 0;    // and writes input_grad by non-temporal stores where its rows are whole lines
    nsa::compress_detail::set_cpu_tuning(t);
  }
};
[[maybe_unused]] ::testing::Environment* const kSmallTasks = ::testing::AddGlobalTestEnvironment(new SmallTasks);

const int kThreads[] = {1, 2, 3, 7};

// The full check of one case (see the file comment).
void check_case(const Case& cs) {
  SCOPED_TRACE(cs.describe());
  const Model m = make_model(cs);
  const FwdResult ref_f = run_forward(cs, Backend::kReference);
  ASSERT_TRUE(check_forward(cs, ref_f, m)) << "(reference)";
  const BwdResult ref_b = run_backward(cs, Backend::kReference);
  ASSERT_TRUE(check_backward(cs, ref_b, m)) << "(reference)";
  bool first = true;
  BwdResult first_b;
  for (CpuIsa isa : supported_isas()) {
    for (int th : kThreads) {
      SCOPED_TRACE(std::string("isa=") + nsa::cpu_isa_name(isa) + " threads=" + std::to_string(th));
      const FwdResult f = run_forward(cs, Backend::kCpu, static_cast<int>(isa), th);
      ASSERT_TRUE(f.status.ok()) << f.status.message();
      EXPECT_TRUE(same_values(f.bytes, ref_f.bytes, cs.dtype, "output vs the reference"));
      const BwdResult b = run_backward(cs, Backend::kCpu, static_cast<int>(isa), th);
      ASSERT_TRUE(b.status.ok()) << b.status.message();
      EXPECT_TRUE(same_values(b.in_bytes, ref_b.in_bytes, cs.dtype, "input_grad vs the reference"));
      if (first) {
        EXPECT_TRUE(check_backward(cs, b, m));
        first_b = b;
        first = false;
      } else {
        EXPECT_TRUE(same_values(b.w_bytes, first_b.w_bytes, cs.dtype, "weight_grad vs the first ISA / thread count"));
      }
    }
  }
}

Case filled(DType dt, std::vector<int64_t> batches, int64_t N, int64_t D, int64_t l, int64_t d, uint64_t seed,
            double lo = -1, double hi = 1) {
  Case cs = Case::make(dt, batches, N, D, l, d);
  std::mt19937_64 rng(seed);
  cs.fill_uniform(rng, lo, hi);
  return cs;
}

TEST(CompressCpu, NsaShapeEveryDtype) {
  for (DType dt : kAllDtypes) check_case(filled(dt, {80, 0, 17, 31, 64}, 2, 24, 32, 16, 1));
}

TEST(CompressCpu, NonOverlappingWindows) {
  for (DType dt : kAllDtypes) check_case(filled(dt, {48, 16, 15, 33}, 3, 16, 16, 16, 2));
}

TEST(CompressCpu, OddSizesAndStrides) {
  check_case(filled(DType::kBF16, {50, 6, 7, 29}, 3, 13, 7, 3, 3));
  check_case(filled(DType::kF16, {23, 1, 40}, 1, 5, 5, 2, 4));        // D below every vector width
  check_case(filled(DType::kF32, {70}, 1, 200, 8, 4, 5));             // 12.5 vectors: tiles of 8 + 4 + a tail
  check_case(filled(DType::kF64, {41, 12}, 5, 33, 5, 2, 6));
  check_case(filled(DType::kBF16, {130}, 2, 17, 64, 1, 7));           // 64 windows per token
  check_case(filled(DType::kF16, {9, 9}, 7, 31, 1, 1, 8));            // l = d = 1: output = weight * input
  check_case(filled(DType::kF32, {100, 3}, 1, 1, 30, 7, 9));          // D = 1
}

TEST(CompressCpu, NoOutputRows) {
  for (DType dt : kAllDtypes) {
    check_case(filled(dt, {10, 3, 0, 15}, 2, 8, 16, 8, 10));  // every batch short: R = 0, zero gradients
    check_case(filled(dt, {0}, 2, 8, 16, 8, 11));             // T = 0
  }
}

TEST(CompressCpu, LeadingZeroAndEmptyBatches) {
  Case cs = filled(DType::kBF16, {0, 0, 40, 0, 0, 33, 0}, 2, 16, 16, 8, 12);
  ASSERT_EQ(cs.lens.front(), 0);
  check_case(cs);
}

TEST(CompressCpu, SmallIntegersAreExact) {
  for (DType dt : kAllDtypes) {
    Case cs = Case::make(dt, {64, 20, 47}, 2, 24, 16, 8);
    std::mt19937_64 rng(13);
    cs.fill_ints(rng, -3, 3);
    const Model m = make_model(cs);
    check_case(cs);
    // exact: equal to the model itself (below 256, every value and sum is representable in bf16)
    const FwdResult f = run_forward(cs, Backend::kCpu);
    for (size_t i = 0; i < m.out.size(); ++i) ASSERT_EQ(f.out[i], m.out[i]) << i;
    const BwdResult b = run_backward(cs, Backend::kCpu);
    for (size_t i = 0; i < m.in_grad.size(); ++i) ASSERT_EQ(b.in_grad[i], m.in_grad[i]) << i;
    if (dt != DType::kBF16 && dt != DType::kF16) {  // weight_grad sums exceed 256 / 2048: exact in fp32 / fp64 only
      for (size_t i = 0; i < m.w_grad.size(); ++i) ASSERT_EQ(b.w_grad[i], m.w_grad[i]) << i;
    }
  }
}

TEST(CompressCpu, StridedViews) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    {  // heads outermost, padding, inner step 2 (gathered rows); weight transposed and padded
      Case cs = filled(dt, {37, 5, 52}, 3, 10, 12, 5, 20);
      cs.input_layout.order = {1, 0, 2};
      cs.input_layout.pad = {1, 2, 3};
      cs.input_layout.step = 2;
      cs.weight_layout.transposed = true;
      cs.weight_layout.pad = {2, 1};
      cs.weight_layout.step = 3;
      cs.grad_layout.order = {2, 1, 0};
      cs.grad_layout.pad = {0, 1, 1};
      check_case(cs);
    }
    {  // negative strides (tokens walked backwards; D reversed: gathered)
      Case cs = filled(dt, {29, 40}, 2, 9, 8, 3, 21);
      cs.input_layout.reverse_dim = 0;
      cs.grad_layout.reverse_dim = 2;
      check_case(cs);
    }
    {  // stride 0: one head broadcast over N; grad broadcast over D
      Case cs = filled(dt, {33, 18}, 4, 12, 6, 6, 22);
      cs.input_layout.zero_dim = 1;
      cs.make_input_constant_along(1);
      for (int64_t r = 0; r < cs.R(); ++r)
        for (int64_t n = 0; n < cs.N; ++n)
          for (int64_t j = 0; j < cs.D; ++j) cs.grad[cs.gi(r, n, j)] = cs.grad[cs.gi(r, n, 0)];
      cs.grad_layout.zero_dim = 2;
      check_case(cs);
    }
  }
}

TEST(CompressCpu, SeededRandomConfigurations) {
  std::mt19937_64 rng(20250101);
  for (int it = 0; it < 24; ++it) {
    auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    const DType dt = kAllDtypes[pick(0, 3)];
    const int64_t l = pick(1, 40), d = pick(1, l), N = pick(1, 4), D = pick(1, 70);
    std::vector<int64_t> batches(static_cast<size_t>(pick(1, 5)));
    for (int64_t& s : batches) s = pick(0, 3) == 0 ? pick(0, l) : pick(0, 3 * l + 10);
    Case cs = Case::make(dt, batches, N, D, l, d);
    cs.fill_uniform(rng, -2, 2);
    SCOPED_TRACE("iteration " + std::to_string(it));
    check_case(cs);
  }
}

// Overflow to inf follows the rule too: sums beyond the dtype's range round to inf (fp16: in the final rounding;
// bf16: already in the fp32 sum, with positive terms so that no partial sum overflows and comes back).
TEST(CompressCpu, LargeMagnitudes) {
  check_case(filled(DType::kF16, {40}, 2, 20, 8, 4, 31, -60000, 60000));
  Case cs = Case::make(DType::kBF16, {40}, 2, 20, 8, 4);
  std::mt19937_64 rng(30);
  std::uniform_real_distribution<double> big(1e37, 3e38), unit(0, 1);
  for (double& x : cs.input) x = representable(cs.dtype, big(rng));
  for (double& x : cs.weight) x = representable(cs.dtype, unit(rng));
  for (double& x : cs.grad) x = representable(cs.dtype, unit(rng));
  check_case(cs);
  const FwdResult f = run_forward(cs, Backend::kCpu);
  EXPECT_TRUE(std::count(f.out.begin(), f.out.end(), INFINITY) > 0) << "some sums overflow";
}

// §9: a batch's rows do not depend on how the batches are packed; rows no window covers are never read.
TEST(CompressCpu, PackingInvarianceAndUnreadTails) {
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(nsa::dtype_name(dt));
    Case alone = filled(dt, {45}, 2, 19, 10, 4, 40);  // C = 9, covered [0, 42), tail 42..44
    Case packed = Case::make(dt, {12, 45, 30}, 2, 19, 10, 4);
    std::mt19937_64 rng(41);
    packed.fill_uniform(rng, -1, 1);
    // copy the lone batch into batch 1 of the packed case
    for (int64_t t = 0; t < 45; ++t)
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t j = 0; j < 19; ++j) packed.input[packed.ii(12 + t, n, j)] = alone.input[alone.ii(t, n, j)];
    packed.weight = alone.weight;
    const int64_t r0 = packed.row_begin(1);
    for (int64_t c = 0; c < alone.R(); ++c)
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t j = 0; j < 19; ++j) packed.grad[packed.gi(r0 + c, n, j)] = alone.grad[alone.gi(c, n, j)];
    const FwdResult fa = run_forward(alone, Backend::kCpu), fp = run_forward(packed, Backend::kCpu, -1, 3);
    const BwdResult ba = run_backward(alone, Backend::kCpu), bp = run_backward(packed, Backend::kCpu, -1, 3);
    const size_t es = nsa::dtype_size(dt), row = static_cast<size_t>(2 * 19) * es;
    EXPECT_TRUE(same_values(fa.bytes, std::vector<unsigned char>(fp.bytes.begin() + static_cast<int64_t>(r0 * row),
                                                                 fp.bytes.begin() + static_cast<int64_t>((r0 + alone.R()) * row)),
                            dt, "output rows of the batch"));
    EXPECT_TRUE(same_values(ba.in_bytes, std::vector<unsigned char>(bp.in_bytes.begin() + static_cast<int64_t>(12 * row),
                                                                    bp.in_bytes.begin() + static_cast<int64_t>(57 * row)),
                            dt, "input_grad rows of the batch"));
    // NaN in the uncovered tail rows changes nothing (they are never read)
    Case nan_tail = alone;
    for (int64_t t = 42; t < 45; ++t)
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t j = 0; j < 19; ++j) nan_tail.input[nan_tail.ii(t, n, j)] = NAN;
    const BwdResult bn = run_backward(nan_tail, Backend::kCpu);
    EXPECT_TRUE(same_values(run_forward(nan_tail, Backend::kCpu).bytes, fa.bytes, dt, "output with NaN tails"));
    EXPECT_TRUE(same_values(bn.w_bytes, ba.w_bytes, dt, "weight_grad with NaN tails"));
  }
}

// The default options (active ISA, default threads) give the same bits as any forced choice.
TEST(CompressCpu, DefaultOptionsMatchForcedOnes) {
  const Case cs = filled(DType::kBF16, {200, 77}, 2, 40, 32, 16, 50);
  const FwdResult a = run_forward(cs, Backend::kCpu);
  const FwdResult b = run_forward(cs, Backend::kCpu, static_cast<int>(nsa::cpu_active_isa()), 1);
  EXPECT_TRUE(same_values(a.bytes, b.bytes, cs.dtype, "output"));
  const BwdResult c = run_backward(cs, Backend::kCpu);
  const BwdResult e = run_backward(cs, Backend::kCpu, static_cast<int>(CpuIsa::kScalar), 5);
  EXPECT_TRUE(same_values(c.in_bytes, e.in_bytes, cs.dtype, "input_grad"));
  EXPECT_TRUE(same_values(c.w_bytes, e.w_bytes, cs.dtype, "weight_grad"));
}

// Wide rows: the forward's two-window kernel (KernelTable::weighted_rows2) with full register tiles, a shorter last
// tile, and columns past the last pair of vectors (D = 192: six pairs of zmm vectors, one tile; 200 and 273: a full
// tile, a shorter one and single vectors / scalars), windows sharing half their rows, a quarter, or none (l = d),
// forward tasks of three windows (two together, the last one alone) and of five.
TEST(CompressCpu, WideRowsTwoWindowTiles) {
  const nsa::compress_detail::CpuTuning saved = nsa::compress_detail::cpu_tuning();
  const int64_t shapes[][3] = {{192, 32, 16}, {200, 32, 8}, {273, 16, 16}, {128, 12, 9}};
  uint64_t seed = 70;
  for (const auto& sh : shapes) {
    const int64_t D = sh[0], l = sh[1], d = sh[2];
    for (int64_t windows_per_task : {3, 5}) {
      nsa::compress_detail::CpuTuning t = saved;
      t.task_bytes = t.stream_task_bytes = windows_per_task * d * 2 * D * 2;  // N = 2, 2-byte elements
      nsa::compress_detail::set_cpu_tuning(t);
      check_case(filled(DType::kBF16, {9 * d + l + 5, l + 2 * d + 1, 0, l - 1}, 2, D, l, d, seed++));
      check_case(filled(DType::kF16, {7 * d + l + 3}, 2, D, l, d, seed++));
    }
  }
  nsa::compress_detail::set_cpu_tuning(saved);
}

// The gradients' bf16 stores (round to nearest even) on every ISA path's kernel table, through weighted_rows_shared
// with one source row and weight 1 (out = rne(0 + 1 * x)): every sign and exponent with a spread of mantissas (1 in
// 4099 of all fp32 patterns), every pattern around the rounding ties and the denormal / normal boundary, NaNs of
// both kinds with payloads, infinities and zeros, in vectors mixing denormals with other values and vectors without
// any (the avx512bf16 path converts with vcvtne2ps2bf16 unless the vector holds a denormal). Each path equals the
// scalar formula (common/rounding.h) for every non-NaN value, and every path gives the same bits, NaNs included.
TEST(CompressCpu, GradientStoresRoundEveryPattern) {
  std::vector<uint32_t> pats;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 4099) pats.push_back(static_cast<uint32_t>(u));
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t base : {0x3f800000u, 0x00000000u, 0x00800000u, 0x7f7f0000u, 0x33800000u})
      for (uint32_t low = 0; low < (1u << 17); low += 3) pats.push_back(sign | (base + low));
    for (uint32_t v : {0x7f800000u, 0x7f800001u, 0x7fa00000u, 0x7fbfffffu, 0x7fc00000u, 0x7fc0ffffu, 0x7fffffffu,
                       0x007fffffu, 0x00000001u, 0x00008000u, 0x00018000u, 0x7f7f8000u, 0x7f7f7fffu})
      pats.push_back(sign | v);
  }
  while (pats.size() % 32 != 0) pats.push_back(0x3f800000u);  // whole 64-byte lines of bf16, for the streaming stores
  // vectors with no denormal: the denormals moved to the end, so that the first blocks of 32 hold none
  std::stable_partition(pats.begin(), pats.end(), [](uint32_t u) { return (u & 0x7f800000u) != 0 || (u & 0x7fffffu) == 0; });
  const int64_t D = static_cast<int64_t>(pats.size());
  std::vector<float> rows32(pats.size());
  std::memcpy(rows32.data(), pats.data(), pats.size() * sizeof(float));
  const float one = 1.0f;
  const float* row_ptr = rows32.data();
  const float* wt_ptr = &one;
  std::vector<uint16_t> first;
  for (CpuIsa isa : supported_isas())
    for (bool stream : {false, true}) {  // plain and non-temporal stores (64-byte aligned rows)
      SCOPED_TRACE(std::string(nsa::cpu_isa_name(isa)) + (stream ? ", streaming stores" : ", plain stores"));
      nsa::detail::LineVector<uint16_t> out(pats.size(), 0xdead);
      const nsa::compress_kernels::KernelTable* kt = nsa::compress_kernels::kernels_for(isa);
      kt->weighted_rows_shared(DType::kBF16, &row_ptr, &wt_ptr, 1, 1, D, out.data(), D,
                               nsa::compress_kernels::Round::kEven, stream);
      kt->store_fence();
      for (size_t i = 0; i < pats.size(); ++i) {
        const float x = rows32[i];
        if (std::isnan(x)) {
          ASSERT_EQ(out[i] & 0x7fc0, 0x7fc0) << std::hex << "quiet NaN expected for 0x" << pats[i];
          continue;
        }
        const volatile float zero = 0.0f;
        const uint32_t want = nsa::detail::bf16_bits_of(nsa::detail::f32_bits(zero + x), false);
        ASSERT_EQ(out[i], want) << std::hex << "fp32 0x" << pats[i];
      }
      if (first.empty()) first.assign(out.begin(), out.end());
      else ASSERT_TRUE(std::equal(out.begin(), out.end(), first.begin())) << "bits differ from the first path (NaN payloads included)";
    }
}

// input_grad written by non-temporal stores (CpuTuning::stream_out_bytes = 0 here: every call whose rows are whole
// 64-byte lines) against plain stores (stream_out_bytes above the size) and the reference, on every path and dtype:
// rows of 2 and 3 lines, a batch left partly uncovered (its zeroed tail), and an input_grad that starts 32 bytes
// past a line (plain stores then).
TEST(CompressCpu, StreamingInputGradStoresGiveTheSameBits) {
  const nsa::compress_detail::CpuTuning saved = nsa::compress_detail::cpu_tuning();
  for (DType dt : kAllDtypes) {
    const int64_t es = static_cast<int64_t>(nsa::dtype_size(dt));
    for (int64_t D : {64 / es, 192 / es, int64_t{96}}) {
      const Case cs = filled(dt, {300, 0, 47, 129}, 2, D, 32, 16, 70);
      SCOPED_TRACE(cs.describe());
      const BwdResult ref = run_backward(cs, Backend::kReference);
      for (CpuIsa isa : supported_isas())
        for (int64_t limit : {int64_t{0}, INT64_MAX})
          for (int64_t offset : {0, 32}) {
            SCOPED_TRACE(std::string("isa=") + nsa::cpu_isa_name(isa) + " stream_out_bytes=" + std::to_string(limit) +
                         " offset=" + std::to_string(offset));
            nsa::compress_detail::CpuTuning t = saved;
            t.stream_out_bytes = limit;
            nsa::compress_detail::set_cpu_tuning(t);
            Bound bd(cs);
            const size_t n = bd.in_grad.size();
            nsa::detail::LineVector<unsigned char> buf(n + 64, 0xFF);
            bd.g.input_grad = buf.data() + offset;
            const Status st = nsa::compress_backward_cpu(bd.g, nsa::CpuOptions{static_cast<int>(isa), 2});
            ASSERT_TRUE(st.ok()) << st.message();
            const std::vector<unsigned char> got(buf.begin() + offset, buf.begin() + offset + static_cast<int64_t>(n));
            EXPECT_TRUE(same_values(got, ref.in_bytes, dt, "input_grad vs the reference"));
            EXPECT_TRUE(std::all_of(buf.begin(), buf.begin() + offset, [](unsigned char c) { return c == 0xFF; }));
            EXPECT_TRUE(std::all_of(buf.begin() + offset + static_cast<int64_t>(n), buf.end(),
                                    [](unsigned char c) { return c == 0xFF; }));
          }
    }
  }
  nsa::compress_detail::set_cpu_tuning(saved);
}

// With the default work split (64 KB tasks, 512 KB per worker) on a shape of the benchmark's kind.
TEST(CompressCpu, DefaultTuningOnALargerShape) {
  const nsa::compress_detail::CpuTuning saved = nsa::compress_detail::cpu_tuning();
  nsa::compress_detail::set_cpu_tuning(nsa::compress_detail::CpuTuning());
  Case cs = filled(DType::kBF16, {1500, 700}, 2, 64, 32, 16, 60);
  const FwdResult ref = run_forward(cs, Backend::kReference);
  const BwdResult refb = run_backward(cs, Backend::kReference);
  for (int th : {1, 2, 4}) {
    const FwdResult f = run_forward(cs, Backend::kCpu, -1, th);
    EXPECT_TRUE(same_values(f.bytes, ref.bytes, cs.dtype, "output"));
    const BwdResult b = run_backward(cs, Backend::kCpu, -1, th);
    EXPECT_TRUE(same_values(b.in_bytes, refb.in_bytes, cs.dtype, "input_grad"));
  }
  EXPECT_TRUE(check_backward(cs, run_backward(cs, Backend::kCpu), make_model(cs)));
  nsa::compress_detail::set_cpu_tuning(saved);
}

}  // namespace
}  // namespace nsa_compress_test
