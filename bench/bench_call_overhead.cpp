// bench_call_overhead: the fixed cost of one call of compress_attention_cpu and compress_attention_backward_cpu
// on a tiny case (T = 32 query rows, C = 8, N1 = 4, N2 = 2, D = D2 = 16, fp32, causal mask), where the
// arithmetic is a few microseconds and the rest is set-up: argument checks, workspace, and starting the
// parallel loops' workers. Prints the median over --rounds rounds of --calls calls each, in microseconds per call,
// for 1 thread (no workers) and for --threads threads (default 2).
//
//   bench_call_overhead [--threads N] [--calls N] [--rounds N]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "nsa/compress_attention.h"

namespace {

nsa::Tensor3 view3(const void* data, int64_t a, int64_t b, int64_t c) {
  nsa::Tensor3 t;
  t.data = data;
  t.size[0] = a, t.size[1] = b, t.size[2] = c;
  t.stride[0] = b * c, t.stride[1] = c, t.stride[2] = 1;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, calls = 2000, rounds = 7;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--calls") calls = std::atoi(argv[i + 1]);
    else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
  }
  constexpr int64_t T = 32, C = 8, N1 = 4, N2 = 2, D = 16, D2 = 16, l = 32, d = 16, lp = 64, K = 2;
  std::vector<float> q(T * N1 * D), k(C * N2 * D), v(C * N2 * D2), dout(T * N1 * D2);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 37) % 17) / 17.0f - 0.5f;
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((i * 11) % 13) / 13.0f - 0.5f;
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 7) % 19) / 19.0f - 0.5f;
  for (size_t i = 0; i < dout.size(); ++i) dout[i] = static_cast<float>((i * 5) % 23) / 23.0f - 0.5f;
  std::vector<uint8_t> am(T * C);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) am[t * C + c] = c * d + l - 1 > t + 64;  // causal, no fully masked row
  const int64_t qlen[1] = {T}, clen[1] = {C};
  std::vector<float> out(T * N1 * D2), smax(T * N1 * 8), ssum(T * N1 * 8), gq(q.size()), gk(k.size()), gv(v.size());
  std::vector<int32_t> topk(T * N2 * K);

  nsa::CompressAttentionParams p;
  p.dtype = nsa::DType::kF32;
  p.query = view3(q.data(), T, N1, D);
  p.key = view3(k.data(), C, N2, D);
  p.value = view3(v.data(), C, N2, D2);
  p.scale_value = 0.25;
  p.head_num = N1;
  p.compress_block_size = l, p.compress_stride = d, p.select_block_size = lp, p.select_block_count = K;
  p.atten_mask.data = am.data();
  p.atten_mask.size[0] = T, p.atten_mask.size[1] = C;
  p.atten_mask.stride[0] = C, p.atten_mask.stride[1] = 1;
  p.actual_seq_qlen = {qlen, 1};
  p.actual_cmp_seq_kvlen = {clen, 1};
  p.attention_out = out.data();
  p.topk_indices = topk.data();
  p.softmax_max = smax.data();
  p.softmax_sum = ssum.data();
  nsa::CompressAttentionGradParams g;
  g.fwd = p;
  g.attention_out = view3(out.data(), T, N1, D2);
  g.grad_out = view3(dout.data(), T, N1, D2);
  g.softmax_max = smax.data();
  g.softmax_sum = ssum.data();
  g.grad_query = gq.data();
  g.grad_key = gk.data();
  g.grad_value = gv.data();

  std::printf("tiny case T=%lld C=%lld N1=%lld N2=%lld D=D2=%lld fp32, %d calls x %d rounds, median us per call\n",
              (long long)T, (long long)C, (long long)N1, (long long)N2, (long long)D, calls, rounds);
  std::printf("%-8s %10s %10s\n", "threads", "forward", "backward");
  for (int th : {1, threads}) {
    double med[2];
    for (int which = 0; which < 2; ++which) {
      std::vector<double> per;
      for (int r = 0; r < rounds; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < calls; ++i) {
          const nsa::Status st = which == 0 ? nsa::compress_attention_cpu(p, nsa::CpuOptions{-1, th})
                                            : nsa::compress_attention_backward_cpu(g, nsa::CpuOptions{-1, th});
          if (!st.ok()) {
            std::fprintf(stderr, "error: %s\n", st.message().c_str());
            return 1;
          }
        }
        per.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / calls);
      }
      std::sort(per.begin(), per.end());
      med[which] = per[per.size() / 2];
    }
    std::printf("%-8d %10.1f %10.1f\n", th, med[0], med[1]);
  }
  return 0;
}
