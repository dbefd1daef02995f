// Concurrency stress for the TSan leg (and the ASan leg): several caller threads run
// compress_attention_cpu and compress_attention_backward_cpu at the same time on SHARED read-only
// inputs, each call with num_threads 1, 2, 3 or 5 and a forced ISA path, and every result must be bitwise
// equal to the serial (num_threads = 1) result of the same case and path. The calls' parallel loops meet in
// the library's persistent worker pool (src/common/threads.cpp): one call at a time runs on it, the others
// start private workers, and the pool grows when a call asks for more workers than it has. The CPU backend
// synchronises with std::mutex, std::condition_variable and atomics only (no OpenMP), so ThreadSanitizer sees
// every synchronisation of the library.
//
// Environment: NSA_STRESS_CALLERS (default 4), NSA_STRESS_ROUNDS (calls per caller, default 24).
// Last line: "stress_threads: N concurrent calls (C callers x 1-5 workers), M mismatches". Exit 1 on any mismatch.
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nsa_test {
namespace {

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtoull(s, nullptr, 10) : dflt;
}

// Outputs of one forward + backward call, as raw bytes.
struct Outputs {
  std::string error;
  std::vector<unsigned char> out;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
  std::vector<unsigned char> gq, gk, gv;
  bool operator==(const Outputs& o) const {
    return error == o.error && out == o.out && topk == o.topk && gq == o.gq && gk == o.gk && gv == o.gv &&
           std::memcmp(smax.data(), o.smax.data(), smax.size() * 4) == 0 &&
           std::memcmp(ssum.data(), o.ssum.data(), ssum.size() * 4) == 0;
  }
};

// A case with its inputs materialized once (shared by every caller thread, read-only) and dO.
struct Shared {
  Case cs;
  std::unique_ptr<Bound> in;
  std::vector<unsigned char> grad_out;  // [T, N1, D2] contiguous, dtype
};

Outputs call(const Shared& sh, int isa, int threads) {
  const Case& cs = sh.cs;
  const size_t es = nsa::dtype_size(cs.dtype);
  const size_t T = static_cast<size_t>(cs.T());
  Outputs o;
  o.out.assign(T * cs.N1 * cs.D2 * es, 0xFF);
  o.topk.assign(T * cs.N2 * cs.K, -1);
  o.smax.assign(T * cs.N1 * 8, 0.0f);
  o.ssum.assign(T * cs.N1 * 8, 0.0f);
  CompressAttentionParams p = sh.in->p;  // shared inputs, private outputs
  p.attention_out = o.out.data();
  p.topk_indices = o.topk.data();
  p.softmax_max = o.smax.data();
  p.softmax_sum = o.ssum.data();
  const nsa::CpuOptions options{isa, threads};
  Status st = nsa::compress_attention_cpu(p, options);
  if (!st.ok()) {
    o.error = "forward: " + st.message();
    return o;
  }
  o.gq.assign(T * cs.N1 * cs.D * es, 0xFF);
  o.gk.assign(static_cast<size_t>(cs.T2() * cs.N2 * cs.D) * es, 0xFF);
  o.gv.assign(static_cast<size_t>(cs.T2() * cs.N2 * cs.D2) * es, 0xFF);
  nsa::CompressAttentionGradParams g;
  g.fwd = p;
  g.fwd.attention_out = nullptr;
  g.fwd.topk_indices = nullptr;
  g.fwd.softmax_max = nullptr;
  g.fwd.softmax_sum = nullptr;
  auto contiguous = [&](const void* data) {
    nsa::Tensor3 t;
    t.data = data;
    t.size[0] = cs.T();
    t.size[1] = cs.N1;
    t.size[2] = cs.D2;
    t.stride[0] = cs.N1 * cs.D2;
    t.stride[1] = cs.D2;
    t.stride[2] = 1;
    return t;
  };
  g.attention_out = contiguous(o.out.data());
  g.grad_out = contiguous(sh.grad_out.data());
  g.softmax_max = o.smax.data();
  g.softmax_sum = o.ssum.data();
  g.grad_query = o.gq.data();
  g.grad_key = o.gk.data();
  g.grad_value = o.gv.data();
  st = nsa::compress_attention_backward_cpu(g, options);
  if (!st.ok()) o.error = "backward: " + st.message();
  return o;
}

std::vector<Shared> make_cases() {
  std::vector<Shared> out;
  std::mt19937_64 rng(4242);
  auto add = [&](Case cs) {
    Shared s;
    s.cs = std::move(cs);
    s.in = std::make_unique<Bound>(s.cs);
    const size_t n = static_cast<size_t>(s.cs.T() * s.cs.N1 * s.cs.D2);
    s.grad_out.resize(n * nsa::dtype_size(s.cs.dtype));
    std::uniform_real_distribution<double> u(-1, 1);
    for (size_t i = 0; i < n; ++i) nsa::detail::store_f64(s.grad_out.data(), static_cast<int64_t>(i), u(rng), s.cs.dtype);
    out.push_back(std::move(s));
  };
  {  // bf16, G = 4, batches with an empty one, random masks with fully masked rows, forced blocks
    Case cs = Case::make(DType::kBF16, {37, 0, 50, 13}, {40, 9, 61, 17}, 8, 2, 40, 24, 32, 16, 64, 2);
    cs.fill_uniform(rng, -1, 1);
    cs.set_random_mask(rng, 0.3, 0.15);
    cs.set_random_topk_mask(rng, 0.1);
    add(std::move(cs));
  }
  {  // fp16, causal mask (§9), G = 1, several query tiles
    Case cs = Case::make(DType::kF16, {90, 41}, {70, 33}, 2, 2, 32, 32, 32, 16, 64, 4);
    cs.fill_uniform(rng, -1, 1);
    cs.set_causal_mask();
    cs.set_local_topk_mask();
    add(std::move(cs));
  }
  {  // fp32, G = 3, strided inputs, band mask, extra key rows
    Case cs = Case::make(DType::kF32, {25, 64}, {12, 50}, 3, 1, 20, 12, 64, 32, 128, 1);
    cs.extra_kv_rows = 2;
    cs.resize();
    cs.fill_uniform(rng, -1, 1);
    cs.set_band_mask(7, 1);
    cs.q_layout.order = {1, 0, 2};
    cs.k_layout.pad = {1, 2, 3};
    cs.v_layout.step = 2;
    add(std::move(cs));
  }
  return out;
}

}  // namespace
}  // namespace nsa_test

int main() {
  using namespace nsa_test;
  const int callers = static_cast<int>(env_u64("NSA_STRESS_CALLERS", 4));
  const uint64_t rounds = env_u64("NSA_STRESS_ROUNDS", 24);
  const std::vector<CpuIsa> isas = supported_isas();
  const std::vector<Shared> cases = make_cases();
  // serial results per (case, isa)
  std::vector<Outputs> serial;
  for (const Shared& s : cases)
    for (CpuIsa isa : isas) {
      serial.push_back(call(s, static_cast<int>(isa), 1));
      if (!serial.back().error.empty()) {
        std::printf("stress_threads: serial call failed: %s\n", serial.back().error.c_str());
        return 1;
      }
    }
  const int worker_counts[] = {1, 2, 3, 5};
  std::atomic<uint64_t> calls{0}, mismatches{0};
  std::vector<std::thread> pool;
  for (int c = 0; c < callers; ++c) {
    pool.emplace_back([&, c] {
      std::mt19937_64 rng(static_cast<uint64_t>(c) * 7919 + 1);
      for (uint64_t i = 0; i < rounds; ++i) {
        const size_t ci = static_cast<size_t>(rng() % cases.size()), ii = static_cast<size_t>(rng() % isas.size());
        const int threads = worker_counts[rng() % 4];
        const Outputs got = call(cases[ci], static_cast<int>(isas[ii]), threads);
        calls.fetch_add(1);
        if (!(got == serial[ci * isas.size() + ii])) {
          mismatches.fetch_add(1);
          std::printf("stress_threads: MISMATCH caller %d round %" PRIu64 ": case %zu (%s), cpu_isa=%s, num_threads=%d %s\n",
                      c, i, ci, cases[ci].cs.describe().c_str(), nsa::cpu_isa_name(isas[ii]), threads,
                      got.error.c_str());
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  std::printf("stress_threads: %" PRIu64 " concurrent forward+backward calls (%d callers x 1-5 workers, %zu cases x %zu ISA paths), %" PRIu64
              " mismatches vs serial\n",
              calls.load(), callers, cases.size(), isas.size(), mismatches.load());
  return mismatches.load() == 0 ? 0 : 1;
}
