// nsa-ops C++ demo: one causal bf16 sequence through the optimized CPU backend and the reference,
// checked against each other (docs/spec/compress_attention.md: topk_indices identical, statistics within rtol 1e-5,
// attention_out within 2 bf16 ulps or one rounding flip of P), then the shapes and the top-k of a few query rows.
//
// Masks follow docs/spec/compress_attention.md §9: atten_mask[t][i] = 1 when i*d + l - 1 > t (compressed token i ends after t);
// topk_mask forces block 0 and the two local blocks {t/l' - 1, t/l'}.
#include <nsa/compress_attention.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

// float -> bf16 bit pattern, round to nearest even (finite inputs).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Distance in units in the last place between two bf16 values (ordered bit patterns).
int64_t bf16_ulps(uint16_t a, uint16_t b) {
  auto ordered = [](uint16_t h) -> int64_t { return (h & 0x8000u) ? -static_cast<int64_t>(h & 0x7FFFu) : h; };
  return std::llabs(ordered(a) - ordered(b));
}

nsa::Tensor3 contiguous3(const void* data, int64_t a, int64_t b, int64_t c) {
  nsa::Tensor3 t;
  t.data = data;
  t.size[0] = a, t.size[1] = b, t.size[2] = c;
  t.stride[0] = b * c, t.stride[1] = c, t.stride[2] = 1;
  return t;
}

nsa::Mask2 contiguous2(const uint8_t* data, int64_t rows, int64_t cols) {
  nsa::Mask2 m;
  m.data = data;
  m.size[0] = rows, m.size[1] = cols;
  m.stride[0] = cols, m.stride[1] = 1;
  return m;
}

struct Outputs {
  std::vector<uint16_t> out;
  std::vector<int32_t> topk;
  std::vector<float> smax, ssum;
};

}  // namespace

int main() {
  // One sequence of T tokens; N1 = 8 query heads sharing N2 = 2 KV heads (G = 4).
  const int64_t T = 512, N1 = 8, N2 = 2, D = 64, D2 = 32;
  const int64_t l = 32, d = 16, lp = 64, K = 4;
  const int64_t C = (T - l) / d + 1;  // compressed tokens: 31
  const int64_t M = lp / d;           // compressed tokens per selection block: 4
  const int64_t Sel = (C + M - 1) / M;  // selection blocks: 8

  std::mt19937 gen(2024);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto fill = [&](std::vector<uint16_t>& v) { for (auto& x : v) x = to_bf16(normal(gen)); };
  std::vector<uint16_t> q(T * N1 * D), k(C * N2 * D), v(C * N2 * D2);
  fill(q), fill(k), fill(v);

  std::vector<uint8_t> atten_mask(T * C), topk_mask(T * Sel);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < C; ++i) atten_mask[t * C + i] = (i * d + l - 1 > t) ? 1 : 0;
    for (int64_t b = 0; b < Sel; ++b) topk_mask[t * Sel + b] = (b == 0 || b == t / lp || b == t / lp - 1) ? 1 : 0;
  }
  const int64_t seq_qlen[1] = {T}, cmp_kvlen[1] = {C};

  nsa::CompressAttentionParams p;
  p.dtype = nsa::DType::kBF16;
  p.query = contiguous3(q.data(), T, N1, D);
  p.key = contiguous3(k.data(), C, N2, D);
  p.value = contiguous3(v.data(), C, N2, D2);
  p.scale_value = 1.0 / std::sqrt(static_cast<double>(D));
  p.head_num = N1;
  p.compress_block_size = l;
  p.compress_stride = d;
  p.select_block_size = lp;
  p.select_block_count = K;
  p.atten_mask = contiguous2(atten_mask.data(), T, C);
  p.topk_mask = contiguous2(topk_mask.data(), T, Sel);
  p.actual_seq_qlen = {seq_qlen, 1};
  p.actual_cmp_seq_kvlen = {cmp_kvlen, 1};

  // fn: any callable taking the params (the CPU backend with its default CpuOptions, or the reference).
  auto run = [&](auto&& fn, Outputs& o, const char* name) {
    o.out.assign(T * N1 * D2, 0);
    o.topk.assign(T * N2 * K, -1);
    o.smax.assign(T * N1 * 8, 0.f);
    o.ssum.assign(T * N1 * 8, 0.f);
    nsa::CompressAttentionParams q2 = p;
    q2.attention_out = o.out.data();
    q2.topk_indices = o.topk.data();
    q2.softmax_max = o.smax.data();
    q2.softmax_sum = o.ssum.data();
    // validate_compress_attention is what every entry point runs first; it also derives the sizes.
    nsa::CompressAttentionShape shape;
    nsa::Status s = nsa::validate_compress_attention(q2, &shape);
    if (s.ok() && (shape.max_c != C || shape.max_sel != Sel || shape.G != N1 / N2)) {
      s = nsa::Status::Error("unexpected derived sizes");
    }
    if (s.ok()) s = fn(q2);
    if (!s.ok()) std::fprintf(stderr, "%s failed: %s\n", name, s.message().c_str());
    return s.ok();
  };

  Outputs cpu, ref;
  auto cpu_backend = [](const nsa::CompressAttentionParams& q) {
    return nsa::compress_attention_cpu(q, nsa::CpuOptions{});
  };
  if (!run(cpu_backend, cpu, "compress_attention_cpu")) return 1;
  if (!run(nsa::compress_attention_reference, ref, "compress_attention_reference")) return 1;

  // A bad argument is reported, naming it, and nothing is written.
  nsa::CompressAttentionParams bad = p;
  bad.head_num = N1 + 1;
  Outputs unused;
  unused.out.assign(T * N1 * D2, 0);
  unused.topk.assign(T * N2 * K, -1);
  unused.smax.assign(T * N1 * 8, 0.f);
  unused.ssum.assign(T * N1 * 8, 0.f);
  bad.attention_out = unused.out.data();
  bad.topk_indices = unused.topk.data();
  bad.softmax_max = unused.smax.data();
  bad.softmax_sum = unused.ssum.data();
  nsa::Status bad_status = nsa::compress_attention_cpu(bad);

  // attention_out: within 2 bf16 ulps, except where P's rounding flipped. docs/spec/compress_attention.md §3.4 rounds P to bf16
  // before P.V; the CPU backend's exp may differ from the reference's by an fp32 ulp, which now and then
  // rounds one P_c the other way and moves the output by ulp(P_c) |v_c| <= 2^-8 max|v| (P_c <= 1).
  float vmax = 0.f;
  for (uint16_t x : v) vmax = std::max(vmax, std::fabs(from_bf16(x)));
  const double flip = 2.0 * std::ldexp(1.0, -8) * vmax;
  int64_t topk_diff = 0, out_max_ulps = 0, out_over_2ulps = 0, out_bad = 0;
  double stat_rel = 0.0;
  for (size_t i = 0; i < cpu.topk.size(); ++i) topk_diff += cpu.topk[i] != ref.topk[i];
  for (size_t i = 0; i < cpu.out.size(); ++i) {
    int64_t u = bf16_ulps(cpu.out[i], ref.out[i]);
    if (u > out_max_ulps) out_max_ulps = u;
    if (u > 2) {
      ++out_over_2ulps;
      if (std::fabs(double(from_bf16(cpu.out[i])) - double(from_bf16(ref.out[i]))) > flip) ++out_bad;
    }
  }
  for (size_t i = 0; i < cpu.smax.size(); ++i) {
    for (auto [a, b] : {std::pair{cpu.smax[i], ref.smax[i]}, std::pair{cpu.ssum[i], ref.ssum[i]}}) {
      double rel = std::fabs(double(a) - double(b)) / std::max(std::fabs(double(b)), 1e-6);
      if (rel > stat_rel) stat_rel = rel;
    }
  }

  std::printf("nsa-ops C++ demo: causal bf16, T = %lld tokens, l = %lld, d = %lld, l' = %lld, K = %lld, CPU ISA %s\n",
              (long long)T, (long long)l, (long long)d, (long long)lp, (long long)K,
              nsa::cpu_isa_name(nsa::cpu_active_isa()));
  std::printf("  query [%lld, %lld, %lld]  key [%lld, %lld, %lld]  value [%lld, %lld, %lld]  (C = %lld, Sel = %lld)\n",
              (long long)T, (long long)N1, (long long)D, (long long)C, (long long)N2, (long long)D,
              (long long)C, (long long)N2, (long long)D2, (long long)C, (long long)Sel);
  std::printf("  attention_out [%lld, %lld, %lld] bf16  topk_indices [%lld, %lld, %lld] int32  "
              "softmax_max/sum [%lld, %lld, 8] float32\n",
              (long long)T, (long long)N1, (long long)D2, (long long)T, (long long)N2, (long long)K,
              (long long)T, (long long)N1);
  const int64_t rows[] = {0, 31, 100, 300, T - 1};
  for (int64_t t : rows) {
    std::printf("  t = %3lld  top-k (KV head 0):", (long long)t);
    for (int64_t j = 0; j < K; ++j) std::printf(" %d", cpu.topk[(t * N2 + 0) * K + j]);
    std::printf("   out[t, 0, 0] = %+.4f\n", from_bf16(cpu.out[(t * N1 + 0) * D2 + 0]));
  }
  std::printf("  cpu vs reference: top-k differences %lld; attention_out max %lld ulp (%lld of %zu elements beyond "
              "2 ulps, all within one P rounding flip: %s); statistics max rel %.2g\n",
              (long long)topk_diff, (long long)out_max_ulps, (long long)out_over_2ulps, cpu.out.size(),
              out_bad == 0 ? "yes" : "NO", stat_rel);
  std::printf("  bad head_num rejected: %s\n", bad_status.ok() ? "NO" : bad_status.message().c_str());

  const bool ok = topk_diff == 0 && out_bad == 0 && stat_rel <= 1e-5 && !bad_status.ok();
  std::printf("%s\n", ok ? "cpp_demo: OK" : "cpp_demo: MISMATCH");
  return ok ? 0 : 1;
}
