// decode_traffic: one NSA decode step (docs/spec/decode.md §1) over paged bf16 caches, the shapes of
// bench_decode.py (N1 = 32, N2 = 2, D = 192, Dv = 128, l = 32, d = 16, l' = 64, K = 16, w = 512, pages of 64 raw and
// 64 compressed tokens, pages shuffled), for measuring the step's memory traffic with a cache simulator
// (bench/decode_traffic.py runs it under valgrind's callgrind).
//
// A completing step (every sequence completes a compression window, so compress_infer writes one compressed token of
// K and of V per sequence) runs the four operators in decode order:
//   compress_infer (K, V) -> compress_attention_infer (top-K blocks) -> select_attention_infer -> paged_window_attention
// Under callgrind (--instr-atstart=no) the program switches the simulation on, reads a buffer four times the
// simulated last-level cache (so that no line of the step's data is in it: a cold step, as in a model where the other
// layers run between two steps of this one), zeroes the counters and dumps them after each operator, so each dump
// holds one operator's misses and the operators share the cache as in a real step. Without valgrind the client
// requests do nothing and the program prints the wall time of each operator (median of --repeat steps).
//
//   decode_traffic --context S --batch B [--threads N] [--flush-mb 128] [--repeat 5] [--seed 0]
//
// Prints one line per operator: "part <name> <bytes of the tokens it must read>", and "step tokens <bytes>" (the
// bytes of the selected, window and compressed tokens plus the 2 l raw tokens of the compression, as bench_decode.py).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define NSA_HAVE_CALLGRIND 1
#endif
#endif
#ifndef NSA_HAVE_CALLGRIND
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#define CALLGRIND_ZERO_STATS
#define CALLGRIND_DUMP_STATS_AT(name)
#endif

#include "nsa/compress_attention_infer.h"
#include "nsa/compress_infer.h"
#include "nsa/paged_window_attention.h"
#include "nsa/select_attention_infer.h"

namespace {

constexpr int64_t N1 = 32, N2 = 2, D = 192, Dv = 128, l = 32, d = 16, lp = 64, K = 16, W = 512, P = 64, Pc = 64;

// xorshift64*: the fill of every input (values in [-2, 2) as bf16)
struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  uint16_t bf16(float scale) {
    const float x = (static_cast<float>(next() >> 40) / 16777216.0f * 4.0f - 2.0f) * scale;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return static_cast<uint16_t>(u >> 16);
  }
};

void fill(std::vector<uint16_t>& v, Rng& r, float scale) {
  for (uint16_t& x : v) x = r.bf16(scale);
}

std::vector<int32_t> shuffled_pages(int64_t n, Rng& r) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[static_cast<size_t>(i)], p[r.next() % static_cast<uint64_t>(i + 1)]);
  return p;
}

void check(const nsa::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "decode_traffic: %s failed: %s\n", what, s.message().c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t S = 131072, B = 1, flush_mb = 128;
  int threads = 2, repeat = 5;
  uint64_t seed = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long long v = std::atoll(argv[i + 1]);
    if (a == "--context") S = v;
    else if (a == "--batch") B = v;
    else if (a == "--threads") threads = static_cast<int>(v);
    else if (a == "--flush-mb") flush_mb = v;
    else if (a == "--repeat") repeat = static_cast<int>(v);
    else if (a == "--seed") seed = static_cast<uint64_t>(v);
    else {
      std::fprintf(stderr, "decode_traffic: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (S < std::max(l, lp) || (S - l) % d != 0 || B < 1) {
    std::fprintf(stderr, "decode_traffic: --context must be >= %lld with (S - l) %% d == 0, --batch >= 1\n",
                 static_cast<long long>(std::max(l, lp)));
    return 2;
  }
  const int64_t C = (S - l) / d + 1;          // compressed tokens per sequence, the completed one included
  const int64_t pages = (S + P - 1) / P;      // raw pages per sequence
  const int64_t cpages = (C + Pc - 1) / Pc;   // compressed pages per sequence
  Rng rng{0x9e3779b97f4a7c15ull ^ (seed * 0x2545f4914f6cdd1dull + 1)};

  std::vector<uint16_t> k_cache(static_cast<size_t>(B * pages * P * N2 * D)), v_cache(static_cast<size_t>(B * pages * P * N2 * Dv));
  std::vector<uint16_t> cmp_k(static_cast<size_t>(B * cpages * Pc * N2 * D)), cmp_v(static_cast<size_t>(B * cpages * Pc * N2 * Dv));
  std::vector<uint16_t> q(static_cast<size_t>(B * N1 * D)), w_k(static_cast<size_t>(l * N2)), w_v(static_cast<size_t>(l * N2));
  fill(k_cache, rng, 1.0f), fill(v_cache, rng, 1.0f), fill(cmp_k, rng, 1.0f), fill(cmp_v, rng, 1.0f);
  fill(q, rng, 1.0f), fill(w_k, rng, 1.0f / l), fill(w_v, rng, 1.0f / l);
  const std::vector<int32_t> bt = shuffled_pages(B * pages, rng), cbt = shuffled_pages(B * cpages, rng);
  std::vector<int32_t> slots(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)  // the slot of compressed token C - 1, which this step completes
    slots[static_cast<size_t>(b)] = cbt[static_cast<size_t>(b * cpages + (C - 1) / Pc)] * static_cast<int32_t>(Pc) +
                                    static_cast<int32_t>((C - 1) % Pc);
  const std::vector<int64_t> seq(static_cast<size_t>(B), S), cmp_len(static_cast<size_t>(B), C), ones(static_cast<size_t>(B), 1);
  std::vector<uint16_t> out_cmp(static_cast<size_t>(B * N1 * Dv)), out_sel(out_cmp.size()), out_win(out_cmp.size());
  std::vector<int32_t> topk(static_cast<size_t>(B * N2 * K));
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  nsa::CpuOptions opt;
  opt.num_threads = threads;
  const nsa::IntList seq_list{seq.data(), B}, cmp_list{cmp_len.data(), B}, ones_list{ones.data(), B};

  // compress_infer of one cache (K: width D, V: width Dv)
  const auto compress = [&](const std::vector<uint16_t>& raw, const std::vector<uint16_t>& w, std::vector<uint16_t>& cache,
                            int64_t width) {
    nsa::CompressInferParams p;
    p.dtype = nsa::DType::kBF16;
    p.input = raw.data();
    const int64_t in_size[4] = {B * pages, P, N2, width}, in_stride[4] = {P * N2 * width, N2 * width, width, 1};
    std::copy(in_size, in_size + 4, p.input_size), std::copy(in_stride, in_stride + 4, p.input_stride);
    p.weight = {w.data(), {l, N2}, {N2, 1}};
    p.cache = cache.data();
    const int64_t c_size[3] = {B * cpages * Pc, N2, width}, c_stride[3] = {N2 * width, width, 1};
    std::copy(c_size, c_size + 3, p.cache_size), std::copy(c_stride, c_stride + 3, p.cache_stride);
    p.slot_mapping = slots.data(), p.slot_mapping_size = B;
    p.block_table = bt.data(), p.block_table_rows = B, p.block_table_cols = pages, p.block_table_row_stride = pages;
    p.compress_block_size = l, p.compress_stride = d, p.page_block_size = P;
    p.actual_seq_len = seq_list;
    check(nsa::compress_infer_cpu(p, opt), "compress_infer");
  };
  const auto compress_kv = [&] {
    compress(k_cache, w_k, cmp_k, D);
    compress(v_cache, w_v, cmp_v, Dv);
  };
  const auto cmp_attention = [&] {
    nsa::CompressAttentionInferParams p;
    p.dtype = nsa::DType::kBF16;
    p.layout = nsa::DecodeLayout::kTND;
    p.query = q.data();
    const int64_t q_size[4] = {1, B, N1, D}, q_stride[4] = {B * N1 * D, N1 * D, D, 1};
    std::copy(q_size, q_size + 4, p.query_size), std::copy(q_stride, q_stride + 4, p.query_stride);
    p.key = {cmp_k.data(), {B * cpages, Pc, N2 * D}, {Pc * N2 * D, N2 * D, 1}};
    p.value = {cmp_v.data(), {B * cpages, Pc, N2 * Dv}, {Pc * N2 * Dv, N2 * Dv, 1}};
    p.scale_value = scale, p.head_num = N1, p.key_value_head_num = N2;
    p.select_block_size = lp, p.select_block_count = K, p.page_block_size = Pc;
    p.compress_block_size = l, p.compress_stride = d;
    p.block_table = cbt.data(), p.block_table_rows = B, p.block_table_cols = cpages, p.block_table_row_stride = cpages;
    p.actual_seq_qlen = ones_list, p.actual_cmp_seq_kvlen = cmp_list;
    p.attention_out = out_cmp.data(), p.topk_indices = topk.data();
    check(nsa::compress_attention_infer_cpu(p, opt), "compress_attention_infer");
  };
  const nsa::PagedCacheView kv_k{k_cache.data(), {B * pages, P, N2, D}, {P * N2 * D, N2 * D, D, 1}};
  const nsa::PagedCacheView kv_v{v_cache.data(), {B * pages, P, N2, Dv}, {P * N2 * Dv, N2 * Dv, Dv, 1}};
  const nsa::Tensor2 table{bt.data(), {B, pages}, {pages, 1}};
  const nsa::Tensor3 q3{q.data(), {B, N1, D}, {N1 * D, D, 1}};
  const auto sel_attention = [&] {
    nsa::SelectAttentionInferParams p;
    p.dtype = nsa::DType::kBF16;
    p.query = q3;
    p.key = kv_k, p.value = kv_v;
    p.topk_indices = {topk.data(), {B, N2, K}, {N2 * K, K, 1}};
    p.block_table = table;
    p.scale_value = scale, p.head_num = N1, p.key_value_head_num = N2;
    p.select_block_size = lp, p.select_block_count = K, p.page_block_size = P;
    p.actual_seq_qlen = ones_list, p.actual_seq_kvlen = seq_list;
    p.attention_out = out_sel.data();
    check(nsa::select_attention_infer_cpu(p, opt), "select_attention_infer");
  };
  const auto win_attention = [&] {
    nsa::PagedWindowAttentionParams p;
    p.dtype = nsa::DType::kBF16;
    p.query = q3;
    p.key_cache = kv_k, p.value_cache = kv_v;
    p.block_table = table;
    p.window = W, p.scale = scale;
    p.seq_lens = seq_list, p.query_lens = ones_list;
    p.attention_out = out_win.data();
    check(nsa::paged_window_attention_cpu(p, opt), "paged_window_attention");
  };
  struct Part {
    const char* name;
    std::function<void()> run;
    int64_t tokens;  // tokens per sequence it must read (raw or compressed, N2 (D + Dv) bf16 values each)
  };
  const int64_t token_bytes = N2 * (D + Dv) * 2;
  const Part parts[] = {{"compress_infer", compress_kv, l},  // l raw keys and l raw values: l tokens' bytes
                        {"compress_attention_infer", cmp_attention, C},
                        {"select_attention_infer", sel_attention, std::min(K * lp, S)},
                        {"paged_window_attention", win_attention, std::min(W, S)}};

  for (const Part& part : parts) part.run();  // warm-up (page faults, pools, ISA choice): not simulated
  int64_t step_tokens = 0;
  for (const Part& part : parts) {
    std::printf("part %s %lld\n", part.name, static_cast<long long>(B * part.tokens * token_bytes));
    step_tokens += part.tokens;
  }
  std::printf("step tokens %lld\n", static_cast<long long>(B * step_tokens * token_bytes));

  // the simulated step: a cold cache, one dump per operator
  std::vector<uint64_t> flush(static_cast<size_t>(flush_mb) << 17, 1);
  CALLGRIND_START_INSTRUMENTATION;
  volatile uint64_t sink = 0;
  for (int pass = 0; pass < 2; ++pass)
    for (size_t i = 0; i < flush.size(); i += 8) sink = sink + flush[i];
  for (const Part& part : parts) {
    CALLGRIND_ZERO_STATS;
    part.run();
    CALLGRIND_DUMP_STATS_AT(part.name);
  }
  CALLGRIND_STOP_INSTRUMENTATION;

  // wall times (meaningful without valgrind)
  for (const Part& part : parts) {
    std::vector<double> ts;
    for (int r = 0; r < repeat; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      part.run();
      ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    std::printf("time %s %.4f ms\n", part.name, ts[ts.size() / 2]);
  }
  return 0;
}
