// 64-bit element offsets: strided views whose element offsets exceed 2^31 (and 2^32 bytes), over real memory.
// A sparse anonymous mapping (mmap MAP_NORESERVE) of ~9 GiB of address space holds the views; only the
// pages actually written and read become resident (a few MB), so this runs within CI memory. Each case
// runs compress_attention_reference and compress_attention_cpu on every ISA path on the huge-stride views
// and on the same values laid out contiguously, and requires bitwise equal outputs (strides must not
// change a single bit, docs/CONTRIBUTING.md rule 7), and the backward likewise (grad outputs are contiguous, so only
// its input offsets are huge).
//
// Cases (element strides; 2^31 = 2147483648):
//   query   [2, N1, D]  stride[0] = 2^31 + 5                 (row 1 at element 2^31 + 5)
//   key     [3, N2, D]  stride[1] = 2^30 + 3, stride[0] = 1  (head 1 at ~2^30, rows interleaved: C = 3)
//   value   [3, N2, D2] stride[2] = 2^26 + 1                 (element D2-1 at ~2^31 for D2 = 33)
//   masks   atten [2, 3] stride (2^32 + 11, 1); topk [2, 1] stride (1, 2^31 + 9)
// Last line: "offsets64: N checks, M mismatches (max element offset O)". Exit 1 on any mismatch.
#include <sys/mman.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

namespace nsa_test {
namespace {

// A sparse region of address space (reads of untouched pages give zeros).
struct Sparse {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  explicit Sparse(size_t n) : bytes(n) {
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    base = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
  }
  ~Sparse() {
    if (base) munmap(base, bytes);
  }
  Sparse(const Sparse&) = delete;
  Sparse& operator=(const Sparse&) = delete;
};

struct Outs {
  Status st;
  std::vector<unsigned char> out;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
  std::vector<unsigned char> gq, gk, gv;
};

bool same(const Outs& a, const Outs& b, std::string* why) {
  if (!a.st.ok() || !b.st.ok()) {
    *why = "call failed: " + a.st.message() + " / " + b.st.message();
    return false;
  }
  if (a.out != b.out) return *why = "attention_out differs", false;
  if (a.topk != b.topk) return *why = "topk_indices differ", false;
  if (std::memcmp(a.smax.data(), b.smax.data(), a.smax.size() * 4)) return *why = "softmax_max differs", false;
  if (std::memcmp(a.ssum.data(), b.ssum.data(), a.ssum.size() * 4)) return *why = "softmax_sum differs", false;
  if (a.gq != b.gq || a.gk != b.gk || a.gv != b.gv) return *why = "gradients differ", false;
  return true;
}

enum class Which { kReference, kCpu };

Outs run_both(const CompressAttentionParams& in, const Case& cs, Which w, int isa, const std::vector<unsigned char>& go) {
  const size_t es = nsa::dtype_size(cs.dtype), T = static_cast<size_t>(cs.T());
  Outs o;
  o.out.assign(T * cs.N1 * cs.D2 * es, 0xFF);
  o.topk.assign(T * cs.N2 * cs.K, -1);
  o.smax.assign(T * cs.N1 * 8, 0.0f);
  o.ssum.assign(T * cs.N1 * 8, 0.0f);
  CompressAttentionParams p = in;
  p.attention_out = o.out.data();
  p.topk_indices = o.topk.data();
  p.softmax_max = o.smax.data();
  p.softmax_sum = o.ssum.data();
  const nsa::CpuOptions options{isa, 2};
  o.st = w == Which::kCpu ? nsa::compress_attention_cpu(p, options) : nsa::compress_attention_reference(p);
  if (!o.st.ok()) return o;
  o.gq.assign(T * cs.N1 * cs.D * es, 0xFF);
  o.gk.assign(static_cast<size_t>(cs.T2() * cs.N2 * cs.D) * es, 0xFF);
  o.gv.assign(static_cast<size_t>(cs.T2() * cs.N2 * cs.D2) * es, 0xFF);
  nsa::CompressAttentionGradParams g;
  g.fwd = p;
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
  g.grad_out = contiguous(go.data());
  g.softmax_max = o.smax.data();
  g.softmax_sum = o.ssum.data();
  g.grad_query = o.gq.data();
  g.grad_key = o.gk.data();
  g.grad_value = o.gv.data();
  o.st = w == Which::kCpu ? nsa::compress_attention_backward_cpu(g, options) : nsa::compress_attention_backward_reference(g);
  return o;
}

// Writes the logical [s0][s1][s2] values of `vals` at base + offsets given by `stride` (dtype dt).
void scatter3(unsigned char* base, const std::vector<double>& vals, const int64_t size[3], const int64_t stride[3],
              DType dt) {
  for (int64_t i = 0; i < size[0]; ++i)
    for (int64_t j = 0; j < size[1]; ++j)
      for (int64_t k = 0; k < size[2]; ++k)
        nsa::detail::store_f64(base, i * stride[0] + j * stride[1] + k * stride[2],
                               vals[static_cast<size_t>((i * size[1] + j) * size[2] + k)], dt);
}

}  // namespace
}  // namespace nsa_test

int main() {
  using namespace nsa_test;
  const int64_t two31 = int64_t(1) << 31;
  int checks = 0, mismatches = 0;
  int64_t max_off = 0;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = nsa::dtype_size(dt);
    // B = 1, Sq = 2, C = 3, N1 = 4, N2 = 2 (G = 2), D = 40, D2 = 33, (l, d, l') = (32, 16, 32): M = 2, Sel = 2
    Case cs = Case::make(dt, {2}, {3}, 4, 2, 40, 33, 32, 16, 32, 1);
    std::mt19937_64 rng(99);
    cs.fill_uniform(rng, -1, 1);
    cs.enable_atten_mask();
    cs.atten_at(1, 2) = 1;  // row 1 does not see token 2
    cs.enable_topk_mask();
    cs.topk_at(0, 1) = 1;  // row 0 forces block 1
    Bound contiguous(cs);  // the same values, compact layouts

    const int64_t qst[3] = {two31 + 5, 40, 1};
    const int64_t kst[3] = {1, (int64_t(1) << 30) + 3, 3};  // rows interleaved inside each head: offsets r + 3 d
    const int64_t vst[3] = {66, 1, (int64_t(1) << 26) + 1};
    // value: element [r][n][j] at r*66 + n*1 + j*(2^26+1): distinct for r < 3, n < 2, j < 33
    const int64_t qsz[3] = {2, 4, 40}, ksz[3] = {3, 2, 40}, vsz[3] = {3, 2, 33};
    auto extent = [&](const int64_t sz[3], const int64_t st[3]) {
      int64_t e = 0;
      for (int i = 0; i < 3; ++i) e += (sz[i] - 1) * st[i];
      return e + 1;
    };
    const int64_t qext = extent(qsz, qst), kext = extent(ksz, kst), vext = extent(vsz, vst);
    const int64_t am_rs = (int64_t(1) << 32) + 11, tm_cs = two31 + 9;
    const size_t q_bytes = static_cast<size_t>(qext) * es, k_bytes = static_cast<size_t>(kext) * es,
                 v_bytes = static_cast<size_t>(vext) * es;
    const size_t am_bytes = static_cast<size_t>(am_rs + 3), tm_bytes = static_cast<size_t>(tm_cs + 2);
    Sparse qm(q_bytes), km(k_bytes), vm(v_bytes), amm(am_bytes), tmm(tm_bytes);
    if (!qm.base || !km.base || !vm.base || !amm.base || !tmm.base) {
      std::printf("offsets64: could not reserve the sparse address space (mmap MAP_NORESERVE failed)\n");
      return 1;
    }
    max_off = std::max({max_off, qext - 1, kext - 1, vext - 1, am_rs + 2, tm_cs});
    scatter3(qm.base, cs.q, qsz, qst, dt);
    scatter3(km.base, cs.k, ksz, kst, dt);
    scatter3(vm.base, cs.v, vsz, vst, dt);
    for (int64_t s = 0; s < 2; ++s) {
      for (int64_t c = 0; c < 3; ++c) amm.base[s * am_rs + c] = cs.atten_at(s, c);
      tmm.base[s] = cs.topk_at(s, 0);
      tmm.base[s + tm_cs] = cs.topk_at(s, 1);
    }
    CompressAttentionParams huge = contiguous.p;
    huge.query.data = qm.base;
    huge.key.data = km.base;
    huge.value.data = vm.base;
    for (int i = 0; i < 3; ++i) {
      huge.query.stride[i] = qst[i];
      huge.key.stride[i] = kst[i];
      huge.value.stride[i] = vst[i];
    }
    huge.atten_mask.data = amm.base;
    huge.atten_mask.stride[0] = am_rs;
    huge.atten_mask.stride[1] = 1;
    huge.topk_mask.data = tmm.base;
    huge.topk_mask.stride[0] = 1;
    huge.topk_mask.stride[1] = tm_cs;

    std::vector<unsigned char> go(static_cast<size_t>(cs.T() * cs.N1 * cs.D2) * es);
    std::uniform_real_distribution<double> u(-1, 1);
    for (int64_t i = 0; i < cs.T() * cs.N1 * cs.D2; ++i) nsa::detail::store_f64(go.data(), i, u(rng), dt);

    std::vector<std::pair<Which, int>> paths = {{Which::kReference, -1}};
    for (CpuIsa isa : supported_isas()) paths.push_back({Which::kCpu, static_cast<int>(isa)});
    for (const auto& [w, isa] : paths) {
      const Outs a = run_both(contiguous.p, cs, w, isa, go), b = run_both(huge, cs, w, isa, go);
      std::string why;
      ++checks;
      if (!same(a, b, &why)) {
        ++mismatches;
        std::printf("offsets64: MISMATCH %s %s: %s\n", nsa::dtype_name(dt),
                    w == Which::kReference ? "reference" : nsa::cpu_isa_name(static_cast<CpuIsa>(isa)), why.c_str());
      }
    }
  }
  std::printf("offsets64: %d checks (reference + every ISA path, forward + backward, bf16/fp16/fp32), %d mismatches "
              "(max element offset %" PRId64 " > 2^31)\n",
              checks, mismatches, max_off);
  return mismatches == 0 ? 0 : 1;
}
