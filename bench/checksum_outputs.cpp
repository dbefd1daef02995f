// checksum_outputs: a bitwise fingerprint of every output of compress_attention (forward: attention_out,
// topk_indices, softmax_max, softmax_sum; backward: grad_query, grad_key, grad_value) per case and CPU ISA path,
// through the public C++ API only (so that it builds unchanged at any commit that has this API). Two builds
// give the same lines iff their results are bitwise identical:
//
//   checksum_outputs [--isa scalar,avx2,...] [--case NAME,...] [--threads N] [--list] > sums.txt
//   diff <(grep '^H ' before.txt) <(grep '^H ' after.txt)
//
// Lines:
//   H <case> <path> out=<fnv1a-64> topk=... smax=... ssum=... dq=... dk=... dv=...
//     <path> is an ISA (compress_attention_cpu / compress_attention_backward_cpu with options.isa forced) or
//     "reference" (compress_attention_reference / compress_attention_backward_reference, small cases only).
//   D <case> <path> threads 1,2,3: same | DIFFERENT   (small cases: the CPU results at 1 and 3 threads equal
//     those at --threads, as the backend promises)
//   T <case> <path> fwd_ms=... bwd_ms=...             (one timed call each, for orientation only)
//
// Inputs: seeded normal values rounded to 8 significant bits (exact in bf16, fp16 and fp32), masks of
// docs/spec/compress_attention.md §9 (causal atten_mask, local topk_mask) or seeded random masks with fully
// masked rows, and dO of the same kind.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "nsa/compress_attention.h"

namespace {

using nsa::DType;

enum class MaskKind { kNone, kCausal, kRandom, kBand };

struct Case {
  std::string name;
  DType dtype;
  std::vector<int64_t> sq, c;  // Sq_b, C_b
  int64_t N1, N2, D, D2, l, d, lp, K;
  MaskKind mask;
  bool small;            // also run the reference and the thread-count check
  int64_t key_pad = 0;   // extra elements per key row (a strided key view)
};

std::vector<Case> all_cases() {
  auto bench = [](const char* name, DType dt, int64_t tokens, int64_t n1, int64_t n2) {
    return Case{name, dt, {tokens}, {(tokens - 32) / 16 + 1}, n1, n2, 192, 128, 32, 16, 64, 16, MaskKind::kCausal,
                false};
  };
  std::vector<Case> cs = {
      bench("bench-8k", DType::kBF16, 8192, 32, 2),
      bench("bench-8k-g1", DType::kBF16, 8192, 8, 8),
      bench("bench-2k-fp16", DType::kF16, 2048, 32, 2),
      bench("bench-2k-fp16-g1", DType::kF16, 2048, 8, 8),
      bench("bench-2k-fp32", DType::kF32, 2048, 32, 2),
      bench("bench-2k-fp32-g1", DType::kF32, 2048, 8, 8),
      {"varlen-bf16", DType::kBF16, {300, 0, 1000, 517}, {17, 9, 61, 31}, 32, 2, 192, 128, 32, 16, 64, 3,
       MaskKind::kCausal, false},
  };
  // small odd shapes: G = 5, 1, 7, 80 (beyond the fused group of 64), odd D / D2, empty batches, random masks
  // with fully masked rows, a band mask, a strided key
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    const std::string suffix = dt == DType::kBF16 ? "bf16" : dt == DType::kF16 ? "fp16" : "fp32";
    cs.push_back({"odd-g5-" + suffix, dt, {37, 0, 50, 13}, {40, 9, 61, 17}, 15, 3, 40, 24, 32, 16, 64, 2,
                  MaskKind::kRandom, true});
    cs.push_back({"odd-g1-" + suffix, dt, {25, 64}, {12, 50}, 3, 3, 20, 12, 64, 32, 128, 1, MaskKind::kBand, true,
                  3});
    cs.push_back({"odd-g7-" + suffix, dt, {70}, {130}, 7, 1, 33, 17, 32, 16, 64, 5, MaskKind::kNone, true});
    cs.push_back({"odd-g80-" + suffix, dt, {20, 9}, {30, 70}, 80, 1, 16, 16, 32, 16, 64, 3, MaskKind::kCausal, true});
  }
  return cs;
}

// ---------------------------------------------------------------- values
// A normal value rounded to 8 significant bits, 0 below 2^-14: exactly representable in bf16, fp16 and fp32.
float value8(std::normal_distribution<float>& dist, std::mt19937_64& rng) {
  float x = dist(rng);
  if (std::fabs(x) < 0.00006103515625f) return 0.0f;
  int e;
  const float f = std::frexp(x, &e);  // x = f * 2^e, |f| in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(f, 8)), e - 8);
}

// Stores x (exactly representable, see value8) as element i of a dtype buffer.
void put(std::vector<uint8_t>& buf, size_t i, float x, DType dt) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (dt == DType::kF32) {
    std::memcpy(buf.data() + 4 * i, &x, 4);
    return;
  }
  uint16_t h;
  if (dt == DType::kBF16) {
    h = static_cast<uint16_t>(u >> 16);
  } else {  // fp16: normal values (|x| >= 2^-14) with <= 11 significant bits, or zero
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    h = a == 0 ? sign : static_cast<uint16_t>(sign | (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu));
  }
  std::memcpy(buf.data() + 2 * i, &h, 2);
}

uint64_t fnv1a(const void* data, size_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// ---------------------------------------------------------------- one case, bound
struct Bound {
  const Case* cs = nullptr;
  int64_t T = 0, T2 = 0, max_sq = 0, max_c = 0, max_sel = 0;
  std::vector<int64_t> pq, pc;
  std::vector<uint8_t> q, k, v, dout, am, tm;
  nsa::CompressAttentionParams p;  // inputs only

  explicit Bound(const Case& c) : cs(&c) {
    const int64_t M = c.lp / c.d;
    for (size_t b = 0; b < c.sq.size(); ++b) {
      T += c.sq[b];
      T2 += c.c[b];
      pq.push_back(T);
      pc.push_back(T2);
      max_sq = std::max(max_sq, c.sq[b]);
      max_c = std::max(max_c, c.c[b]);
    }
    max_sel = (max_c + M - 1) / M;
    const size_t es = nsa::dtype_size(c.dtype);
    std::mt19937_64 rng(20240611);
    std::normal_distribution<float> dist(0.f, 1.f);
    auto fill = [&](std::vector<uint8_t>& buf, int64_t n, int64_t row, int64_t pad) {
      buf.assign(static_cast<size_t>(n / row * (row + pad)) * es, 0);
      for (int64_t r = 0; r < n / row; ++r)
        for (int64_t j = 0; j < row; ++j) put(buf, static_cast<size_t>(r * (row + pad) + j), value8(dist, rng), c.dtype);
    };
    fill(q, T * c.N1 * c.D, c.D, 0);
    fill(k, T2 * c.N2 * c.D, c.D, c.key_pad);
    fill(v, T2 * c.N2 * c.D2, c.D2, 0);
    fill(dout, T * c.N1 * c.D2, c.D2, 0);
    if (c.mask != MaskKind::kNone) {
      am.assign(static_cast<size_t>(max_sq * max_c), 0);
      tm.assign(static_cast<size_t>(max_sq * max_sel), 0);
      std::uniform_real_distribution<double> u(0, 1);
      for (int64_t s = 0; s < max_sq; ++s) {
        const bool full = c.mask == MaskKind::kRandom && u(rng) < 0.15;
        for (int64_t i = 0; i < max_c; ++i) {
          bool m = false;
          switch (c.mask) {
            case MaskKind::kCausal: m = i * c.d + c.l - 1 > s; break;
            case MaskKind::kRandom: m = full || u(rng) < 0.3; break;
            case MaskKind::kBand: {
              const int64_t end = s * max_c / max_sq + 1;
              m = !(i <= end && i > end - 7);
              break;
            }
            case MaskKind::kNone: break;
          }
          am[static_cast<size_t>(s * max_c + i)] = m;
        }
        const int64_t cur = s / c.lp;
        for (int64_t j = 0; j < max_sel; ++j) tm[static_cast<size_t>(s * max_sel + j)] = j < 1 || (j <= cur && j > cur - 2);
      }
    }
    p.dtype = c.dtype;
    p.query = view(q.data(), T, c.N1, c.D, 0);
    p.key = view(k.data(), T2, c.N2, c.D, c.key_pad);
    p.value = view(v.data(), T2, c.N2, c.D2, 0);
    p.scale_value = 1.0 / std::sqrt(static_cast<double>(c.D));
    p.head_num = c.N1;
    p.compress_block_size = c.l;
    p.compress_stride = c.d;
    p.select_block_size = c.lp;
    p.select_block_count = c.K;
    if (c.mask != MaskKind::kNone) {
      p.atten_mask.data = am.data();
      p.atten_mask.size[0] = max_sq, p.atten_mask.size[1] = max_c;
      p.atten_mask.stride[0] = max_c, p.atten_mask.stride[1] = 1;
      p.topk_mask.data = tm.data();
      p.topk_mask.size[0] = max_sq, p.topk_mask.size[1] = max_sel;
      p.topk_mask.stride[0] = max_sel, p.topk_mask.stride[1] = 1;
    }
    p.actual_seq_qlen = {pq.data(), static_cast<int64_t>(pq.size())};
    p.actual_cmp_seq_kvlen = {pc.data(), static_cast<int64_t>(pc.size())};
  }
  // [a, b, c] with rows of c + pad elements
  static nsa::Tensor3 view(const void* data, int64_t a, int64_t b, int64_t c, int64_t pad) {
    nsa::Tensor3 t;
    t.data = data;
    t.size[0] = a, t.size[1] = b, t.size[2] = c;
    t.stride[0] = b * (c + pad), t.stride[1] = c + pad, t.stride[2] = 1;
    return t;
  }
};

struct Outputs {
  std::string error;
  std::vector<uint8_t> out, gq, gk, gv;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
  double fwd_ms = 0, bwd_ms = 0;
  std::string line() const {
    if (!error.empty()) return "error: " + error;
    char buf[512];
    std::snprintf(buf, sizeof(buf), "out=%016llx topk=%016llx smax=%016llx ssum=%016llx dq=%016llx dk=%016llx dv=%016llx",
                  (unsigned long long)fnv1a(out.data(), out.size()),
                  (unsigned long long)fnv1a(topk.data(), topk.size() * 4),
                  (unsigned long long)fnv1a(smax.data(), smax.size() * 4),
                  (unsigned long long)fnv1a(ssum.data(), ssum.size() * 4),
                  (unsigned long long)fnv1a(gq.data(), gq.size()), (unsigned long long)fnv1a(gk.data(), gk.size()),
                  (unsigned long long)fnv1a(gv.data(), gv.size()));
    return buf;
  }
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// isa < -1: the reference backend; else compress_attention_cpu / _backward_cpu with {isa, threads}.
Outputs run(const Bound& bd, int isa, int threads) {
  const Case& c = *bd.cs;
  const size_t es = nsa::dtype_size(c.dtype);
  Outputs o;
  o.out.assign(static_cast<size_t>(bd.T * c.N1 * c.D2) * es + 64, 0xEE);
  o.topk.assign(static_cast<size_t>(bd.T * c.N2 * c.K), -7);
  o.smax.assign(static_cast<size_t>(bd.T * c.N1 * 8), -7.0f);
  o.ssum.assign(o.smax.size(), -7.0f);
  // attention_out 64-byte aligned like torch's allocator (the forward streams large aligned outputs)
  uint8_t* out = o.out.data() + (64 - reinterpret_cast<uintptr_t>(o.out.data()) % 64) % 64;
  nsa::CompressAttentionParams p = bd.p;
  p.attention_out = out;
  p.topk_indices = o.topk.data();
  p.softmax_max = o.smax.data();
  p.softmax_sum = o.ssum.data();
  const nsa::CpuOptions options{isa, threads};
  double t0 = now_ms();
  nsa::Status st = isa < -1 ? nsa::compress_attention_reference(p) : nsa::compress_attention_cpu(p, options);
  o.fwd_ms = now_ms() - t0;
  if (!st.ok()) {
    o.error = "forward: " + st.message();
    return o;
  }
  o.gq.assign(static_cast<size_t>(bd.T * c.N1 * c.D) * es, 0xEE);
  o.gk.assign(static_cast<size_t>(bd.T2 * c.N2 * c.D) * es, 0xEE);
  o.gv.assign(static_cast<size_t>(bd.T2 * c.N2 * c.D2) * es, 0xEE);
  nsa::CompressAttentionGradParams g;
  g.fwd = bd.p;
  g.attention_out = Bound::view(out, bd.T, c.N1, c.D2, 0);
  g.grad_out = Bound::view(bd.dout.data(), bd.T, c.N1, c.D2, 0);
  g.softmax_max = o.smax.data();
  g.softmax_sum = o.ssum.data();
  g.grad_query = o.gq.data();
  g.grad_key = o.gk.data();
  g.grad_value = o.gv.data();
  t0 = now_ms();
  st = isa < -1 ? nsa::compress_attention_backward_reference(g) : nsa::compress_attention_backward_cpu(g, options);
  o.bwd_ms = now_ms() - t0;
  if (!st.ok()) o.error = "backward: " + st.message();
  // only the output bytes count (not the alignment slack)
  std::vector<uint8_t> exact(out, out + bd.T * c.N1 * c.D2 * static_cast<int64_t>(es));
  o.out.swap(exact);
  return o;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t a = 0;
  while (a <= s.size()) {
    const size_t b = s.find(',', a);
    out.push_back(s.substr(a, b == std::string::npos ? std::string::npos : b - a));
    if (b == std::string::npos) break;
    a = b + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string isas_arg, cases_arg;
  int threads = 2;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--isa" && i + 1 < argc) isas_arg = argv[++i];
    else if (a == "--case" && i + 1 < argc) cases_arg = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--list") list = true;
    else {
      std::fprintf(stderr, "usage: checksum_outputs [--isa scalar,avx2,avx512,avx512bf16] [--case NAME,...] "
                           "[--threads N] [--list]\n");
      return a == "-h" || a == "--help" ? 0 : 2;
    }
  }
  const std::vector<Case> cases = all_cases();
  if (list) {
    for (const Case& c : cases) std::printf("%s\n", c.name.c_str());
    return 0;
  }
  std::vector<nsa::CpuIsa> isas;
  for (int i = 0; i <= static_cast<int>(nsa::CpuIsa::kAvx512Bf16); ++i) {
    const auto isa = static_cast<nsa::CpuIsa>(i);
    if (!nsa::cpu_isa_supported(isa)) continue;
    if (!isas_arg.empty()) {
      bool want = false;
      for (const std::string& s : split(isas_arg)) want |= s == nsa::cpu_isa_name(isa);
      if (!want) continue;
    }
    isas.push_back(isa);
  }
  std::vector<std::string> wanted = cases_arg.empty() ? std::vector<std::string>{} : split(cases_arg);
  int rc = 0;
  for (const Case& c : cases) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), c.name) == wanted.end()) continue;
    const Bound bd(c);
    if (c.small) {
      const Outputs r = run(bd, -2, 1);
      std::printf("H %s reference %s\n", c.name.c_str(), r.line().c_str());
    }
    for (nsa::CpuIsa isa : isas) {
      const Outputs r = run(bd, static_cast<int>(isa), threads);
      std::printf("H %s %s %s\n", c.name.c_str(), nsa::cpu_isa_name(isa), r.line().c_str());
      std::printf("T %s %s fwd_ms=%.1f bwd_ms=%.1f\n", c.name.c_str(), nsa::cpu_isa_name(isa), r.fwd_ms, r.bwd_ms);
      if (!r.error.empty()) rc = 1;
      if (c.small) {
        const std::string l1 = run(bd, static_cast<int>(isa), 1).line(), l3 = run(bd, static_cast<int>(isa), 3).line();
        const bool same = l1 == r.line() && l3 == r.line();
        std::printf("D %s %s threads 1,%d,3: %s\n", c.name.c_str(), nsa::cpu_isa_name(isa), threads, same ? "same" : "DIFFERENT");
        if (!same) rc = 1;
      }
      std::fflush(stdout);
    }
  }
  return rc;
}
