// bench_forward: times nsa::compress_attention_cpu directly (no Python, no torch), on the cases of
// bench_forward.py (same shapes, docs/spec/compress_attention.md §9 masks), and prints the median time and useful GFLOP/s.
// See bench/README.md for the FLOP count (2 * N1 * (D + D2) * visible (query, compressed token) pairs).
//
//   bench_forward_cpp [--case NAME[,NAME...]|all] [--threads N] [--isa scalar|avx2|avx512|avx512bf16]
//                     [--repeat R] [--warmup W] [--peak-bf16 GF] [--peak-fp32 GF] [--list]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nsa/compress_attention.h"

namespace {

struct Case {
  const char* name;
  nsa::DType dtype;
  std::vector<int64_t> seq_lens;  // Sq_b
  std::vector<int64_t> cmp_lens;  // C_b (empty: floor((Sq_b - l) / d) + 1)
  int64_t N1, N2;
  bool masks;
  bool in_default;
};

constexpr int64_t kD = 192, kD2 = 128, kL = 32, kStride = 16, kLp = 64, kK = 16;

std::vector<Case> all_cases() {
  const std::vector<int64_t> varlen = {1024, 2048, 3072, 4096};
  return {
      {"bench-8k", nsa::DType::kBF16, {8192}, {}, 32, 2, true, true},
      {"bench-8k-g1", nsa::DType::kBF16, {8192}, {}, 8, 8, true, true},
      {"varlen-g16", nsa::DType::kBF16, varlen, {}, 32, 2, true, true},
      {"varlen-g1", nsa::DType::kBF16, varlen, {}, 8, 8, true, true},
      {"bench-8k-fp32", nsa::DType::kF32, {8192}, {}, 32, 2, true, true},
      {"seed-full", nsa::DType::kBF16, {65536}, {4096}, 64, 4, false, false},
  };
}

// float -> bf16 with round to nearest even (inputs are finite here).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A contiguous [rows, heads, dim] tensor of standard normal values in `dtype` (bf16 or fp32).
std::vector<uint8_t> random_tensor(nsa::DType dtype, int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<uint8_t> buf(static_cast<size_t>(n) * nsa::dtype_size(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const float x = dist(rng);
    if (dtype == nsa::DType::kBF16) {
      const uint16_t h = to_bf16(x);
      std::memcpy(buf.data() + 2 * i, &h, 2);
    } else {
      std::memcpy(buf.data() + 4 * i, &x, 4);
    }
  }
  return buf;
}

nsa::Tensor3 view3(const void* data, int64_t a, int64_t b, int64_t c) {
  nsa::Tensor3 t;
  t.data = data;
  t.size[0] = a, t.size[1] = b, t.size[2] = c;
  t.stride[0] = b * c, t.stride[1] = c, t.stride[2] = 1;
  return t;
}

struct Result {
  double median_s = 0, useful_gflop = 0;
  std::vector<double> runs;
  bool ok = false;
  std::string error;
};

Result run_case(const Case& cs, int threads, int isa, int warmup, int repeat) {
  Result r;
  std::vector<int64_t> cmp = cs.cmp_lens;
  if (cmp.empty())
    for (int64_t s : cs.seq_lens) cmp.push_back((s - kL) / kStride + 1);
  const int64_t M = kLp / kStride;
  std::vector<int64_t> sel;
  for (int64_t c : cmp) sel.push_back((c + M - 1) / M);
  std::vector<int64_t> pq, pc, ps;
  int64_t T = 0, T2 = 0, S = 0;
  for (size_t b = 0; b < cmp.size(); ++b) {
    T += cs.seq_lens[b], T2 += cmp[b], S += sel[b];
    pq.push_back(T), pc.push_back(T2), ps.push_back(S);
  }
  const int64_t max_sq = *std::max_element(cs.seq_lens.begin(), cs.seq_lens.end());
  const int64_t max_c = *std::max_element(cmp.begin(), cmp.end());
  const int64_t max_sel = *std::max_element(sel.begin(), sel.end());

  std::mt19937_64 rng(0);
  const auto q = random_tensor(cs.dtype, T * cs.N1 * kD, rng);
  const auto k = random_tensor(cs.dtype, T2 * cs.N2 * kD, rng);
  const auto v = random_tensor(cs.dtype, T2 * cs.N2 * kD2, rng);
  // docs/spec/compress_attention.md §9 masks: atten_mask[t][i] = i*d + l - 1 > t; topk_mask forces block 0 and {t/l' - 1, t/l'}.
  std::vector<uint8_t> am, tm;
  if (cs.masks) {
    am.resize(static_cast<size_t>(max_sq * max_c));
    tm.resize(static_cast<size_t>(max_sq * max_sel));
    for (int64_t t = 0; t < max_sq; ++t) {
      for (int64_t i = 0; i < max_c; ++i) am[t * max_c + i] = i * kStride + kL - 1 > t;
      const int64_t cur = t / kLp;
      for (int64_t j = 0; j < max_sel; ++j) tm[t * max_sel + j] = j < 1 || (j <= cur && j > cur - 2);
    }
  }
  // Useful FLOP: visible pairs per head (fully masked rows count 0), see bench/README.md.
  double pairs = 0;
  for (size_t b = 0; b < cmp.size(); ++b) {
    if (!cs.masks) {
      pairs += static_cast<double>(cs.seq_lens[b]) * cmp[b];
      continue;
    }
    for (int64_t t = 0; t < cs.seq_lens[b]; ++t)
      for (int64_t i = 0; i < cmp[b]; ++i) pairs += am[t * max_c + i] == 0;
  }
  r.useful_gflop = 2.0 * cs.N1 * (kD + kD2) * pairs * 1e-9;

  // 64-byte aligned like torch's CPU allocator (the backend streams large aligned outputs)
  std::vector<uint8_t> out_buf(static_cast<size_t>(T * cs.N1 * kD2) * nsa::dtype_size(cs.dtype) + 64);
  uint8_t* out = out_buf.data() + (64 - reinterpret_cast<uintptr_t>(out_buf.data()) % 64) % 64;
  std::vector<int32_t> topk(static_cast<size_t>(T * cs.N2 * kK));
  std::vector<float> smax(static_cast<size_t>(T * cs.N1 * 8)), ssum(smax.size());

  nsa::CompressAttentionParams p;
  p.dtype = cs.dtype;
  p.query = view3(q.data(), T, cs.N1, kD);
  p.key = view3(k.data(), T2, cs.N2, kD);
  p.value = view3(v.data(), T2, cs.N2, kD2);
  p.scale_value = 1.0 / std::sqrt(static_cast<double>(kD));
  p.head_num = cs.N1;
  p.compress_block_size = kL, p.compress_stride = kStride, p.select_block_size = kLp, p.select_block_count = kK;
  if (cs.masks) {
    p.atten_mask.data = am.data();
    p.atten_mask.size[0] = max_sq, p.atten_mask.size[1] = max_c;
    p.atten_mask.stride[0] = max_c, p.atten_mask.stride[1] = 1;
    p.topk_mask.data = tm.data();
    p.topk_mask.size[0] = max_sq, p.topk_mask.size[1] = max_sel;
    p.topk_mask.stride[0] = max_sel, p.topk_mask.stride[1] = 1;
  }
  p.actual_seq_qlen = {pq.data(), static_cast<int64_t>(pq.size())};
  p.actual_cmp_seq_kvlen = {pc.data(), static_cast<int64_t>(pc.size())};
  p.actual_sel_seq_kvlen = {ps.data(), static_cast<int64_t>(ps.size())};
  p.attention_out = out;
  p.topk_indices = topk.data();
  p.softmax_max = smax.data();
  p.softmax_sum = ssum.data();

  for (int i = 0; i < std::max(1, warmup); ++i) {
    const nsa::Status st = nsa::compress_attention_cpu(p, nsa::CpuOptions{isa, threads});
    if (!st.ok()) {
      r.error = st.message();
      return r;
    }
  }
  for (int i = 0; i < std::max(1, repeat); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    nsa::compress_attention_cpu(p, nsa::CpuOptions{isa, threads});
    r.runs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::vector<double> sorted = r.runs;
  std::sort(sorted.begin(), sorted.end());
  r.median_s = sorted[sorted.size() / 2];
  r.ok = true;
  return r;
}

void usage() {
  std::fprintf(stderr,
               "usage: bench_forward_cpp [--case NAME[,NAME...]|all] [--threads N] [--isa scalar|avx2|avx512|"
               "avx512bf16]\n"
               "                         [--repeat R] [--warmup W] [--peak-bf16 GF] [--peak-fp32 GF] [--list]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = "default";
  int threads = 0, isa = -1, repeat = 5, warmup = 1;
  double peak_bf16 = 0, peak_fp32 = 0;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--case") which = next();
    else if (a == "--threads") threads = std::atoi(next());
    else if (a == "--repeat") repeat = std::atoi(next());
    else if (a == "--warmup") warmup = std::atoi(next());
    else if (a == "--peak-bf16") peak_bf16 = std::atof(next());
    else if (a == "--peak-fp32") peak_fp32 = std::atof(next());
    else if (a == "--list") list = true;
    else if (a == "--isa") {
      const std::string s = next();
      if (s == "scalar") isa = static_cast<int>(nsa::CpuIsa::kScalar);
      else if (s == "avx2") isa = static_cast<int>(nsa::CpuIsa::kAvx2);
      else if (s == "avx512") isa = static_cast<int>(nsa::CpuIsa::kAvx512);
      else if (s == "avx512bf16") isa = static_cast<int>(nsa::CpuIsa::kAvx512Bf16);
      else {
        usage();
        return 2;
      }
    } else {
      usage();
      return a == "-h" || a == "--help" ? 0 : 2;
    }
  }
  const auto cases = all_cases();
  if (list) {
    for (const auto& c : cases) std::printf("%-14s %s\n", c.name, c.in_default ? "default" : "");
    return 0;
  }
  std::vector<const Case*> run;
  for (const auto& c : cases) {
    bool pick = which == "all" || (which == "default" && c.in_default);
    if (!pick) {
      const std::string list_s = "," + which + ",";
      pick = list_s.find("," + std::string(c.name) + ",") != std::string::npos;
    }
    if (pick) run.push_back(&c);
  }
  if (run.empty()) {
    std::fprintf(stderr, "no case matches '%s' (--list)\n", which.c_str());
    return 2;
  }
  const nsa::CpuIsa active = isa < 0 ? nsa::cpu_active_isa() : static_cast<nsa::CpuIsa>(isa);
  std::printf("nsa::compress_attention_cpu, ISA %s (detected %s), threads %s; median of %d run(s) after %d warm-up\n",
              nsa::cpu_isa_name(active), nsa::cpu_isa_name(nsa::cpu_detected_isa()),
              threads > 0 ? std::to_string(threads).c_str() : "default", repeat, warmup);
  std::printf("%-14s %-8s %12s %10s %9s %7s\n", "case", "dtype", "useful GFLOP", "ms", "GFLOP/s", "% peak");
  int rc = 0;
  for (const Case* c : run) {
    const Result r = run_case(*c, threads, isa, warmup, repeat);
    if (!r.ok) {
      std::printf("%-14s error: %s\n", c->name, r.error.c_str());
      rc = 1;
      continue;
    }
    const double gf = r.useful_gflop / r.median_s;
    const double peak = c->dtype == nsa::DType::kBF16 ? peak_bf16 : peak_fp32;
    char share[32] = "-";
    if (peak > 0) std::snprintf(share, sizeof(share), "%.1f", 100.0 * gf / peak);
    std::printf("%-14s %-8s %12.1f %10.1f %9.1f %7s\n", c->name, nsa::dtype_name(c->dtype), r.useful_gflop,
                r.median_s * 1e3, gf, share);
    std::fflush(stdout);
  }
  return rc;
}
