// The CUDA backend (include/nsa/cuda.h) against the reference and the fp64 model of docs/spec/compress_attention.md, with the rules of
// docs/CONTRIBUTING.md's test table (tests/cpp/test_util.h: Case builder, strided layouts, oracle, checks):
//   forward  - hand cases (mask replacement, scores overflowing below the mask value), a shape matrix
//              (batches incl. Sq_b = 0, G in {1,2,3,5,8,16,64,96}, D != D2, D up to 288, C_b around M,
//              causal / random / band masks with fully masked rows, forced blocks, ties, strided inputs and
//              masks, bf16/fp16/fp32), rows long enough for several score chunks, small-integer inputs
//              bitwise equal to the reference, determinism, a seeded fuzz;
//   backward - gradients vs the fp64 model (FlashAttention's rule: <= 3 x the plain fp32 reference's error
//              plus a rounding floor), structural zeros, determinism, large heads;
//   both     - argument errors identical to the reference's messages, the §10 extensions refused by name (these run
//              without a device).
// Every forward check runs the tensor-core path and the simple path (NSA_CUDA_SIMPLE=1); fp32 has one path.
// Tests needing a device call GTEST_SKIP() with the reason when cudaGetDeviceCount reports none.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "nsa/cuda.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::CompressAttentionGradParams;

bool have_device() { return nsa::cuda_device_count() > 0; }

#define NSA_REQUIRE_DEVICE()                                                                      \
  do {                                                                                            \
    if (!have_device())                                                                           \
      GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none): the CUDA backend is not " \
                      "exercised on this machine";                                               \
  } while (0)

class CudaEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    const int n = nsa::cuda_device_count();
    if (n == 0) {
      std::printf("[nsa] no CUDA device: the CUDA tests that need one are skipped\n");
    } else {
      cudaDeviceProp prop{};
      int dev = 0;
      cudaGetDevice(&dev);
      cudaGetDeviceProperties(&prop, dev);
      std::printf("[nsa] CUDA device %d of %d: %s (sm_%d%d, %d SMs, %zu KB shared memory per block opt-in)\n", dev, n,
                  prop.name, prop.major, prop.minor, prop.multiProcessorCount, prop.sharedMemPerBlockOptin / 1024);
    }
    std::fflush(stdout);
  }
};
[[maybe_unused]] ::testing::Environment* const kCudaEnv = ::testing::AddGlobalTestEnvironment(new CudaEnvironment);

// ------------------------------------------------------------------------------------ device buffers

class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : n_(bytes) {
    const cudaError_t e = cudaMalloc(&p_, bytes == 0 ? 1 : bytes);
    EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  }
  DevBuf(const void* host, size_t bytes) : DevBuf(bytes) { upload(host, bytes); }
  ~DevBuf() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  void upload(const void* host, size_t bytes) {
    EXPECT_EQ(cudaMemcpy(p_, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  }
  void download(void* host, size_t bytes) const {
    EXPECT_EQ(cudaMemcpy(host, p_, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  void fill(int byte) { EXPECT_EQ(cudaMemset(p_, byte, n_ == 0 ? 1 : n_), cudaSuccess); }
  void* get() const { return p_; }
  // The device address of host_ptr, a pointer into the host buffer host_base that was uploaded here.
  template <typename P>
  P* rebase(const void* host_base, P* host_ptr) const {
    const std::ptrdiff_t off = reinterpret_cast<const char*>(host_ptr) - static_cast<const char*>(host_base);
    return reinterpret_cast<P*>(static_cast<char*>(p_) + off);
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// Sets NSA_CUDA_SIMPLE for one call (the backend reads it at every call).
struct SimpleEnv {
  explicit SimpleEnv(bool simple) { setenv("NSA_CUDA_SIMPLE", simple ? "1" : "0", 1); }
  ~SimpleEnv() { unsetenv("NSA_CUDA_SIMPLE"); }
};

// Inputs of a forward call on the device: the Bound's host buffers copied as they are (same strides,
// same NaN / 0xFF padding), outputs pre-filled with 0xFF bytes.
struct DeviceForward {
  DevBuf q, k, v, am, tm, out, topk, smax, ssum;
  CompressAttentionParams p;

  explicit DeviceForward(const Bound& bd)
      : q(bd.qs.bytes.data(), bd.qs.bytes.size()),
        k(bd.ks.bytes.data(), bd.ks.bytes.size()),
        v(bd.vs.bytes.data(), bd.vs.bytes.size()),
        out(bd.out.size()),
        topk(bd.topk.size() * 4),
        smax(bd.smax.size() * 4),
        ssum(bd.ssum.size() * 4) {
    p = bd.p;
    p.query.data = q.rebase(bd.qs.bytes.data(), bd.p.query.data);
    p.key.data = k.rebase(bd.ks.bytes.data(), bd.p.key.data);
    p.value.data = v.rebase(bd.vs.bytes.data(), bd.p.value.data);
    if (bd.p.atten_mask.data != nullptr) {
      am = DevBuf(bd.am.bytes.data(), bd.am.bytes.size());
      p.atten_mask.data = am.rebase(bd.am.bytes.data(), bd.p.atten_mask.data);
    }
    if (bd.p.topk_mask.data != nullptr) {
      tm = DevBuf(bd.tm.bytes.data(), bd.tm.bytes.size());
      p.topk_mask.data = tm.rebase(bd.tm.bytes.data(), bd.p.topk_mask.data);
    }
    for (DevBuf* b : {&out, &topk, &smax, &ssum}) b->fill(0xFF);
    p.attention_out = out.get();
    p.topk_indices = static_cast<int32_t*>(topk.get());
    p.softmax_max = static_cast<float*>(smax.get());
    p.softmax_sum = static_cast<float*>(ssum.get());
  }
  void download(Bound& bd) const {
    out.download(bd.out.data(), bd.out.size());
    topk.download(bd.topk.data(), bd.topk.size() * 4);
    smax.download(bd.smax.data(), bd.smax.size() * 4);
    ssum.download(bd.ssum.data(), bd.ssum.size() * 4);
  }
};

// Runs compress_attention_cuda on a stream of its own and returns the outputs as test_util's Result.
Result run_cuda(const Case& cs, bool simple) {
  Bound bd(cs);
  DeviceForward dev(bd);
  cudaStream_t stream = nullptr;
  EXPECT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  Status st;
  {
    SimpleEnv env(simple);
    st = nsa::compress_attention_cuda(dev.p, stream);
  }
  const cudaError_t e = cudaStreamSynchronize(stream);
  EXPECT_EQ(e, cudaSuccess) << "kernel execution: " << cudaGetErrorString(e);
  cudaStreamDestroy(stream);
  dev.download(bd);
  return collect(cs, bd, st);
}

// The paths of a dtype: tensor cores and simple for bf16/fp16, simple for fp32.
std::vector<bool> paths(DType dt) {
  if (dt == DType::kF32) return {true};
  return {false, true};
}
const char* path_name(bool simple) { return simple ? "simple path" : "tensor-core path"; }

const DType kCudaDtypes[] = {DType::kBF16, DType::kF16, DType::kF32};

void check_cuda(const Case& cs) {
  SCOPED_TRACE(cs.describe());
  const Oracle o = make_oracle(cs);
  ASSERT_TRUE(o.model.status.ok()) << o.model.status.message();
  for (bool simple : paths(cs.dtype)) {
    SCOPED_TRACE(path_name(simple));
    EXPECT_TRUE(check_all(cs, o, run_cuda(cs, simple)));
  }
}

Case random_filled(DType dt, std::vector<int64_t> sq, std::vector<int64_t> c, int64_t N1, int64_t N2, int64_t D,
                   int64_t D2, int64_t l, int64_t d, int64_t lp, int64_t K, uint64_t seed) {
  Case cs = Case::make(dt, std::move(sq), std::move(c), N1, N2, D, D2, l, d, lp, K);
  std::mt19937_64 rng(seed);
  cs.fill_uniform(rng, -1, 1);
  return cs;
}

// Band mask: query s sees the compressed tokens [s + off - width, s + off) (clipped); rows whose band is
// empty are fully masked.
void set_band_mask(Case& cs, int64_t off, int64_t width) {
  cs.enable_atten_mask();
  for (int64_t s = 0; s < cs.max_sq(); ++s)
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = (c >= s + off - width && c < s + off) ? 0 : 1;
}

// ------------------------------------------------------------------------------------ argument errors
// These need no device: the checks run before anything is enqueued.

TEST(CudaArguments, ForwardErrorsAreTheReferenceMessages) {
  Case cs = random_filled(DType::kBF16, {5, 3}, {9, 7}, 4, 2, 16, 16, 32, 16, 64, 2, 1);
  Bound bd(cs);
  auto both = [&](CompressAttentionParams p, const char* what) {
    SCOPED_TRACE(what);
    const Status r = nsa::compress_attention_reference(p);
    const Status c = nsa::compress_attention_cuda(p, nullptr);
    ASSERT_FALSE(r.ok());
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.message(), r.message());
  };
  CompressAttentionParams p = bd.p;
  p.head_num = 3;
  both(p, "head_num");
  p = bd.p;
  p.select_block_count = 33;
  both(p, "select_block_count");
  p = bd.p;
  p.query.data = nullptr;
  both(p, "query null");
  p = bd.p;
  p.compress_stride = 24;
  both(p, "compress_stride");
  p = bd.p;
  const int64_t bad_q[2] = {5, 7};
  p.actual_seq_qlen = {bad_q, 2};
  both(p, "actual_seq_qlen");
  p = bd.p;
  p.softmax_sum = nullptr;
  both(p, "softmax_sum null");
  EXPECT_TRUE(bd.outputs_untouched());
}

TEST(CudaArguments, Float64IsRejectedByName) {
  Case cs = random_filled(DType::kF64, {4}, {8}, 2, 1, 16, 16, 32, 16, 64, 1, 2);
  Bound bd(cs);
  const Status st = nsa::compress_attention_cuda(bd.p, nullptr);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("float64"), std::string::npos) << st.message();
  EXPECT_TRUE(bd.outputs_untouched());
  CompressAttentionGradParams g;
  g.fwd = bd.p;
  g.attention_out = bd.p.query;  // any [T, N1, D2]-shaped view: the dtype check comes first
  g.attention_out.size[2] = cs.D2;
  g.grad_out = g.attention_out;
  std::vector<float> stats(static_cast<size_t>(cs.T() * cs.N1 * 8));
  std::vector<double> gq(64), gk(64), gv(64);
  g.softmax_max = stats.data();
  g.softmax_sum = stats.data();
  g.grad_query = gq.data();
  g.grad_key = gk.data();
  g.grad_value = gv.data();
  const Status sb = nsa::compress_attention_backward_cuda(g, nullptr);
  ASSERT_FALSE(sb.ok());
  EXPECT_NE(sb.message().find("float64"), std::string::npos) << sb.message();
}

// Host-side backward params over the forward params of a Bound of a 16-bit case (the argument checks run before
// anything touches memory): attention_out = grad_out [T, N1, D2] contiguous, statistics [T, N1, 8], gradients of
// the sizes of §7 filled with 0xFFFF.
struct HostGrad {
  std::vector<float> stats;
  std::vector<uint16_t> o, gq, gk, gv;
  CompressAttentionGradParams g;

  HostGrad(const Case& cs, const Bound& bd)
      : stats(static_cast<size_t>(cs.T() * cs.N1 * 8)),
        o(static_cast<size_t>(cs.T() * cs.N1 * cs.D2)),
        gq(static_cast<size_t>(cs.T() * cs.N1 * cs.D), 0xFFFF),
        gk(static_cast<size_t>(cs.T2() * cs.N2 * cs.D), 0xFFFF),
        gv(static_cast<size_t>(cs.T2() * cs.N2 * cs.D2), 0xFFFF) {
    g.fwd = bd.p;
    g.attention_out.data = o.data();
    g.attention_out.size[0] = cs.T();
    g.attention_out.size[1] = cs.N1;
    g.attention_out.size[2] = cs.D2;
    g.attention_out.stride[0] = cs.N1 * cs.D2;
    g.attention_out.stride[1] = cs.D2;
    g.attention_out.stride[2] = 1;
    g.grad_out = g.attention_out;
    g.softmax_max = stats.data();
    g.softmax_sum = stats.data();
    g.grad_query = gq.data();
    g.grad_key = gk.data();
    g.grad_value = gv.data();
  }
  bool grads_untouched() const {
    auto all_ff = [](const std::vector<uint16_t>& x) {
      return std::all_of(x.begin(), x.end(), [](uint16_t e) { return e == 0xFFFF; });
    };
    return all_ff(gq) && all_ff(gk) && all_ff(gv);
  }
};

TEST(CudaArguments, BackwardErrorsAreTheReferenceMessages) {
  Case cs = random_filled(DType::kF16, {5}, {9}, 2, 1, 16, 8, 32, 16, 64, 2, 3);
  Bound bd(cs);
  HostGrad hg(cs, bd);
  const CompressAttentionGradParams& g = hg.g;
  auto both = [&](CompressAttentionGradParams p, const char* what) {
    SCOPED_TRACE(what);
    const Status r = nsa::compress_attention_backward_reference(p);
    const Status c = nsa::compress_attention_backward_cuda(p, nullptr);
    ASSERT_FALSE(r.ok());
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.message(), r.message());
  };
  CompressAttentionGradParams p = g;
  p.grad_out.size[2] = cs.D2 + 1;
  both(p, "grad_out shape");
  p = g;
  p.grad_key = nullptr;
  both(p, "grad_key null");
  p = g;
  p.fwd.head_num = 5;
  both(p, "head_num");
}

// The §10 causal / short_batches extensions are refused by name, forward and backward (the backward's kernels read
// explicit masks only: with `fwd.causal` they would see no mask at all), on calls that the argument rules accept; nothing
// is written.
TEST(CudaArguments, ExtensionsAreRefusedByName) {
  Case cs = random_filled(DType::kBF16, {5, 3}, {9, 7}, 4, 2, 16, 16, 32, 16, 64, 2, 4);
  Bound bd(cs);
  HostGrad hg(cs, bd);
  for (int which = 0; which < 2; ++which) {
    SCOPED_TRACE(which == 0 ? "causal" : "short_batches");
    CompressAttentionParams p = bd.p;
    (which == 0 ? p.causal : p.short_batches) = true;
    CompressAttentionGradParams g = hg.g;
    g.fwd = p;
    nsa::CompressAttentionShape sh;
    ASSERT_TRUE(nsa::validate_compress_attention(p, &sh).ok());
    ASSERT_TRUE(nsa::validate_compress_attention_backward(g, &sh).ok());
    const Status sf = nsa::compress_attention_cuda(p, nullptr);
    const Status sb = nsa::compress_attention_backward_cuda(g, nullptr);
    ASSERT_FALSE(sf.ok());
    ASSERT_FALSE(sb.ok());
    for (const Status* st : {&sf, &sb}) {
      EXPECT_NE(st->message().find("causal / short_batches extensions"), std::string::npos) << st->message();
      EXPECT_NE(st->message().find("CUDA backend"), std::string::npos) << st->message();
    }
  }
  EXPECT_TRUE(bd.outputs_untouched());
  EXPECT_TRUE(hg.grads_untouched());
}

// ------------------------------------------------------------------------------------ forward: hand cases

TEST(CudaForward, MaskedScoresAreReplaced) {
  NSA_REQUIRE_DEVICE();
  // docs/spec/compress_attention.md §3.2 / §5: row 0 fully masked -> P = 1/3, out = mean of V, m = -FLT_MAX, l = 3; row 1 masks the
  // largest raw score: P = [1, 0, 0] (-1e32 underflows), out = v_0, m = 0, l = 1.
  Case cs = Case::make(DType::kF32, {2}, {3}, 1, 1, 16, 2, 16, 16, 16, 3);
  cs.scale = 1.0;
  for (int64_t t = 0; t < 2; ++t) cs.set_q(t, 0, 0, 1e16);
  cs.set_k(1, 0, 0, -1e16);
  cs.set_k(2, 0, 0, 1e16);
  const double vv[3][2] = {{3, -6}, {6, 0}, {-3, 12}};
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t j = 0; j < 2; ++j) cs.set_v(c, 0, j, vv[c][j]);
  cs.enable_atten_mask();
  for (int64_t c = 0; c < 3; ++c) cs.atten_at(0, c) = 1;
  cs.atten_at(1, 2) = 1;
  const Result r = run_cuda(cs, true);
  ASSERT_TRUE(r.status.ok()) << r.status.message();
  EXPECT_EQ(r.smax[static_cast<size_t>(stat_index(cs, 0, 0))], -FLT_MAX);
  EXPECT_EQ(r.ssum[static_cast<size_t>(stat_index(cs, 0, 0))], 3.0f);
  EXPECT_NEAR(r.out[0], 2.0, 2e-6);
  EXPECT_NEAR(r.out[1], 2.0, 2e-6);
  EXPECT_EQ(std::vector<int32_t>(r.topk.begin(), r.topk.begin() + 3), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(r.smax[static_cast<size_t>(stat_index(cs, 1, 0))], 0.0f);
  EXPECT_EQ(r.ssum[static_cast<size_t>(stat_index(cs, 1, 0))], 1.0f);
  EXPECT_EQ(r.out[2], 3.0);
  EXPECT_EQ(r.out[3], -6.0);
  EXPECT_EQ(std::vector<int32_t>(r.topk.begin() + 3, r.topk.begin() + 6), (std::vector<int32_t>{0, 1, 2}));
}

TEST(CudaForward, OverflowedScoresBelowTheMaskValue) {
  NSA_REQUIRE_DEVICE();
  // §3.3 literally: visible scores overflow to -inf, the masked tokens (-FLT_MAX) carry the max. C = 40,
  // tokens 0..31 masked (outside the visible window 32..39): P = 1/32 on them, out = mean(0..31) = 15.5,
  // m = -FLT_MAX, l = 32; top-k [0..9]. The window must be widened to the whole row.
  Case cs = Case::make(DType::kF32, {1}, {40}, 1, 1, 16, 1, 32, 16, 64, 10);
  cs.scale = 1.0;
  cs.set_q(0, 0, 0, 1e20);
  for (int64_t c = 0; c < 40; ++c) {
    cs.set_k(c, 0, 0, -1e20);
    cs.set_v(c, 0, 0, static_cast<double>(c));
  }
  cs.enable_atten_mask();
  for (int64_t c = 0; c < 32; ++c) cs.atten_at(0, c) = 1;
  for (bool simple : {true, false}) {
    const Result r = run_cuda(cs, simple);
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    EXPECT_EQ(r.smax[0], -FLT_MAX);
    EXPECT_EQ(r.ssum[0], 32.0f);
    EXPECT_EQ(r.out[0], 15.5);
    std::vector<int32_t> want(10);
    for (int i = 0; i < 10; ++i) want[static_cast<size_t>(i)] = i;
    EXPECT_EQ(r.topk, want);
  }
}

// ------------------------------------------------------------------------------------ forward: shape matrix

TEST(CudaForward, BatchesOfDifferentLengths) {
  NSA_REQUIRE_DEVICE();
  for (DType dt : kCudaDtypes) {
    Case cs = random_filled(dt, {0, 5, 0, 17, 9, 0}, {3, 9, 13, 4, 30, 2}, 4, 2, 32, 24, 32, 16, 64, 1, 11);
    std::mt19937_64 rng(12);
    cs.set_random_mask(rng, 0.2, 0.1);
    check_cuda(cs);
    Case cs2 = Case::make(dt, {31, 1, 12}, {40, 9, 23}, 4, 1, 16, 16, 32, 16, 64, 3);
    cs2.extra_kv_rows = 5;
    cs2.pass_sel = true;
    cs2.resize();
    std::mt19937_64 rng2(13);
    cs2.fill_uniform(rng2, -1, 1);
    cs2.set_local_topk_mask();
    check_cuda(cs2);
  }
}

TEST(CudaForward, GroupSizes) {
  NSA_REQUIRE_DEVICE();
  for (int64_t G : {1, 2, 3, 5, 8, 16, 64}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    const DType dt = G % 2 ? DType::kBF16 : DType::kF16;
    Case cs = random_filled(dt, {13, 6}, {21, 9}, 2 * G, 2, 24, 16, 32, 16, 64, 2, 100 + G);
    std::mt19937_64 rng(200 + G);
    cs.set_random_mask(rng, 0.25, 0.1);
    cs.set_random_topk_mask(rng, 0.05);
    check_cuda(cs);
  }
}

TEST(CudaForward, GroupsLargerThanOneRowBlock) {
  NSA_REQUIRE_DEVICE();
  // G = 96 and 128: two row blocks of 64 per token (blockIdx.z), selection by the first block only. Their
  // 128-row score block needs more than about 64 KB of shared memory per block (include/nsa/cuda.h).
  int dev = 0, optin = 0;
  ASSERT_EQ(cudaGetDevice(&dev), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), cudaSuccess);
  if (optin < 96 * 1024) GTEST_SKIP() << "G > 64 needs more shared memory per block than this device's " << optin << " bytes";
  for (int64_t G : {96, 128}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    Case cs = random_filled(DType::kBF16, {3, 2}, {70, 20}, G, 1, 32, 32, 32, 16, 64, 4, 400 + G);
    std::mt19937_64 rng(500 + G);
    cs.set_random_mask(rng, 0.3, 0.2);
    check_cuda(cs);
  }
}

TEST(CudaForward, HeadDims) {
  NSA_REQUIRE_DEVICE();
  const std::pair<int64_t, int64_t> dims[] = {{16, 16}, {33, 17}, {1, 1},    {7, 3},    {96, 80},
                                              {192, 128}, {256, 256}, {130, 65}, {288, 260}};
  for (auto [D, D2] : dims) {
    for (DType dt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE("D=" + std::to_string(D) + " D2=" + std::to_string(D2));
      Case cs = random_filled(dt, {11, 4}, {19, 70}, 4, 2, D, D2, 32, 16, 64, 2, static_cast<uint64_t>(D * 1000 + D2));
      std::mt19937_64 rng(static_cast<uint64_t>(D + D2));
      cs.set_random_mask(rng, 0.2, 0.1);
      check_cuda(cs);
    }
  }
}

TEST(CudaForward, CompressedLengthsAroundM) {
  NSA_REQUIRE_DEVICE();
  struct Cfg {
    int64_t l, d, lp;
  };
  for (Cfg cf : {Cfg{32, 16, 64}, Cfg{64, 16, 64}, Cfg{32, 32, 64}, Cfg{16, 16, 16}, Cfg{32, 16, 128},
                 Cfg{128, 64, 128}, Cfg{16, 16, 128}}) {
    const int64_t M = cf.lp / cf.d;
    SCOPED_TRACE("(l,d,l')=(" + std::to_string(cf.l) + "," + std::to_string(cf.d) + "," + std::to_string(cf.lp) + ")");
    Case cs = random_filled(DType::kF16, {6, 5, 3, 9, 4}, {1, M, M + 1, 300, 7}, 2, 1, 16, 16, cf.l, cf.d, cf.lp, 1,
                            static_cast<uint64_t>(cf.l * 7 + cf.d * 3 + cf.lp));
    check_cuda(cs);
  }
}

TEST(CudaForward, CausalMaskAndForcedBlocks) {
  NSA_REQUIRE_DEVICE();
  // docs/spec/compress_attention.md §9 conventions on one sequence of 600 tokens: C = 36, rows 0..30 fully masked; block 0 and
  // the local blocks forced; K = 8 of Sel = 9.
  for (DType dt : kCudaDtypes) {
    Case cs = random_filled(dt, {600}, {36}, 8, 2, 64, 48, 32, 16, 64, 8, 7);
    cs.set_causal_mask();
    cs.set_local_topk_mask();
    check_cuda(cs);
  }
}

TEST(CudaForward, RowsLongerThanOneChunk) {
  NSA_REQUIRE_DEVICE();
  // C in the thousands with G = 64 (64 rows of 4 bytes per column): the score block takes several chunks
  // (recomputed per pass) and the selection stencil crosses chunk boundaries (the halo). Band masks put
  // the window start and end at varying offsets; some rows fully masked (the window is then the whole row).
  for (DType dt : {DType::kBF16, DType::kF32}) {
    Case cs = random_filled(dt, {6, 3}, {2500, 1300}, 64, 1, 32, 16, 32, 16, 64, 12, 21);
    set_band_mask(cs, 1900, 1700);
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(4, c) = 1;  // a fully masked row in tile 0
    check_cuda(cs);
    Case nomask = random_filled(dt, {2}, {3000}, 64, 1, 16, 16, 32, 16, 128, 32, 22);
    check_cuda(nomask);
  }
}

TEST(CudaForward, TiesFromSmallIntegers) {
  NSA_REQUIRE_DEVICE();
  for (DType dt : kCudaDtypes) {
    Case cs = Case::make(dt, {9, 14}, {37, 50}, 6, 2, 16, 8, 32, 16, 64, 5);
    std::mt19937_64 rng(31);
    cs.fill_ints(rng, -1, 1);
    cs.set_random_mask(rng, 0.3, 0.1);
    check_cuda(cs);
  }
}

TEST(CudaForward, StridedInputsAndMasks) {
  NSA_REQUIRE_DEVICE();
  Case cs = random_filled(DType::kBF16, {7, 10}, {22, 31}, 4, 2, 24, 20, 32, 16, 64, 3, 41);
  std::mt19937_64 rng(42);
  cs.set_random_mask(rng, 0.3, 0.1);
  cs.set_random_topk_mask(rng, 0.1);
  cs.q_layout.order = {{1, 0, 2}};
  cs.q_layout.pad = {{1, 2, 3}};
  cs.k_layout.order = {{2, 1, 0}};
  cs.v_layout.step = 3;
  cs.v_layout.pad = {{0, 1, 0}};
  cs.atten_layout.transposed = true;
  cs.atten_layout.pad = {{2, 5}};
  cs.topk_layout.pad = {{1, 3}};
  check_cuda(cs);
}

// Small-integer inputs whose results are exact (one-hot keys, queries in {0, -256}, scale 1: scores are
// 0, -256 or -FLT_MAX; P = 1/n with n a power of two; values in [-3, 3]): every path must give the
// reference's values (and its statistics and indices bit for bit).
bool draw_exact(Case& cs, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> cls(0, static_cast<int>(cs.D) - 1), val(-3, 3);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t r = 0; r < cs.T2(); ++r)
    for (int64_t n = 0; n < cs.N2; ++n) {
      const int hot = cls(rng);
      for (int64_t j = 0; j < cs.D; ++j) cs.set_k(r, n, j, j == hot ? 1.0 : 0.0);
      for (int64_t j = 0; j < cs.D2; ++j) cs.set_v(r, n, j, val(rng));
    }
  cs.enable_atten_mask();
  for (int64_t s = 0; s < cs.max_sq(); ++s) {
    const double kind = u(rng);
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = kind < 0.15 ? 1 : (kind < 0.5 ? (u(rng) < 0.3) : 0);
  }
  cs.set_random_topk_mask(rng, 0.1);
  for (int64_t b = 0; b < cs.B(); ++b) {
    const int64_t C = cs.c[static_cast<size_t>(b)], c0 = cs.c_begin(b);
    for (int64_t s = 0; s < cs.sq[static_cast<size_t>(b)]; ++s) {
      const int64_t t = cs.q_begin(b) + s;
      for (int64_t h = 0; h < cs.N1; ++h) {
        bool ok = false;
        for (int attempt = 0; attempt < 2000 && !ok; ++attempt) {
          for (int64_t j = 0; j < cs.D; ++j) cs.set_q(t, h, j, u(rng) < 0.3 ? 0.0 : -256.0);
          double best = -INFINITY;
          int64_t n = 0, visible = 0;
          for (int64_t c = 0; c < C; ++c) {
            if (cs.atten_at(s, c)) continue;
            ++visible;
            double sc = 0;
            for (int64_t j = 0; j < cs.D; ++j) sc += cs.q[cs.qi(t, h, j)] * cs.k[cs.ki(c0 + c, h / cs.G(), j)];
            if (sc > best) {
              best = sc;
              n = 0;
            }
            if (sc == best) ++n;
          }
          if (visible == 0) n = C;
          ok = (n & (n - 1)) == 0;
        }
        if (!ok) return false;
      }
    }
  }
  return true;
}

TEST(CudaForward, ExactSmallIntegersEqualTheReference) {
  NSA_REQUIRE_DEVICE();
  for (DType dt : kCudaDtypes) {
    for (uint64_t seed : {1u, 2u}) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " seed " + std::to_string(seed));
      Case cs = Case::make(dt, {9, 0, 12, 5}, {32, 64, 16, 8}, 4, 2, 16, 12, 32, 16, 64, 2);
      cs.scale = 1.0;
      std::mt19937_64 rng(seed);
      bool ok = false;
      for (int round = 0; round < 100 && !ok; ++round) ok = draw_exact(cs, rng);
      ASSERT_TRUE(ok) << "could not construct an exact case";
      const Result ref = run(cs, Backend::kReference);
      ASSERT_TRUE(check_complete(cs, ref));
      for (bool simple : paths(dt)) {
        SCOPED_TRACE(path_name(simple));
        const Result got = run_cuda(cs, simple);
        ASSERT_TRUE(check_complete(cs, got));
        EXPECT_EQ(got.out, ref.out);  // by value (an exact zero's sign is not part of the contract)
        EXPECT_EQ(got.topk, ref.topk);
        EXPECT_EQ(0, std::memcmp(got.smax.data(), ref.smax.data(), ref.smax.size() * 4));
        EXPECT_EQ(0, std::memcmp(got.ssum.data(), ref.ssum.data(), ref.ssum.size() * 4));
      }
    }
  }
}

TEST(CudaForward, DeterministicOverRepeats) {
  NSA_REQUIRE_DEVICE();
  Case cs = random_filled(DType::kBF16, {40, 0, 23}, {90, 9, 61}, 16, 2, 64, 32, 32, 16, 64, 3, 51);
  std::mt19937_64 rng(52);
  cs.set_random_mask(rng, 0.3, 0.1);
  for (bool simple : {false, true}) {
    SCOPED_TRACE(path_name(simple));
    const Result a = run_cuda(cs, simple);
    ASSERT_TRUE(a.status.ok()) << a.status.message();
    for (int rep = 0; rep < 3; ++rep) EXPECT_TRUE(bitwise_equal(a, run_cuda(cs, simple)));
  }
}

// Seeded random configurations: NSA_FUZZ_SEED (base) and NSA_FUZZ_ITERS override the defaults; configuration
// i uses seed base + i and a failure prints it.
TEST(CudaForward, Fuzz) {
  NSA_REQUIRE_DEVICE();
  const char* es = std::getenv("NSA_FUZZ_SEED");
  const char* ei = std::getenv("NSA_FUZZ_ITERS");
  const uint64_t base = es ? std::strtoull(es, nullptr, 10) : 20240601u;
  const int iters = ei ? std::atoi(ei) : 40;
  for (int it = 0; it < iters; ++it) {
    const uint64_t seed = base + static_cast<uint64_t>(it);
    SCOPED_TRACE("fuzz seed " + std::to_string(seed));
    std::mt19937_64 rng(seed);
    auto pick = [&](std::initializer_list<int64_t> v) {
      return *(v.begin() + std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng));
    };
    const DType dt = kCudaDtypes[std::uniform_int_distribution<int>(0, 2)(rng)];
    const int64_t d = pick({16, 32}), l = d * pick({1, 2}), lp = std::max(l, d * pick({1, 2, 4}));
    const int64_t M = lp / d;
    const int64_t G = pick({1, 2, 3, 4, 8, 16}), N2 = pick({1, 2});
    const int64_t D = pick({8, 16, 24, 64, 128}), D2 = std::max<int64_t>(1, D - pick({0, 0, 3, 8}));
    const int64_t B = pick({1, 2, 3});
    std::vector<int64_t> sq, c;
    for (int64_t b = 0; b < B; ++b) {
      sq.push_back(std::uniform_int_distribution<int64_t>(0, 20)(rng));
      c.push_back(std::uniform_int_distribution<int64_t>(1, 90)(rng));
    }
    if (std::accumulate(sq.begin(), sq.end(), int64_t(0)) == 0) sq[0] = 3;
    int64_t min_sel = INT64_MAX;
    for (int64_t x : c) min_sel = std::min(min_sel, (x + M - 1) / M);
    const int64_t K = std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(32, min_sel))(rng);
    Case cs = Case::make(dt, sq, c, G * N2, N2, D, D2, l, d, lp, K);
    cs.fill_uniform(rng, -2, 2);
    switch (std::uniform_int_distribution<int>(0, 3)(rng)) {
      case 0: break;
      case 1: cs.set_causal_mask(); break;
      case 2: cs.set_random_mask(rng, 0.3, 0.15); break;
      default: set_band_mask(cs, std::uniform_int_distribution<int64_t>(0, 40)(rng), 1 + std::uniform_int_distribution<int64_t>(0, 30)(rng)); break;
    }
    if (rng() % 2) cs.set_random_topk_mask(rng, 0.1);
    check_cuda(cs);
    if (::testing::Test::HasFailure()) break;
  }
}

// ------------------------------------------------------------------------------------ backward

// The forward results a backward consumes (from the fp32 reference) and dO, in the dtype.
struct BwdCase {
  Result fwd;
  std::vector<double> go;
};

BwdCase make_bwd(const Case& cs, uint64_t seed) {
  BwdCase bc;
  bc.fwd = run(cs, Backend::kRefFp32);
  EXPECT_TRUE(bc.fwd.status.ok()) << bc.fwd.status.message();
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  bc.go.resize(static_cast<size_t>(cs.T() * cs.N1 * cs.D2));
  for (double& x : bc.go) x = round_to(cs.dtype, u(rng));
  return bc;
}

struct Grads {
  Status status;
  std::vector<double> dq, dk, dv;
  std::vector<unsigned char> raw;
};

// Host buffers of a backward call (contiguous attention_out and dO; a permuted dO layout when asked).
struct HostBwd {
  Bound fwd;
  Storage3 out, go;
  std::vector<unsigned char> gq, gk, gv;
  CompressAttentionGradParams p;
  HostBwd(const Case& cs, const BwdCase& bc, bool strided_go) : fwd(cs) {
    const int64_t osz[3] = {cs.T(), cs.N1, cs.D2};
    Layout3 go_layout;
    if (strided_go) {
      go_layout.order = {{1, 2, 0}};
      go_layout.pad = {{1, 0, 2}};
    }
    materialize3(bc.fwd.out, osz, Layout3{}, cs.dtype, &out);
    materialize3(bc.go, osz, go_layout, cs.dtype, &go);
    const size_t es = nsa::dtype_size(cs.dtype);
    gq.assign(std::max<size_t>(1, static_cast<size_t>(cs.T() * cs.N1 * cs.D) * es), 0xFF);
    gk.assign(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.D) * es), 0xFF);
    gv.assign(std::max<size_t>(1, static_cast<size_t>(cs.T2() * cs.N2 * cs.D2) * es), 0xFF);
    p.fwd = fwd.p;
    p.fwd.attention_out = nullptr;
    p.fwd.topk_indices = nullptr;
    p.fwd.softmax_max = nullptr;
    p.fwd.softmax_sum = nullptr;
    p.attention_out = out.view;
    p.grad_out = go.view;
    p.softmax_max = bc.fwd.smax.data();
    p.softmax_sum = bc.fwd.ssum.data();
    p.grad_query = gq.data();
    p.grad_key = gk.data();
    p.grad_value = gv.data();
  }
};

Grads collect_grads(const Case& cs, const HostBwd& hb, Status st) {
  Grads g;
  g.status = st;
  auto conv = [&](const std::vector<unsigned char>& raw, int64_t n, std::vector<double>* out) {
    out->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) (*out)[static_cast<size_t>(i)] = nsa::detail::load_f64(raw.data(), i, cs.dtype);
  };
  conv(hb.gq, cs.T() * cs.N1 * cs.D, &g.dq);
  conv(hb.gk, cs.T2() * cs.N2 * cs.D, &g.dk);
  conv(hb.gv, cs.T2() * cs.N2 * cs.D2, &g.dv);
  g.raw = hb.gq;
  g.raw.insert(g.raw.end(), hb.gk.begin(), hb.gk.end());
  g.raw.insert(g.raw.end(), hb.gv.begin(), hb.gv.end());
  return g;
}

Grads run_bwd_host(const Case& cs, const BwdCase& bc, bool fp64) {
  HostBwd hb(cs, bc, false);
  const Status st = fp64 ? nsa::reference::backward_fp64(hb.p) : nsa::reference::backward_fp32(hb.p);
  return collect_grads(cs, hb, st);
}

Grads run_bwd_cuda(const Case& cs, const BwdCase& bc, bool strided_go) {
  HostBwd hb(cs, bc, strided_go);
  const Bound& bd = hb.fwd;
  DevBuf q(bd.qs.bytes.data(), bd.qs.bytes.size()), k(bd.ks.bytes.data(), bd.ks.bytes.size()),
      v(bd.vs.bytes.data(), bd.vs.bytes.size()), am, out(hb.out.bytes.data(), hb.out.bytes.size()),
      go(hb.go.bytes.data(), hb.go.bytes.size()), smax(bc.fwd.smax.data(), bc.fwd.smax.size() * 4),
      ssum(bc.fwd.ssum.data(), bc.fwd.ssum.size() * 4), gq(hb.gq.size()), gk(hb.gk.size()), gv(hb.gv.size());
  CompressAttentionGradParams p = hb.p;
  p.fwd.query.data = q.rebase(bd.qs.bytes.data(), bd.p.query.data);
  p.fwd.key.data = k.rebase(bd.ks.bytes.data(), bd.p.key.data);
  p.fwd.value.data = v.rebase(bd.vs.bytes.data(), bd.p.value.data);
  if (bd.p.atten_mask.data != nullptr) {
    am = DevBuf(bd.am.bytes.data(), bd.am.bytes.size());
    p.fwd.atten_mask.data = am.rebase(bd.am.bytes.data(), bd.p.atten_mask.data);
  }
  p.fwd.topk_mask.data = nullptr;  // not read by the backward
  p.attention_out.data = out.rebase(hb.out.bytes.data(), hb.p.attention_out.data);
  p.grad_out.data = go.rebase(hb.go.bytes.data(), hb.p.grad_out.data);
  p.softmax_max = static_cast<const float*>(smax.get());
  p.softmax_sum = static_cast<const float*>(ssum.get());
  for (DevBuf* b : {&gq, &gk, &gv}) b->fill(0xFF);
  p.grad_query = gq.get();
  p.grad_key = gk.get();
  p.grad_value = gv.get();
  cudaStream_t stream = nullptr;
  EXPECT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const Status st = nsa::compress_attention_backward_cuda(p, stream);
  const cudaError_t e = cudaStreamSynchronize(stream);
  EXPECT_EQ(e, cudaSuccess) << "kernel execution: " << cudaGetErrorString(e);
  cudaStreamDestroy(stream);
  gq.download(hb.gq.data(), hb.gq.size());
  gk.download(hb.gk.data(), hb.gk.size());
  gv.download(hb.gv.data(), hb.gv.size());
  return collect_grads(cs, hb, st);
}

// FlashAttention's rule per gradient tensor: max |got - model| <= 3 x max |plain - model| plus a floor per
// element (one ulp of the dtype at the model value + 64 fp32 eps x the tensor's largest magnitude).
AssertionResult check_grad(const char* name, DType dt, const std::vector<double>& got, const std::vector<double>& model,
                           const std::vector<double>& plain) {
  double plain_err = 0, mx = 0;
  for (size_t i = 0; i < model.size(); ++i) {
    plain_err = std::max(plain_err, std::fabs(plain[i] - model[i]));
    mx = std::max(mx, std::fabs(model[i]));
  }
  for (size_t i = 0; i < model.size(); ++i) {
    const double err = std::fabs(got[i] - model[i]);
    const double tol = 3 * plain_err + ulp_of(dt, model[i]) + 64 * FLT_EPSILON * mx;
    if (!(err <= tol))
      return AssertionFailure() << name << "[flat " << i << "]: got " << got[i] << ", fp64 model " << model[i]
                                << ", error " << err << " > tolerance " << tol << " (plain error " << plain_err << ")";
  }
  return AssertionSuccess();
}

// Rows that must be exactly zero: key/value rows past the last prefix sum and of batches without queries;
// dQ of fully masked rows.
AssertionResult check_zeros(const Case& cs, const Grads& g) {
  std::vector<char> dead(static_cast<size_t>(cs.T2()), 0);
  for (int64_t r = cs.T2() - cs.extra_kv_rows; r < cs.T2(); ++r) dead[static_cast<size_t>(r)] = 1;
  for (int64_t b = 0; b < cs.B(); ++b)
    if (cs.sq[static_cast<size_t>(b)] == 0)
      for (int64_t r = cs.c_begin(b); r < cs.c_begin(b) + cs.c[static_cast<size_t>(b)]; ++r) dead[static_cast<size_t>(r)] = 1;
  for (int64_t r = 0; r < cs.T2(); ++r) {
    if (!dead[static_cast<size_t>(r)]) continue;
    for (int64_t n = 0; n < cs.N2; ++n) {
      for (int64_t j = 0; j < cs.D; ++j)
        if (g.dk[cs.ki(r, n, j)] != 0.0) return AssertionFailure() << "grad_key row " << r << " must be zero";
      for (int64_t j = 0; j < cs.D2; ++j)
        if (g.dv[cs.vi(r, n, j)] != 0.0) return AssertionFailure() << "grad_value row " << r << " must be zero";
    }
  }
  if (cs.has_atten)
    for (int64_t t = 0; t < cs.T(); ++t) {
      const int64_t b = cs.batch_of(t), s = t - cs.q_begin(b);
      bool fm = true;
      for (int64_t c = 0; c < cs.c[static_cast<size_t>(b)] && fm; ++c) fm = cs.atten_at(s, c) != 0;
      if (!fm) continue;
      for (int64_t h = 0; h < cs.N1; ++h)
        for (int64_t j = 0; j < cs.D; ++j)
          if (g.dq[cs.qi(t, h, j)] != 0.0) return AssertionFailure() << "grad_query of fully masked row " << t << " must be zero";
    }
  for (const std::vector<double>* v : {&g.dq, &g.dk, &g.dv})
    for (double x : *v)
      if (!std::isfinite(x)) return AssertionFailure() << "a gradient is not finite (not written?)";
  return AssertionSuccess();
}

void check_bwd(const Case& cs, uint64_t seed, bool strided_go = false) {
  SCOPED_TRACE(cs.describe());
  const BwdCase bc = make_bwd(cs, seed);
  const Grads model = run_bwd_host(cs, bc, true), plain = run_bwd_host(cs, bc, false);
  ASSERT_TRUE(model.status.ok()) << model.status.message();
  const Grads got = run_bwd_cuda(cs, bc, strided_go);
  ASSERT_TRUE(got.status.ok()) << got.status.message();
  EXPECT_TRUE(check_zeros(cs, got));
  EXPECT_TRUE(check_grad("grad_query", cs.dtype, got.dq, model.dq, plain.dq));
  EXPECT_TRUE(check_grad("grad_key", cs.dtype, got.dk, model.dk, plain.dk));
  EXPECT_TRUE(check_grad("grad_value", cs.dtype, got.dv, model.dv, plain.dv));
}

TEST(CudaBackward, AgainstTheFp64Model) {
  NSA_REQUIRE_DEVICE();
  for (DType dt : kCudaDtypes) {
    for (int64_t G : {1, 2, 3, 8}) {
      SCOPED_TRACE(std::string(nsa::dtype_name(dt)) + " G=" + std::to_string(G));
      Case cs = random_filled(dt, {0, 21, 9, 40}, {5, 37, 12, 70}, 2 * G, 2, 40, 24, 32, 16, 64, 1, 60 + G);
      cs.extra_kv_rows = 3;
      cs.resize();
      std::mt19937_64 rng(70 + G);
      cs.fill_uniform(rng, -1, 1);
      cs.set_random_mask(rng, 0.3, 0.15);
      check_bwd(cs, 80 + G, G == 3);
    }
  }
}

TEST(CudaBackward, CausalAndNoMask) {
  NSA_REQUIRE_DEVICE();
  Case causal = random_filled(DType::kBF16, {300}, {17}, 4, 1, 64, 64, 32, 16, 64, 2, 91);
  causal.set_causal_mask();  // rows 0..30 fully masked: uniform dV share, zero dQ
  check_bwd(causal, 92);
  Case plain = random_filled(DType::kF16, {45, 20}, {130, 33}, 16, 2, 32, 16, 32, 16, 64, 2, 93);
  check_bwd(plain, 94);
}

TEST(CudaBackward, LargeHeads) {
  NSA_REQUIRE_DEVICE();
  // D and D2 above 256: two column slices; D != D2.
  Case cs = random_filled(DType::kF32, {12, 7}, {40, 20}, 4, 2, 288, 260, 32, 16, 64, 1, 95);
  std::mt19937_64 rng(96);
  cs.set_random_mask(rng, 0.2, 0.1);
  check_bwd(cs, 97);
  Case g64 = random_filled(DType::kBF16, {5}, {80}, 64, 1, 192, 128, 32, 16, 64, 1, 98);
  check_bwd(g64, 99);
}

TEST(CudaBackward, Deterministic) {
  NSA_REQUIRE_DEVICE();
  Case cs = random_filled(DType::kBF16, {33, 0, 18}, {70, 9, 41}, 8, 2, 48, 32, 32, 16, 64, 1, 101);
  std::mt19937_64 rng(102);
  cs.set_random_mask(rng, 0.3, 0.1);
  const BwdCase bc = make_bwd(cs, 103);
  const Grads a = run_bwd_cuda(cs, bc, false);
  ASSERT_TRUE(a.status.ok()) << a.status.message();
  for (int rep = 0; rep < 3; ++rep) EXPECT_TRUE(a.raw == run_bwd_cuda(cs, bc, false).raw);
  EXPECT_TRUE(a.raw == run_bwd_cuda(cs, bc, true).raw) << "a strided grad_out must give the same bits";
}

}  // namespace
}  // namespace nsa_test
