// libFuzzer target: random bytes -> a CompressAttentionParams description -> validate_compress_attention,
// then (when valid and small) compress_attention_cpu, compress_attention_reference and the CPU backward.
// Success or a clean Status error, never a crash, an out-of-bounds access (ASan) or undefined behaviour
// (UBSan). Built by scripts/fuzz.sh with clang++ -fsanitize=fuzzer,address,undefined (build-fuzz).
//
// The API takes raw pointers, so the harness itself must never create an out-of-bounds access: every
// buffer is REAL and sized exactly from the decoded description (sizes, strides incl. 0 and negative),
// capped at kCapBytes. A description that needs more (huge sizes or strides) gets a 1-element placeholder
// and is only validated, never run; the library must then not read it (validation reads no tensor data).
// Lists are real arrays of exactly `size` elements (or null / a negative size, which must be rejected).
//
// Checks per input:
//   1. validate_compress_attention's verdict equals an independent reading of docs/spec/compress_attention.md §6 (spec_valid below);
//   2. invalid: compress_attention_cpu and compress_attention_reference return an error too, with a
//      message, and write nothing (outputs are sentinel-filled and compared afterwards);
//   3. valid and small: both entry points succeed; topk_indices are in [0, Sel_b) without duplicates for
//      every row whatever the input values (NaN, inf, subnormal sprinkled in); the CPU backward succeeds.
// Any violation calls __builtin_trap(), which libFuzzer records as a crash with the input.
//
// Standalone replay (no libFuzzer, e.g. with gcc): compile with -DNSA_FUZZ_STANDALONE and pass files.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/numeric.h"
#include "nsa/compress_attention.h"

namespace {

using nsa::CompressAttentionParams;
using nsa::CompressAttentionShape;
using nsa::DType;
using nsa::Status;

constexpr int64_t kCapBytes = int64_t(4) << 20;  // per buffer
constexpr int64_t kMaxWork = 400000;             // T * N1 * maxC * (D + D2): multiply-adds of one forward

[[noreturn]] void fail(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "fuzz_validate: %s %s\n", what, detail.c_str());
  __builtin_trap();
}

// Reads the fuzz input as a stream of decisions (zeros once exhausted).
class Reader {
 public:
  Reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  uint8_t byte() { return i_ < n_ ? d_[i_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) v = (v << 8) | byte();
    return v;
  }
  uint64_t u64() { return (static_cast<uint64_t>(u32()) << 32) | u32(); }
  int64_t range(int64_t lo, int64_t hi) {  // inclusive
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(u32() % span);
  }
  bool coin(int percent) { return byte() % 100 < percent; }
  // A size-like value: mostly from the consistent description, sometimes an edge value.
  int64_t edge() {
    static const int64_t kEdges[] = {0,
                                     -1,
                                     1,
                                     2,
                                     15,
                                     16,
                                     17,
                                     31,
                                     32,
                                     33,
                                     64,
                                     127,
                                     128,
                                     129,
                                     144,
                                     int64_t(1) << 31,
                                     (int64_t(1) << 31) - 1,
                                     int64_t(1) << 32,
                                     int64_t(1) << 40,
                                     int64_t(1) << 62,
                                     INT64_MAX,
                                     INT64_MAX - 1,
                                     INT64_MIN,
                                     INT64_MIN + 1,
                                     -16,
                                     -(int64_t(1) << 32)};
    const uint8_t b = byte();
    if (b < 200) return kEdges[b % (sizeof(kEdges) / sizeof(kEdges[0]))];
    return static_cast<int64_t>(u64());
  }

 private:
  const uint8_t* d_;
  size_t n_, i_ = 0;
};

int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? (b > 0 ? INT64_MAX : INT64_MIN) : r;
}
bool mul_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }
// a * b * c without overflow and <= limit
bool product_le(int64_t a, int64_t b, int64_t c, int64_t limit, int64_t* out) {
  int64_t ab;
  return mul_ok(a, b, &ab) && mul_ok(ab, c, out) && *out <= limit;
}

// Element-offset range [lo, hi] of a strided box; false when it overflows int64 or a size is < 1.
bool offset_range(const int64_t* size, const int64_t* stride, int n, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = 0;
  for (int i = 0; i < n; ++i) {
    if (size[i] < 1) return false;
    int64_t e;
    if (!mul_ok(size[i] - 1, stride[i], &e)) return false;
    if (!add_ok(e < 0 ? *lo : *hi, e, e < 0 ? lo : hi)) return false;
  }
  return true;
}

// A real buffer for a strided view, or a 1-element placeholder when the view is empty, inconsistent or
// larger than the cap (then `real` is false and the description may only be validated).
struct Buffer {
  std::vector<unsigned char> bytes;
  const unsigned char* origin = nullptr;  // element offset 0 (may be inside the buffer: negative strides)
  bool real = false;
};

void make_buffer(const int64_t* size, const int64_t* stride, int n, size_t es, std::mt19937_64& rng, int special,
                 DType dt, bool is_mask, Buffer* out) {
  int64_t lo, hi, span, count, bytes;
  if (offset_range(size, stride, n, &lo, &hi) && !__builtin_sub_overflow(hi, lo, &span) && add_ok(span, 1, &count) && mul_ok(count, static_cast<int64_t>(es), &bytes) &&
      bytes <= kCapBytes) {
    out->bytes.resize(static_cast<size_t>(bytes));
    out->origin = out->bytes.data() + static_cast<size_t>(-lo) * es;
    out->real = true;
    if (is_mask) {
      const int p = static_cast<int>(rng() % 101);
      for (auto& b : out->bytes) b = static_cast<int>(rng() % 100) < p ? static_cast<unsigned char>(1 + rng() % 255) : 0;
    } else {
      std::uniform_real_distribution<double> u(-2, 2);
      const double specials[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                                 -std::numeric_limits<double>::infinity(), 1e-40, -3e38, 3e38, 0.0};
      for (int64_t i = 0; i < count; ++i) {
        double x = u(rng);
        if (special > 0 && static_cast<int>(rng() % 1000) < special) x = specials[rng() % 7];
        nsa::detail::store_f64(out->bytes.data(), i, x, dt);
      }
    }
  } else {
    out->bytes.assign(16, 0);
    out->origin = out->bytes.data();
    out->real = false;
  }
}

struct Desc {
  int dtype = 0;
  int64_t q[3], k[3], v[3];     // sizes
  int64_t qs[3], ks[3], vs[3];  // strides
  bool q_null = false, k_null = false, v_null = false;
  double scale = 1.0;
  int64_t head_num = 0, l = 32, d = 16, lp = 64, K = 1;
  bool has_atten = false, has_topk = false, atten_null_data = false;
  int64_t am[2] = {0, 0}, ams[2] = {0, 0}, tm[2] = {0, 0}, tms[2] = {0, 0};
  std::vector<int64_t> qlen, clen, sellen;
  bool qlen_given = true, clen_given = true, sel_given = false;
  int64_t qlen_size_override = 0, clen_size_override = 0;  // a negative size claim (no elements read)
  bool null_out[4] = {false, false, false, false};
  int cpu_isa = -1, threads = 0, special = 0;
};

// Negative strides (valid memory: the view starts inside its buffer) are part of the API's "any strides"
// but torch never makes them; NSA_FUZZ_NEGATIVE_STRIDES=0 leaves them out (see scripts/fuzz.sh).
bool negative_strides() {
  static const bool on = [] {
    const char* e = std::getenv("NSA_FUZZ_NEGATIVE_STRIDES");
    return !(e && e[0] == '0');
  }();
  return on;
}

// Contiguous, permuted, padded, zero or negative strides for a box of `size`.
void random_strides(Reader& r, const int64_t* size, int n, int64_t* stride) {
  const int mode = r.byte() % 8;
  int order[3] = {0, 1, 2};
  if (mode == 1 || mode == 2) std::shuffle(order, order + n, std::minstd_rand(r.byte()));
  int64_t s = mode == 2 ? 3 : 1;
  for (int idx = n - 1; idx >= 0; --idx) {
    const int dim = order[idx];
    stride[dim] = s;
    const int64_t ext = std::max<int64_t>(1, std::min<int64_t>(size[dim], 1 << 20)) + (mode == 2 ? r.range(0, 3) : 0);
    s *= ext;
  }
  if (mode == 3) stride[r.byte() % n] = 0;                                   // broadcast (expand)
  if (mode == 4) stride[r.byte() % n] *= -1;                                 // negative (valid memory)
  if (mode == 5) stride[r.byte() % n] = r.edge();                            // anything
  if (mode == 6) for (int i = 0; i < n; ++i) stride[i] = r.range(-70, 70);  // small, overlapping
  if (!negative_strides())
    for (int i = 0; i < n; ++i)
      if (stride[i] < 0) stride[i] = -(stride[i] + 1);  // INT64_MIN -> INT64_MAX
}

// The input is [mutation script][description]: the first byte gives the number of mutations (0-4), each
// reading up to 12 bytes of the script, so that even short inputs mutate (libFuzzer starts short).
Desc decode(Reader& r, Reader& mr) {
  Desc d;
  // ---- a consistent description first (valid with high probability) ...
  d.dtype = static_cast<int>(r.byte() % 3);  // bf16, fp16, fp32
  struct Blk {
    int64_t l, d, lp;
  };
  static const Blk kBlk[] = {{32, 16, 64}, {16, 16, 16}, {64, 16, 64}, {32, 32, 64}, {32, 16, 128}, {48, 16, 96},
                             {64, 64, 128}, {128, 64, 128}, {16, 16, 128}, {48, 48, 96}};
  const Blk bk = kBlk[r.byte() % 10];
  d.l = bk.l;
  d.d = bk.d;
  d.lp = bk.lp;
  const int64_t M = bk.lp / bk.d;
  const int64_t B = r.range(1, 4), N2 = r.range(1, 3), G = r.range(1, 4), D = r.range(1, 40), D2 = r.range(1, D);
  int64_t T = 0, T2 = 0, min_sel = INT64_MAX;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t sq = r.coin(20) ? 0 : r.range(1, 12), c = r.range(1, 30);
    T += sq;
    T2 += c;
    d.qlen.push_back(T);
    d.clen.push_back(T2);
    min_sel = std::min(min_sel, (c + M - 1) / M);
    d.sellen.push_back((d.sellen.empty() ? 0 : d.sellen.back()) + (c + M - 1) / M);
  }
  if (T == 0) {  // at least one query row (in the first batch)
    for (auto& x : d.qlen) x += 1;
    T = d.qlen.back();
  }
  T2 += r.range(0, 2);  // ignored extra key rows
  const int64_t N1 = N2 * G;
  d.q[0] = T, d.q[1] = N1, d.q[2] = D;
  d.k[0] = T2, d.k[1] = N2, d.k[2] = D;
  d.v[0] = T2, d.v[1] = N2, d.v[2] = D2;
  d.head_num = N1;
  d.K = r.range(1, std::min<int64_t>(32, min_sel));
  d.scale = 1.0 / std::sqrt(static_cast<double>(D));
  d.sel_given = r.coin(40);
  int64_t max_sq = 0, max_c = 0, prev_q = 0, prev_c = 0;
  for (size_t b = 0; b < d.qlen.size(); ++b) {
    max_sq = std::max(max_sq, d.qlen[b] - prev_q);
    max_c = std::max(max_c, d.clen[b] - prev_c);
    prev_q = d.qlen[b];
    prev_c = d.clen[b];
  }
  d.has_atten = r.coin(60);
  d.has_topk = r.coin(40);
  d.am[0] = max_sq, d.am[1] = max_c;
  d.tm[0] = max_sq, d.tm[1] = (max_c + M - 1) / M;
  random_strides(r, d.q, 3, d.qs);
  random_strides(r, d.k, 3, d.ks);
  random_strides(r, d.v, 3, d.vs);
  random_strides(r, d.am, 2, d.ams);
  random_strides(r, d.tm, 2, d.tms);
  d.cpu_isa = r.coin(50) ? -1 : static_cast<int>(r.range(-3, 5));
  d.threads = static_cast<int>(r.coin(70) ? r.range(0, 5) : r.range(-2, 64));
  d.special = r.coin(30) ? static_cast<int>(r.range(1, 200)) : 0;

  // ---- ... then 0-4 mutations, each moving one field to an edge value
  const int n_mut = mr.byte() % 5;
  for (int m = 0; m < n_mut; ++m) {
    Reader& r = mr;  // decisions of the mutations come from the script
    switch (r.byte() % 31) {
      case 0: d.dtype = static_cast<int>(r.range(-2, 6)); break;
      case 1: d.q[r.byte() % 3] = r.edge(); break;
      case 2: d.k[r.byte() % 3] = r.edge(); break;
      case 3: d.v[r.byte() % 3] = r.edge(); break;
      case 4: d.qs[r.byte() % 3] = r.edge(); break;
      case 5: d.ks[r.byte() % 3] = r.edge(); break;
      case 6: d.vs[r.byte() % 3] = r.edge(); break;
      case 7: {
        static const double kScales[] = {NAN, INFINITY, -INFINITY, 1e39, -1e39, 3.4e38, 1e-45, 0.0, -0.0, -2.0, 1e300};
        d.scale = kScales[r.byte() % 11];
        break;
      }
      case 8: d.head_num = r.edge(); break;
      case 9: d.l = r.edge(); break;
      case 10: d.d = r.edge(); break;
      case 11: d.lp = r.edge(); break;
      case 12: d.K = r.edge(); break;
      case 13: d.am[r.byte() % 2] = r.edge(); break;
      case 14: d.tm[r.byte() % 2] = r.edge(); break;
      case 15: d.ams[r.byte() % 2] = r.edge(); break;
      case 16:
        if (!d.qlen.empty()) d.qlen[r.byte() % d.qlen.size()] = r.edge();
        break;
      case 17:
        if (!d.clen.empty()) d.clen[r.byte() % d.clen.size()] = r.edge();
        break;
      case 18:  // a selected length nudged off its value (saturating: it may already be an edge value)
        if (!d.sellen.empty()) {
          int64_t& s = d.sellen[r.byte() % d.sellen.size()];
          s = sat_add(s, r.range(-2, 2));
        }
        break;
      case 19:
        if (r.coin(50)) {
          if (!d.qlen.empty()) d.qlen.pop_back();
        } else {
          d.clen.push_back(r.edge());
        }
        break;
      case 20: (r.coin(50) ? d.qlen_given : d.clen_given) = false; break;
      case 21: (r.coin(50) ? d.qlen_size_override : d.clen_size_override) = r.coin(50) ? -1 : INT64_MIN; break;
      case 22: d.null_out[r.byte() % 4] = true; break;
      case 23: {
        const int w = r.byte() % 3;
        (w == 0 ? d.q_null : w == 1 ? d.k_null : d.v_null) = true;
        break;
      }
      case 24: d.has_atten = true, d.atten_null_data = r.coin(50); break;
      case 25: d.sel_given = true, d.sellen.resize(static_cast<size_t>(r.range(0, 6)), r.edge()); break;
      case 26: d.qlen.clear(), d.clen.clear(); break;
      case 27: {  // a key/value row count at the lengths' edges
        const int64_t t2 = d.clen.empty() ? 1 : sat_add(d.clen.back(), r.range(-1, 1));
        d.k[0] = d.v[0] = t2;
        break;
      }
      case 28: d.q[0] = d.qlen.empty() ? 0 : sat_add(d.qlen.back(), r.range(-1, 1)); break;
      case 29: {  // a huge last batch over key/value rows broadcast with stride 0 (valid memory)
        if (d.clen.empty()) break;
        const int64_t h = r.edge();
        d.clen.back() = h;
        d.k[0] = d.v[0] = sat_add(h, r.range(0, 1));
        d.ks[0] = d.vs[0] = 0;
        if (d.sel_given) d.sel_given = r.coin(50);
        break;
      }
      default: d.tms[r.byte() % 2] = r.edge(); break;
    }
  }
  if (!negative_strides())
    for (int64_t* st : {d.qs, d.ks, d.vs})
      for (int i = 0; i < 3; ++i)
        if (st[i] < 0) st[i] = -(st[i] + 1);
  if (!negative_strides())
    for (int64_t* st : {d.ams, d.tms})
      for (int i = 0; i < 2; ++i)
        if (st[i] < 0) st[i] = -(st[i] + 1);
  return d;
}

// docs/spec/compress_attention.md §6 read independently of src/ops/compress_attention/validate.cpp (plus: pointers non-null; CpuOptions::isa is checked by the CPU entry point, not by validation).
bool spec_valid(const Desc& d) {
  if (d.dtype < 0 || d.dtype > 3) return false;
  if (d.q_null || d.k_null || d.v_null) return false;
  for (int i = 0; i < 3; ++i)
    if (d.q[i] <= 0 || d.k[i] <= 0 || d.v[i] <= 0) return false;
  const int64_t T = d.q[0], N1 = d.q[1], D = d.q[2], T2 = d.k[0], N2 = d.k[1], D2 = d.v[2];
  if (d.k[2] != D || d.v[0] != T2 || d.v[1] != N2 || D2 > D) return false;
  if (!std::isfinite(d.scale) || !std::isfinite(static_cast<float>(d.scale))) return false;
  if (d.head_num != N1 || N1 % N2 != 0) return false;
  auto blk = [](int64_t v, int64_t hi) { return v % 16 == 0 && v >= 16 && v <= hi; };
  if (!blk(d.l, 128) || !blk(d.d, 64) || !blk(d.lp, 128) || d.d > d.l || d.l > d.lp || d.lp % d.d != 0) return false;
  if (d.K < 1 || d.K > 32) return false;
  const int64_t M = d.lp / d.d;
  if (!d.qlen_given || !d.clen_given || d.qlen_size_override < 0 || d.clen_size_override < 0) return false;
  if (d.qlen.empty() || d.qlen.size() != d.clen.size()) return false;
  const size_t B = d.qlen.size();
  if (d.qlen[0] < 0 || d.clen[0] < 0) return false;
  for (size_t b = 1; b < B; ++b)
    if (d.qlen[b] < d.qlen[b - 1] || d.clen[b] < d.clen[b - 1]) return false;
  if (d.qlen[B - 1] != T || d.clen[B - 1] > T2) return false;
  int64_t max_sq = 0, max_c = 0, min_sel = INT64_MAX, prev_q = 0, prev_c = 0, acc = 0;
  std::vector<int64_t> sel_prefix;
  for (size_t b = 0; b < B; ++b) {
    const int64_t sq = d.qlen[b] - prev_q, c = d.clen[b] - prev_c;  // >= 0: non-decreasing from >= 0
    if (c < 1) return false;
    const int64_t sel = c / M + (c % M != 0);
    max_sq = std::max(max_sq, sq);
    max_c = std::max(max_c, c);
    min_sel = std::min(min_sel, sel);
    acc += sel;  // sum of sel <= sum of c <= T2: no overflow
    sel_prefix.push_back(acc);
    prev_q = d.qlen[b];
    prev_c = d.clen[b];
  }
  if (d.K > min_sel) return false;
  if (d.sel_given && d.sellen != sel_prefix) return false;
  const int64_t max_sel = max_c / M + (max_c % M != 0);
  if (d.has_atten && !d.atten_null_data && (d.am[0] != max_sq || d.am[1] != max_c)) return false;
  if (d.has_topk && (d.tm[0] != max_sq || d.tm[1] != max_sel)) return false;
  for (bool n : d.null_out)
    if (n) return false;
  return true;
}

// What the inputs did, printed at exit (scripts/fuzz.sh reports it).
struct Stats {
  uint64_t rejected = 0, valid_only = 0, ran = 0;
  ~Stats() {
    std::fprintf(stderr, "fuzz_validate stats: %llu rejected with a named error, %llu valid (validated only: too big), "
                 "%llu valid and run (reference + cpu + backward)\n",
                 static_cast<unsigned long long>(rejected), static_cast<unsigned long long>(valid_only),
                 static_cast<unsigned long long>(ran));
  }
} g_stats;

void run_one(const uint8_t* data, size_t size) {
  const size_t script = std::min<size_t>(size, size ? 1 + (data[0] % 5) * 12 : 0);
  Reader mr(data, script), r(data + script, size - script);
  const Desc d = decode(r, mr);
  std::mt19937_64 rng(r.u64());
  const DType dt = (d.dtype >= 0 && d.dtype <= 3) ? static_cast<DType>(d.dtype) : DType::kF32;
  const size_t es = nsa::dtype_size(dt);

  Buffer qb, kb, vb, amb, tmb;
  make_buffer(d.q, d.qs, 3, es, rng, d.special, dt, false, &qb);
  make_buffer(d.k, d.ks, 3, es, rng, d.special, dt, false, &kb);
  make_buffer(d.v, d.vs, 3, es, rng, d.special, dt, false, &vb);
  if (d.has_atten) make_buffer(d.am, d.ams, 2, 1, rng, 0, dt, true, &amb);
  if (d.has_topk) make_buffer(d.tm, d.tms, 2, 1, rng, 0, dt, true, &tmb);

  CompressAttentionParams p;
  std::memcpy(&p.dtype, &d.dtype, sizeof(int));  // any int: the enum has a fixed underlying type
  auto view = [](nsa::Tensor3& t, const Buffer& b, const int64_t* sz, const int64_t* st, bool null) {
    t.data = null ? nullptr : b.origin;
    for (int i = 0; i < 3; ++i) t.size[i] = sz[i], t.stride[i] = st[i];
  };
  view(p.query, qb, d.q, d.qs, d.q_null);
  view(p.key, kb, d.k, d.ks, d.k_null);
  view(p.value, vb, d.v, d.vs, d.v_null);
  p.scale_value = d.scale;
  p.head_num = d.head_num;
  p.compress_block_size = d.l;
  p.compress_stride = d.d;
  p.select_block_size = d.lp;
  p.select_block_count = d.K;
  if (d.has_atten) {
    p.atten_mask.data = d.atten_null_data ? nullptr : amb.origin;
    for (int i = 0; i < 2; ++i) p.atten_mask.size[i] = d.am[i], p.atten_mask.stride[i] = d.ams[i];
  }
  if (d.has_topk) {
    p.topk_mask.data = tmb.origin;
    for (int i = 0; i < 2; ++i) p.topk_mask.size[i] = d.tm[i], p.topk_mask.stride[i] = d.tms[i];
  }
  // lists: exactly `size` real elements; a negative size claim keeps a real (empty) array behind it
  static const int64_t kNone[1] = {0};
  p.actual_seq_qlen = {d.qlen_given ? (d.qlen.empty() ? kNone : d.qlen.data()) : nullptr,
                       d.qlen_size_override < 0 ? d.qlen_size_override : static_cast<int64_t>(d.qlen.size())};
  p.actual_cmp_seq_kvlen = {d.clen_given ? (d.clen.empty() ? kNone : d.clen.data()) : nullptr,
                            d.clen_size_override < 0 ? d.clen_size_override : static_cast<int64_t>(d.clen.size())};
  if (d.sel_given) p.actual_sel_seq_kvlen = {d.sellen.empty() ? kNone : d.sellen.data(), static_cast<int64_t>(d.sellen.size())};

  // sentinel outputs for the validation-only calls (nothing may be written when validation fails)
  unsigned char sentinel[4][64];
  std::memset(sentinel, 0xA5, sizeof(sentinel));
  p.attention_out = d.null_out[0] ? nullptr : sentinel[0];
  p.topk_indices = d.null_out[1] ? nullptr : reinterpret_cast<int32_t*>(sentinel[1]);
  p.softmax_max = d.null_out[2] ? nullptr : reinterpret_cast<float*>(sentinel[2]);
  p.softmax_sum = d.null_out[3] ? nullptr : reinterpret_cast<float*>(sentinel[3]);

  CompressAttentionShape sh;
  const Status st = nsa::validate_compress_attention(p, &sh);
  const bool expect = spec_valid(d);
  if (st.ok() != expect)
    fail(st.ok() ? "validate accepted a description docs/spec/compress_attention.md §6 rejects" : "validate rejected a valid description",
         st.message());
  if (!st.ok()) {
    ++g_stats.rejected;
    if (st.message().empty()) fail("an error Status without a message");
    for (const Status& s2 : {nsa::compress_attention_cpu(p, nsa::CpuOptions{d.cpu_isa, d.threads}),
                             nsa::compress_attention_reference(p)})
      if (s2.ok() || s2.message().empty()) fail("an entry point accepted what validation rejects");
    for (auto& s : sentinel)
      for (unsigned char c : s)
        if (c != 0xA5) fail("an output was written although validation failed");
    return;
  }
  // valid: run when every input is real and the outputs and the work are small
  ++g_stats.valid_only;
  if (!qb.real || !kb.real || !vb.real || (d.has_atten && !amb.real) || (d.has_topk && !tmb.real)) return;
  int64_t o1, o2, tc, work, gk_bytes;
  if (!product_le(sh.T, sh.N1, sh.D2 * static_cast<int64_t>(es), kCapBytes, &o1)) return;  // attention_out
  if (!product_le(sh.T, sh.N1, 32 * 4, kCapBytes, &o2)) return;                             // stats, topk
  if (!product_le(sh.T, sh.N1, sh.max_c, kMaxWork, &tc) || !product_le(tc, sh.D + sh.D2, 1, kMaxWork, &work)) return;
  if (!product_le(sh.T2, sh.N2, sh.D * static_cast<int64_t>(es), kCapBytes, &gk_bytes)) return;  // grad_key
  --g_stats.valid_only;
  ++g_stats.ran;
  const bool supported = d.cpu_isa == -1 || nsa::cpu_isa_supported(static_cast<nsa::CpuIsa>(d.cpu_isa));
  std::vector<unsigned char> out(static_cast<size_t>(o1));
  std::vector<int32_t> topk(static_cast<size_t>(sh.T * sh.N2 * sh.K));
  std::vector<float> smax(static_cast<size_t>(sh.T * sh.N1 * 8)), ssum(smax.size());
  p.attention_out = out.data();
  p.topk_indices = topk.data();
  p.softmax_max = smax.data();
  p.softmax_sum = ssum.data();
  auto check_topk = [&](const char* who) {
    int64_t prev = 0;
    for (int64_t b = 0; b < static_cast<int64_t>(d.qlen.size()); ++b) {
      const int64_t c = d.clen[b] - (b ? d.clen[b - 1] : 0), sel = (c + sh.M - 1) / sh.M;
      for (int64_t t = prev; t < d.qlen[b]; ++t)
        for (int64_t n2 = 0; n2 < sh.N2; ++n2) {
          const int32_t* row = topk.data() + (t * sh.N2 + n2) * sh.K;
          for (int64_t i = 0; i < sh.K; ++i) {
            if (row[i] < 0 || row[i] >= sel) fail(who, "topk_indices outside [0, Sel_b)");
            for (int64_t j = 0; j < i; ++j)
              if (row[j] == row[i]) fail(who, "duplicate topk_indices");
          }
        }
      prev = d.qlen[b];
    }
  };
  Status s = nsa::compress_attention_reference(p);
  if (!s.ok()) fail("compress_attention_reference failed on a validated call", s.message());
  check_topk("reference");
  s = nsa::compress_attention_cpu(p, nsa::CpuOptions{d.cpu_isa, d.threads});
  if (s.ok() != supported) fail("compress_attention_cpu: unexpected status", s.message());
  if (!s.ok()) return;
  check_topk("cpu");
  // backward on the forward's outputs (contiguous attention_out, dO = attention_out)
  std::vector<unsigned char> gq(static_cast<size_t>(sh.T * sh.N1 * sh.D) * es);
  std::vector<unsigned char> gk(static_cast<size_t>(gk_bytes)), gv(static_cast<size_t>(sh.T2 * sh.N2 * sh.D2) * es);
  nsa::CompressAttentionGradParams g;
  g.fwd = p;
  nsa::Tensor3 o;
  o.data = out.data();
  o.size[0] = sh.T, o.size[1] = sh.N1, o.size[2] = sh.D2;
  o.stride[0] = sh.N1 * sh.D2, o.stride[1] = sh.D2, o.stride[2] = 1;
  g.attention_out = o;
  g.grad_out = o;
  g.softmax_max = smax.data();
  g.softmax_sum = ssum.data();
  g.grad_query = gq.data();
  g.grad_key = gk.data();
  g.grad_value = gv.data();
  s = nsa::compress_attention_backward_cpu(g, nsa::CpuOptions{d.cpu_isa, d.threads});
  if (!s.ok()) fail("compress_attention_backward_cpu failed on a validated call", s.message());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  run_one(data, size);
  return 0;
}

#ifdef NSA_FUZZ_STANDALONE
// Replays the inputs named on the command line (files), e.g. the checked-in corpus.
int main(int argc, char** argv) {
  int n = 0;
  for (int i = 1; i < argc; ++i) {
    FILE* f = std::fopen(argv[i], "rb");
    if (!f) continue;
    std::vector<uint8_t> buf;
    uint8_t tmp[4096];
    size_t got;
    while ((got = std::fread(tmp, 1, sizeof(tmp), f)) > 0) buf.insert(buf.end(), tmp, tmp + got);
    std::fclose(f);
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
    ++n;
  }
  std::printf("fuzz_validate (standalone): %d inputs replayed, 0 crashes\n", n);
  return 0;
}
#endif
