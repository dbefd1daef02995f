// Backward (docs/spec/compress_attention.md §7): the reference against finite differences of the fp64 forward (gradcheck), the
// fully masked rows of §5/§7, and compress_attention_backward_cpu against the fp64 model with
// FlashAttention's rule (max error <= 3 x the max error of the plain same-dtype implementation, the
// fp32 reference, plus a rounding floor), on every ISA this host runs; determinism over repeats and
// thread counts; varlen batches with an empty sequence; key rows past the last prefix sum; strided
// grad_out / attention_out; argument checks.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/numeric.h"
#include "cpu/kernels.h"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/reference.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::CompressAttentionGradParams;

// ------------------------------------------------------------------------------------ harness

// What a backward call reads besides the forward's inputs: the forward's results (attention_out,
// statistics) and dO, each materialized in the dtype with its own layout.
struct BwdInputs {
  Result fwd;             // attention_out (as doubles) and the statistics of the forward
  std::vector<double> go;  // dO, logical [T][N1][D2], representable in the dtype
  Layout3 go_layout, out_layout;
};

// The forward whose results the backward consumes: the reference (fp64 inputs: forward_fp64).
inline BwdInputs make_inputs(const Case& cs, std::mt19937_64& rng, double go_scale = 1.0) {
  BwdInputs in;
  in.fwd = run(cs, cs.dtype == DType::kF64 ? Backend::kRefFp64 : Backend::kRefFp32);
  EXPECT_TRUE(in.fwd.status.ok()) << in.fwd.status.message();
  std::uniform_real_distribution<double> u(-go_scale, go_scale);
  in.go.resize(static_cast<size_t>(cs.T() * cs.N1 * cs.D2));
  for (double& x : in.go) x = round_to(cs.dtype, u(rng));
  return in;
}

// A plain float32 implementation of §7 that takes §7's other allowed choice: P and dS rounded to the input
// dtype (nearest even) before the products that use them, sums in float32, as the NPU does. It is the
// "plain same-dtype implementation" of FlashAttention's rule for a backend that rounds P and dS (the CPU
// backend's bf16 dot-product path). Fully masked rows (§5) give dV the unrounded share dO / l_sum and nothing
// else, as the CPU backend does; a masked entry never contributes to dQ or dK (§7 rule 1).
inline Status plain_rounded_backward(const CompressAttentionGradParams& p) {
  nsa::CompressAttentionShape sh;
  Status st = nsa::validate_compress_attention_backward(p, &sh);
  if (!st.ok()) return st;
  const nsa::CompressAttentionParams& f = p.fwd;
  const DType dt = f.dtype;
  auto ld = [dt](const nsa::Tensor3& t, int64_t i, int64_t j, int64_t k) {
    return nsa::detail::load_f32(t.data, i * t.stride[0] + j * t.stride[1] + k * t.stride[2], dt);
  };
  auto masked = [&f](int64_t s, int64_t c) {
    return f.atten_mask.data != nullptr && f.atten_mask.data[s * f.atten_mask.stride[0] + c * f.atten_mask.stride[1]] != 0;
  };
  const float scale = static_cast<float>(f.scale_value);
  const int64_t G = sh.G, D = sh.D, D2 = sh.D2, N1 = sh.N1, N2 = sh.N2;
  std::vector<float> dk(static_cast<size_t>(sh.T2 * N2 * D), 0.0f), dv(static_cast<size_t>(sh.T2 * N2 * D2), 0.0f);
  std::vector<float> P, dS, dq(static_cast<size_t>(D));
  int64_t q0 = 0, c0 = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t sq = f.actual_seq_qlen.data[b] - q0, C = f.actual_cmp_seq_kvlen.data[b] - c0;
    P.assign(static_cast<size_t>(C), 0.0f);
    dS.assign(static_cast<size_t>(C), 0.0f);
    for (int64_t s = 0; s < sq; ++s) {
      const int64_t t = q0 + s;
      bool fm = f.atten_mask.data != nullptr;
      for (int64_t c = 0; c < C && fm; ++c) fm = masked(s, c);
      for (int64_t h = 0; h < N1; ++h) {
        const int64_t n2 = h / G, so = 8 * N1 * q0 + (h * sq + s) * 8;
        const float m = p.softmax_max[so], l_sum = p.softmax_sum[so];
        float dlt = 0;
        for (int64_t j = 0; j < D2; ++j) dlt += ld(p.grad_out, t, h, j) * ld(p.attention_out, t, h, j);
        for (int64_t c = 0; c < C; ++c) {
          float dot = 0, dpc = 0;
          for (int64_t j = 0; j < D; ++j) dot += ld(f.query, t, h, j) * ld(f.key, c0 + c, n2, j);
          for (int64_t j = 0; j < D2; ++j) dpc += ld(p.grad_out, t, h, j) * ld(f.value, c0 + c, n2, j);
          const float sc = masked(s, c) ? -FLT_MAX : dot * scale;
          const float pc = std::exp(sc - m) / l_sum;
          P[c] = fm ? pc : nsa::detail::round_to_dtype(pc, dt);
          dS[c] = masked(s, c) ? 0.0f : nsa::detail::round_to_dtype(pc * (dpc - dlt), dt);  // §7 rule 1
        }
        std::fill(dq.begin(), dq.end(), 0.0f);
        for (int64_t c = 0; c < C; ++c) {
          float* dkr = &dk[static_cast<size_t>(((c0 + c) * N2 + n2) * D)];
          float* dvr = &dv[static_cast<size_t>(((c0 + c) * N2 + n2) * D2)];
          for (int64_t j = 0; j < D; ++j) {
            dq[j] += dS[c] * ld(f.key, c0 + c, n2, j);
            dkr[j] += dS[c] * ld(f.query, t, h, j);
          }
          for (int64_t j = 0; j < D2; ++j) dvr[j] += P[c] * ld(p.grad_out, t, h, j);
        }
        for (int64_t j = 0; j < D; ++j) nsa::detail::store_f64(p.grad_query, (t * N1 + h) * D + j, scale * dq[j], dt);
      }
    }
    q0 = f.actual_seq_qlen.data[b];
    c0 = f.actual_cmp_seq_kvlen.data[b];
  }
  for (int64_t i = 0; i < sh.T2 * N2 * D; ++i) nsa::detail::store_f64(p.grad_key, i, scale * dk[static_cast<size_t>(i)], dt);
  for (int64_t i = 0; i < sh.T2 * N2 * D2; ++i) nsa::detail::store_f64(p.grad_value, i, dv[static_cast<size_t>(i)], dt);
  return Status::Ok();
}

// Whether compress_attention_backward_cpu rounds P and dS to the dtype on this ISA: its bf16 dot-product
// path (bf16 inputs on an ISA with vdpbf16ps; src/ops/compress_attention/cpu_backward.cpp). Every other path keeps them in fp32.
inline bool cpu_rounds_p_ds(DType dt, CpuIsa isa) { return dt == DType::kBF16 && isa == CpuIsa::kAvx512Bf16; }

enum class BwdBackend { kRefFp32, kRefFp64, kReference, kCpu, kPlainRounded };

// Gradients of one call, converted to double, plus their raw bytes (for bitwise comparisons).
struct Grads {
  Status status;
  std::vector<double> dq, dk, dv;
  std::vector<unsigned char> raw;
};

// Every buffer of one backward call. Outputs are pre-filled with 0xFF bytes (NaN), so a missing
// write shows; the forward's output pointers are left null (the backward must not need them).
struct BoundBwd {
  Bound fwd;
  Storage3 out, go;
  std::vector<unsigned char> gq, gk, gv;
  CompressAttentionGradParams p;

  BoundBwd(const Case& cs, const BwdInputs& in) : fwd(cs) {
    const int64_t osz[3] = {cs.T(), cs.N1, cs.D2};
    materialize3(in.fwd.out, osz, in.out_layout, cs.dtype, &out);
    materialize3(in.go, osz, in.go_layout, cs.dtype, &go);
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
    p.softmax_max = in.fwd.smax.data();
    p.softmax_sum = in.fwd.ssum.data();
    p.grad_query = gq.data();
    p.grad_key = gk.data();
    p.grad_value = gv.data();
  }
  bool outputs_untouched() const {
    auto ff = [](const std::vector<unsigned char>& v) {
      return std::all_of(v.begin(), v.end(), [](unsigned char x) { return x == 0xFF; });
    };
    return ff(gq) && ff(gk) && ff(gv);
  }
};

inline Status call_bwd(BwdBackend b, const CompressAttentionGradParams& p, const nsa::CpuOptions& options = {}) {
  switch (b) {
    case BwdBackend::kRefFp32: return nsa::reference::backward_fp32(p);
    case BwdBackend::kRefFp64: return nsa::reference::backward_fp64(p);
    case BwdBackend::kReference: return nsa::compress_attention_backward_reference(p);
    case BwdBackend::kCpu: return nsa::compress_attention_backward_cpu(p, options);
    case BwdBackend::kPlainRounded: return plain_rounded_backward(p);
  }
  return Status::Error("bad backend");
}

inline Grads run_bwd(const Case& cs, const BwdInputs& in, BwdBackend b, int cpu_isa = -1, int num_threads = 0) {
  BoundBwd bd(cs, in);
  Grads g;
  g.status = call_bwd(b, bd.p, nsa::CpuOptions{cpu_isa, num_threads});
  auto conv = [&](const std::vector<unsigned char>& raw, int64_t n, std::vector<double>* out) {
    out->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) (*out)[static_cast<size_t>(i)] = nsa::detail::load_f64(raw.data(), i, cs.dtype);
  };
  conv(bd.gq, cs.T() * cs.N1 * cs.D, &g.dq);
  conv(bd.gk, cs.T2() * cs.N2 * cs.D, &g.dk);
  conv(bd.gv, cs.T2() * cs.N2 * cs.D2, &g.dv);
  g.raw = bd.gq;
  g.raw.insert(g.raw.end(), bd.gk.begin(), bd.gk.end());
  g.raw.insert(g.raw.end(), bd.gv.begin(), bd.gv.end());
  return g;
}

// FlashAttention's rule per gradient tensor: max |got - model| <= 3 x max |plain - model| plus a floor
// per element: one ulp of the dtype at the model value, plus 64 eps of the accumulation type times the
// tensor's largest magnitude (a different summation order or exp implementation).
inline AssertionResult check_grad(const char* name, DType dt, const std::vector<double>& got,
                                  const std::vector<double>& model, const std::vector<double>& plain) {
  double plain_err = 0, mx = 0;
  for (size_t i = 0; i < model.size(); ++i) {
    plain_err = std::max(plain_err, std::fabs(plain[i] - model[i]));
    mx = std::max(mx, std::fabs(model[i]));
  }
  const double eps = dt == DType::kF64 ? DBL_EPSILON : FLT_EPSILON;
  for (size_t i = 0; i < model.size(); ++i) {
    const double err = std::fabs(got[i] - model[i]);
    const double tol = 3 * plain_err + ulp_of(dt, model[i]) + 64 * eps * mx;
    if (!(err <= tol))
      return AssertionFailure() << name << "[flat " << i << "]: got " << got[i] << ", fp64 model " << model[i]
                                << ", error " << err << " > tolerance " << tol << " (3 x plain error " << plain_err
                                << " + floor)";
  }
  return AssertionSuccess();
}

inline AssertionResult check_grads(const Case& cs, const Grads& got, const Grads& model, const Grads& plain) {
  if (!got.status.ok()) return AssertionFailure() << "call failed: " << got.status.message();
  AssertionResult r = check_grad("grad_query", cs.dtype, got.dq, model.dq, plain.dq);
  if (r) r = check_grad("grad_key", cs.dtype, got.dk, model.dk, plain.dk);
  if (r) r = check_grad("grad_value", cs.dtype, got.dv, model.dv, plain.dv);
  return r;
}

// Key/value rows past the last prefix sum, and the rows of batches without queries: exactly zero.
// Fully masked rows (§5): zero dQ, exactly.
inline AssertionResult check_structural_zeros(const Case& cs, const Grads& g) {
  const int64_t c_end = cs.T2() - cs.extra_kv_rows;
  std::vector<char> dead(static_cast<size_t>(cs.T2()), 0);
  for (int64_t r = c_end; r < cs.T2(); ++r) dead[static_cast<size_t>(r)] = 1;
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
          if (g.dq[cs.qi(t, h, j)] != 0.0)
            return AssertionFailure() << "grad_query of the fully masked row t=" << t << " h=" << h << " must be zero, got "
                                      << g.dq[cs.qi(t, h, j)];
    }
  for (const std::vector<double>* v : {&g.dq, &g.dk, &g.dv})
    for (double x : *v)
      if (!std::isfinite(x)) return AssertionFailure() << "a gradient is not finite (not written?)";
  return AssertionSuccess();
}

// Compressed-granularity diagonal mask (query s sees tokens c <= s), the first `fm_rows` rows fully
// masked, and extra random entries masked with probability p.
inline void set_diag_mask(Case& cs, std::mt19937_64& rng, int64_t fm_rows, double p) {
  cs.enable_atten_mask();
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t s = 0; s < cs.max_sq(); ++s)
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = (c > s || s < fm_rows || u(rng) < p) ? 1 : 0;
}

// What the CPU backward is compared with: the fp64 model (backward_fp64), the plain float32 reference and the plain
// implementation that rounds P and dS (the "plain same-dtype implementation" of the 3x rule for the path that
// rounds them). fp64 inputs: all three are the model.
struct Oracles {
  Grads model, plain, plain_rounded;
};
inline Oracles make_oracles(const Case& cs, const BwdInputs& in) {
  Oracles o;
  o.model = run_bwd(cs, in, BwdBackend::kRefFp64);
  o.plain = cs.dtype == DType::kF64 ? o.model : run_bwd(cs, in, BwdBackend::kRefFp32);
  o.plain_rounded = cs.dtype == DType::kF64 ? o.model : run_bwd(cs, in, BwdBackend::kPlainRounded);
  return o;
}

// The CPU backward on every ISA this host runs: the fp64 model with the 3x rule, the structural zeros, and the
// same bits for every thread count of `threads` as for one thread. *ones (if given) receives the one-thread
// results, one per ISA of supported_isas().
inline AssertionResult check_cpu_on_every_isa(const Case& cs, const BwdInputs& in, const Oracles& o,
                                              std::initializer_list<int> threads, std::vector<Grads>* ones = nullptr) {
  if (!o.model.status.ok()) return AssertionFailure() << "fp64 model: " << o.model.status.message();
  for (CpuIsa isa : supported_isas()) {
    const char* name = nsa::cpu_isa_name(isa);
    const Grads one = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), 1);
    AssertionResult r = check_grads(cs, one, o.model, cpu_rounds_p_ds(cs.dtype, isa) ? o.plain_rounded : o.plain);
    if (r) r = check_structural_zeros(cs, one);
    if (!r) return r << " (" << name << ")";
    for (int t : threads) {
      const Grads g = run_bwd(cs, in, BwdBackend::kCpu, static_cast<int>(isa), t);
      if (!g.status.ok()) return AssertionFailure() << name << " threads=" << t << ": " << g.status.message();
      if (g.raw != one.raw) return AssertionFailure() << name << ": threads=" << t << " differs bitwise from threads=1";
    }
    if (ones != nullptr) ones->push_back(one);
  }
  return AssertionSuccess();
}

// check_cpu_on_every_isa on a case built by the caller, with dO drawn from rng.
inline AssertionResult check_cpu_case(const Case& cs, std::mt19937_64& rng, std::initializer_list<int> threads) {
  const BwdInputs in = make_inputs(cs, rng);
  AssertionResult r = check_cpu_on_every_isa(cs, in, make_oracles(cs, in), threads);
  if (!r) r << " [" << cs.describe() << "]";
  return r;
}

// ------------------------------------------------------------------------------------ gradcheck

// The reference backward in fp64 against central differences of forward_fp64 on L = sum(attention_out * R),
// for every query/key/value element. Partially and fully masked rows, G = 3, varlen with an empty batch and
// NaN key rows past the last prefix sum.
TEST(BackwardReference, GradcheckAgainstFiniteDifferencesFp64) {
  std::mt19937_64 rng(1234);
  Case cs = Case::make(DType::kF64, /*sq=*/{3, 0, 2}, /*c=*/{3, 2, 5}, /*N1=*/6, /*N2=*/2, /*D=*/5, /*D2=*/3);
  cs.extra_kv_rows = 1;
  cs.resize();
  cs.fill_uniform(rng, -2, 2);
  cs.enable_atten_mask();  // [maxSq = 3][maxC = 5]
  const uint8_t mask[3][5] = {{0, 1, 0, 1, 0}, {1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}};  // row 2 is fully masked in batch 0
  for (int s = 0; s < 3; ++s)
    for (int c = 0; c < 5; ++c) cs.atten_at(s, c) = mask[s][c];
  SCOPED_TRACE(cs.describe());
  BwdInputs in = make_inputs(cs, rng);
  const Grads ana = run_bwd(cs, in, BwdBackend::kReference);
  ASSERT_TRUE(ana.status.ok()) << ana.status.message();
  ASSERT_TRUE(check_structural_zeros(cs, ana));

  auto loss = [&](const Case& c2) {
    const Result r = run(c2, Backend::kRefFp64);
    double l = 0;
    for (size_t i = 0; i < r.out.size(); ++i) l += r.out[i] * in.go[i];
    return l;
  };
  const double h = 1e-6;
  double worst = 0;
  auto probe = [&](std::vector<double> Case::*field, size_t i, double analytic, const char* name) {
    Case c2 = cs;
    const double x = (c2.*field)[i];
    (c2.*field)[i] = x + h;
    const double lp = loss(c2);
    (c2.*field)[i] = x - h;
    const double lm = loss(c2);
    const double num = (lp - lm) / (2 * h);
    const double err = std::fabs(num - analytic);
    worst = std::max(worst, err / (1e-6 + 1e-5 * std::fabs(num)));
    EXPECT_LE(err, 1e-6 + 1e-5 * std::fabs(num)) << name << "[flat " << i << "]: numeric " << num << ", analytic " << analytic;
  };
  const int64_t valid_kv = cs.T2() - cs.extra_kv_rows;
  for (size_t i = 0; i < cs.q.size(); ++i) probe(&Case::q, i, ana.dq[i], "grad_query");
  for (size_t i = 0; i < static_cast<size_t>(valid_kv * cs.N2 * cs.D); ++i) probe(&Case::k, i, ana.dk[i], "grad_key");
  for (size_t i = 0; i < static_cast<size_t>(valid_kv * cs.N2 * cs.D2); ++i) probe(&Case::v, i, ana.dv[i], "grad_value");
  RecordProperty("worst_error_over_tolerance", std::to_string(worst));
  // The CPU backend in fp64 follows the same derivative.
  const Grads cpu = run_bwd(cs, in, BwdBackend::kCpu);
  EXPECT_TRUE(check_grads(cs, cpu, ana, ana));
}

// ------------------------------------------------------------------------------------ fully masked

// Every row fully masked (§5, §7): dQ = 0 and dK = 0 exactly; dV of every key row of batch b is
// sum over rows and heads of the group of dO / C_b.
TEST(BackwardReference, FullyMaskedRowsGiveUniformDvAndNoDqDk) {
  for (DType dt : kAllDtypes) {
    std::mt19937_64 rng(77);
    Case cs = Case::make(dt, {4, 3}, {5, 7}, /*N1=*/4, /*N2=*/2, /*D=*/8, /*D2=*/6);
    cs.fill_uniform(rng, -1, 1);
    cs.enable_atten_mask();
    std::fill(cs.atten.begin(), cs.atten.end(), 1);
    SCOPED_TRACE(cs.describe());
    const BwdInputs in = make_inputs(cs, rng);
    for (BwdBackend be : {BwdBackend::kRefFp32, BwdBackend::kRefFp64, BwdBackend::kCpu}) {
      if (be == BwdBackend::kRefFp32 && dt == DType::kF64) continue;  // fp32 arithmetic: not for fp64 inputs
      const Grads g = run_bwd(cs, in, be, -1, 2);
      ASSERT_TRUE(g.status.ok()) << g.status.message();
      for (double x : g.dq) ASSERT_EQ(x, 0.0);
      for (double x : g.dk) ASSERT_EQ(x, 0.0);
      for (int64_t b = 0; b < cs.B(); ++b) {
        const int64_t C = cs.c[static_cast<size_t>(b)];
        for (int64_t n2 = 0; n2 < cs.N2; ++n2)
          for (int64_t j = 0; j < cs.D2; ++j) {
            double want = 0, mag = 0;
            for (int64_t t = cs.q_begin(b); t < cs.q_begin(b) + cs.sq[static_cast<size_t>(b)]; ++t)
              for (int64_t g2 = 0; g2 < cs.G(); ++g2) {
                const double x = in.go[static_cast<size_t>((t * cs.N1 + n2 * cs.G() + g2) * cs.D2 + j)];
                want += x / static_cast<double>(C);
                mag += std::fabs(x) / static_cast<double>(C);
              }
            const double tol = ulp_of(dt, want) + 16 * (dt == DType::kF64 ? DBL_EPSILON : FLT_EPSILON) * mag;
            for (int64_t c = 0; c < C; ++c)
              ASSERT_NEAR(g.dv[cs.vi(cs.c_begin(b) + c, n2, j)], want, tol) << "batch " << b << " token " << c;
          }
      }
    }
  }
}

// Rows with masked entries whose every visible score overflows fp32 to -inf (§7, "the general rule"): the forward
// has m = -FLT_MAX, P = 1/l_sum on each masked column (l_sum = their number) and P = 0 on the visible ones. The
// exact derivative: dV of each masked column gets dO / l_sum, dQ of the row is 0, dK gets nothing. Here every row
// is such a row (a huge scale makes q.k * scale = -inf in fp32; it is finite in fp64, where exp gives P = 0 all
// the same), so dQ = dK = 0 exactly and dV is closed form. Masked columns in both key tiles of C = 70, inside and
// outside the visible windows; a second batch; every backend, every ISA, 1 and 3 threads.
TEST(BackwardMaskedOverflow, MaskedEntriesOfOverflowingRowsFeedDvOnly) {
  const std::vector<std::vector<int64_t>> masked_cols = {{0, 5, 64, 69}, {3, 10, 11, 12, 13}, {1, 2, 66, 67, 68}};
  for (DType dt : kAllDtypes) {
    std::mt19937_64 rng(404);
    Case cs = Case::make(dt, {3, 2}, {70, 9}, /*N1=*/4, /*N2=*/2, /*D=*/16, /*D2=*/8);
    cs.scale = 3e38;  // finite as float32
    std::uniform_real_distribution<double> u(-1, 1);
    for (double& x : cs.q) x = round_to(dt, 0.5 + 0.5 * std::fabs(u(rng)));  // q > 0, k < 0: q.k < 0
    for (double& x : cs.k) x = round_to(dt, -0.5 - 0.5 * std::fabs(u(rng)));
    for (double& x : cs.v) x = round_to(dt, u(rng));
    cs.enable_atten_mask();
    for (int64_t s = 0; s < cs.max_sq(); ++s)
      for (int64_t c : masked_cols[static_cast<size_t>(s)]) cs.atten_at(s, c) = 1;
    SCOPED_TRACE(cs.describe());
    const BwdInputs in = make_inputs(cs, rng);
    for (int64_t t = 0; t < cs.T(); ++t)  // the forward saw what this test is about
      for (int64_t h = 0; h < cs.N1; ++h) ASSERT_EQ(in.fwd.smax[static_cast<size_t>(stat_index(cs, t, h))], -FLT_MAX);
    // dV of key row c of batch b, head group n2: sum over rows s that mask c and heads g of dO / l_sum(s)
    auto want_dv = [&](int64_t b, int64_t c, int64_t n2, int64_t j, double* mag) {
      double want = 0;
      *mag = 0;
      for (int64_t s = 0; s < cs.sq[static_cast<size_t>(b)]; ++s) {
        if (!cs.atten_at(s, c)) continue;
        int64_t l = 0;
        for (int64_t cc = 0; cc < cs.c[static_cast<size_t>(b)]; ++cc) l += cs.atten_at(s, cc);
        for (int64_t g = 0; g < cs.G(); ++g) {
          const double x = in.go[static_cast<size_t>(((cs.q_begin(b) + s) * cs.N1 + n2 * cs.G() + g) * cs.D2 + j)];
          want += x / static_cast<double>(l);
          *mag += std::fabs(x / static_cast<double>(l));
        }
      }
      return want;
    };
    std::vector<std::pair<BwdBackend, int>> runs = {{BwdBackend::kRefFp32, -1}, {BwdBackend::kRefFp64, -1}};
    for (CpuIsa isa : supported_isas()) runs.emplace_back(BwdBackend::kCpu, static_cast<int>(isa));
    for (const auto& [be, isa] : runs) {
      if (be == BwdBackend::kRefFp32 && dt == DType::kF64) continue;  // fp32 arithmetic: not for fp64 inputs
      for (int threads : {1, 3}) {
        SCOPED_TRACE(::testing::Message() << "backend " << static_cast<int>(be) << " isa " << isa << " threads " << threads);
        const Grads g = run_bwd(cs, in, be, isa, threads);
        ASSERT_TRUE(g.status.ok()) << g.status.message();
        for (size_t i = 0; i < g.dq.size(); ++i) ASSERT_EQ(g.dq[i], 0.0) << "grad_query[flat " << i << "]";
        for (size_t i = 0; i < g.dk.size(); ++i) ASSERT_EQ(g.dk[i], 0.0) << "grad_key[flat " << i << "]";
        for (int64_t b = 0; b < cs.B(); ++b)
          for (int64_t c = 0; c < cs.c[static_cast<size_t>(b)]; ++c)
            for (int64_t n2 = 0; n2 < cs.N2; ++n2)
              for (int64_t j = 0; j < cs.D2; ++j) {
                double mag = 0;
                const double want = want_dv(b, c, n2, j, &mag);
                const double tol = ulp_of(dt, want) + 16 * (dt == DType::kF64 ? DBL_EPSILON : FLT_EPSILON) * mag;
                ASSERT_NEAR(g.dv[cs.vi(cs.c_begin(b) + c, n2, j)], want, tol)
                    << "grad_value of batch " << b << " token " << c << " (masked in some row: "
                    << (want != 0.0) << ")";
              }
      }
    }
  }
}

// A few such rows among ordinary ones (a causal diagonal with fully masked rows; the overflowing rows have q
// entries of 3e38, so that their q.k overflow while the other rows' scores stay ordinary): the CPU backward
// against the fp64 model with the 3x rule on every ISA, dQ of the overflowing rows exactly 0, the same bits for
// any thread count.
TEST(BackwardMaskedOverflow, AmongOrdinaryRowsCpuMatchesModel) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    std::mt19937_64 rng(505);
    Case cs = Case::make(dt, {40, 9}, {70, 12}, /*N1=*/6, /*N2=*/2, /*D=*/20, /*D2=*/12);
    std::uniform_real_distribution<double> u(-1, 1);
    for (double& x : cs.q) x = round_to(dt, u(rng));
    for (double& x : cs.k) x = round_to(dt, -0.5 - 0.5 * std::fabs(u(rng)));  // k < 0
    for (double& x : cs.v) x = round_to(dt, u(rng));
    const std::vector<int64_t> overflow_rows = {5, 17, 30, 46};  // token rows t (the last one in batch 1)
    for (int64_t t : overflow_rows)
      for (int64_t h = 0; h < cs.N1; ++h)
        for (int64_t j = 0; j < cs.D; ++j) cs.set_q(t, h, j, 3e38);
    set_diag_mask(cs, rng, /*fm_rows=*/2, /*p=*/0.1);
    SCOPED_TRACE(cs.describe());
    const BwdInputs in = make_inputs(cs, rng);
    for (int64_t t : overflow_rows) ASSERT_EQ(in.fwd.smax[static_cast<size_t>(stat_index(cs, t, 0))], -FLT_MAX) << t;
    const Oracles o = make_oracles(cs, in);
    std::vector<Grads> ones;
    ASSERT_TRUE(check_cpu_on_every_isa(cs, in, o, {2, 3}, &ones));
    ones.insert(ones.end(), {o.model, o.plain, o.plain_rounded});
    for (const Grads& r : ones)  // every ISA, then the three references
      for (int64_t t : overflow_rows)
        for (int64_t h = 0; h < cs.N1; ++h)
          for (int64_t j = 0; j < cs.D; ++j) ASSERT_EQ(r.dq[cs.qi(t, h, j)], 0.0) << "dQ of row " << t;
  }
}

// ------------------------------------------------------------------------------------ CPU vs model

struct CpuCaseParam {
  DType dtype;
  int64_t G;
};

void PrintTo(const CpuCaseParam& p, std::ostream* os) { *os << nsa::dtype_name(p.dtype) << " G=" << p.G; }

class BackwardCpu : public ::testing::TestWithParam<CpuCaseParam> {};

// Varlen (an empty sequence, Sq = 70 and C = 70 spanning two tiles of either kind), NaN key rows past the
// last prefix sum, a diagonal mask with fully masked rows, skipped and partial tiles, strided
// grad_out / attention_out. Every ISA; bitwise identical over thread counts 1, 2, 3, 7 and repeats.
TEST_P(BackwardCpu, MatchesFp64ModelAndIsDeterministic) {
  const CpuCaseParam prm = GetParam();
  std::mt19937_64 rng(1000 + 10 * static_cast<int>(prm.dtype) + prm.G);
  const int64_t N2 = prm.G == 8 ? 1 : 2;
  Case cs = Case::make(prm.dtype, {70, 0, 21}, {70, 3, 9}, prm.G * N2, N2, /*D=*/40, /*D2=*/24);
  cs.extra_kv_rows = 2;
  cs.resize();
  cs.fill_uniform(rng, -1.5, 1.5);
  set_diag_mask(cs, rng, /*fm_rows=*/3, /*p=*/0.15);
  SCOPED_TRACE(cs.describe());
  BwdInputs in = make_inputs(cs, rng);
  in.go_layout.order = {1, 0, 2};  // [N1][T][D2] in memory, padded rows
  in.go_layout.pad = {0, 1, 3};
  in.out_layout.step = 2;  // every other element
  const Oracles o = make_oracles(cs, in);
  ASSERT_TRUE(o.model.status.ok()) << o.model.status.message();
  for (const Grads* r : {&o.model, &o.plain, &o.plain_rounded}) ASSERT_TRUE(check_structural_zeros(cs, *r));
  ASSERT_TRUE(check_cpu_on_every_isa(cs, in, o, {1, 2, 3, 7}));
}

INSTANTIATE_TEST_SUITE_P(DtypesAndGroups, BackwardCpu,
                         ::testing::Values(CpuCaseParam{DType::kBF16, 1}, CpuCaseParam{DType::kBF16, 2},
                                           CpuCaseParam{DType::kBF16, 3}, CpuCaseParam{DType::kBF16, 8},
                                           CpuCaseParam{DType::kF16, 1}, CpuCaseParam{DType::kF16, 2},
                                           CpuCaseParam{DType::kF16, 3}, CpuCaseParam{DType::kF16, 8},
                                           CpuCaseParam{DType::kF32, 1}, CpuCaseParam{DType::kF32, 2},
                                           CpuCaseParam{DType::kF32, 3}, CpuCaseParam{DType::kF32, 8},
                                           CpuCaseParam{DType::kF64, 3}),
                         [](const ::testing::TestParamInfo<CpuCaseParam>& info) {
                           return std::string(nsa::dtype_name(info.param.dtype)) + "_G" + std::to_string(info.param.G);
                         });

// No mask, D > 64 (two panels) with D2 != D, strided query/key/value, a single (batch, KV head) spread
// over several query and key tiles; every ISA; the same bits for any thread count.
TEST(BackwardCpuShapes, NoMaskWideHeadsStridedInputs) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    std::mt19937_64 rng(4242);
    Case cs = Case::make(dt, {150}, {130}, /*N1=*/2, /*N2=*/1, /*D=*/72, /*D2=*/40);
    cs.q_layout.order = {1, 0, 2};
    cs.k_layout.pad = {0, 1, 5};
    cs.v_layout.step = 3;
    cs.fill_uniform(rng, -1, 1);
    ASSERT_TRUE(check_cpu_case(cs, rng, {2, 3, 7}));
  }
}

// A band mask (query s sees c in [s - 20, s], rows 40..42 fully masked): windows that start past column 0
// and end before the tile's last column, partial and full pairs, skipped pairs on both sides; every ISA.
TEST(BackwardCpuShapes, BandMaskWindows) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    std::mt19937_64 rng(31337);
    Case cs = Case::make(dt, {150, 7}, {140, 11}, /*N1=*/4, /*N2=*/2, /*D=*/24, /*D2=*/16);
    cs.fill_uniform(rng, -1.5, 1.5);
    cs.enable_atten_mask();
    for (int64_t s = 0; s < cs.max_sq(); ++s)
      for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = (c > s || c < s - 20 || (s >= 40 && s <= 42)) ? 1 : 0;
    ASSERT_TRUE(check_cpu_case(cs, rng, {2, 3, 7}));
  }
}

// The benchmark's head sizes (D = 192, D2 = 128, G = 16: full 64-row query tiles, three D panels) on every ISA,
// a diagonal mask with fully masked rows, two batches whose key tiles end mid-tile: the fp64 model with the
// 3x rule (the bf16 dot-product path against the plain implementation that rounds P and dS as it does), and
// bitwise identical over thread counts.
TEST(BackwardCpuShapes, BenchHeadSizesEveryIsa) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    std::mt19937_64 rng(777);
    Case cs = Case::make(dt, {100, 37}, {80, 40}, /*N1=*/16, /*N2=*/1, /*D=*/192, /*D2=*/128);
    cs.fill_uniform(rng, -1.5, 1.5);
    set_diag_mask(cs, rng, /*fm_rows=*/2, /*p=*/0.0);
    ASSERT_TRUE(check_cpu_case(cs, rng, {2, 3}));
  }
}

// Enough rows (tokens x heads) for several chunks of query tiles in a batch (src/ops/compress_attention/cpu_backward.cpp: 8192 rows
// per chunk), so that dK/dV are the chunks' partials summed in chunk order: a causal band mask (chunks reach
// different key tiles), fully masked rows, a second short batch, a key tile no query sees; the fp64 model with
// the 3x rule and the same bits for any thread count, on every ISA.
TEST(BackwardCpuShapes, SeveralChunksOfQueryTiles) {
  std::mt19937_64 rng(8080);
  Case cs = Case::make(DType::kBF16, {1100, 90}, {150, 200}, /*N1=*/16, /*N2=*/1, /*D=*/24, /*D2=*/16);
  cs.fill_uniform(rng, -1.5, 1.5);
  cs.enable_atten_mask();
  // query s sees c in [s/8 - 40, s/8], rows 0..3 fully masked; batch 1 (90 rows) never reaches c >= 128
  for (int64_t s = 0; s < cs.max_sq(); ++s)
    for (int64_t c = 0; c < cs.max_c(); ++c) cs.atten_at(s, c) = (c > s / 8 || c < s / 8 - 40 || s < 4) ? 1 : 0;
  ASSERT_TRUE(check_cpu_case(cs, rng, {2, 3, 7}));
}

// A sequence alone and the same sequence inside a batch give the same bits (tiles are batch-local).
TEST(BackwardCpuShapes, SequenceAloneEqualsInsideBatch) {
  std::mt19937_64 rng(99);
  Case big = Case::make(DType::kBF16, {20, 33}, {9, 70}, /*N1=*/4, /*N2=*/2, /*D=*/24, /*D2=*/16);
  big.fill_uniform(rng, -1, 1);
  set_diag_mask(big, rng, 2, 0.1);
  Case alone = Case::make(DType::kBF16, {33}, {70}, 4, 2, 24, 16);
  alone.enable_atten_mask();
  for (int64_t s = 0; s < 33; ++s)
    for (int64_t c = 0; c < 70; ++c) alone.atten_at(s, c) = big.atten_at(s, c);
  for (int64_t t = 0; t < 33; ++t)
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t j = 0; j < 24; ++j) alone.q[alone.qi(t, h, j)] = big.q[big.qi(20 + t, h, j)];
  for (int64_t r = 0; r < 70; ++r)
    for (int64_t n = 0; n < 2; ++n) {
      for (int64_t j = 0; j < 24; ++j) alone.k[alone.ki(r, n, j)] = big.k[big.ki(9 + r, n, j)];
      for (int64_t j = 0; j < 16; ++j) alone.v[alone.vi(r, n, j)] = big.v[big.vi(9 + r, n, j)];
    }
  BwdInputs in_big = make_inputs(big, rng);
  BwdInputs in_alone = make_inputs(alone, rng);
  for (size_t i = 0; i < in_alone.go.size(); ++i) in_alone.go[i] = in_big.go[20 * 4 * 16 + i];
  // The forward of the sequence alone equals its part of the batched forward (the reference's rows are
  // independent); use the batched values so that the backward inputs are identical.
  for (size_t i = 0; i < in_alone.fwd.out.size(); ++i) in_alone.fwd.out[i] = in_big.fwd.out[20 * 4 * 16 + i];
  for (size_t i = 0; i < in_alone.fwd.smax.size(); ++i) {
    in_alone.fwd.smax[i] = in_big.fwd.smax[8 * 4 * 20 + i];
    in_alone.fwd.ssum[i] = in_big.fwd.ssum[8 * 4 * 20 + i];
  }
  for (int threads : {1, 3}) {
    const Grads gb = run_bwd(big, in_big, BwdBackend::kCpu, -1, threads);
    const Grads ga = run_bwd(alone, in_alone, BwdBackend::kCpu, -1, threads);
    ASSERT_TRUE(gb.status.ok() && ga.status.ok());
    for (size_t i = 0; i < ga.dq.size(); ++i) ASSERT_EQ(ga.dq[i], gb.dq[20 * 4 * 24 + i]) << "grad_query " << i;
    for (size_t i = 0; i < ga.dk.size(); ++i) ASSERT_EQ(ga.dk[i], gb.dk[9 * 2 * 24 + i]) << "grad_key " << i;
    for (size_t i = 0; i < ga.dv.size(); ++i) ASSERT_EQ(ga.dv[i], gb.dv[9 * 2 * 16 + i]) << "grad_value " << i;
  }
}

// ------------------------------------------------------------------------------------ kernels

// The backward's KernelTable entries against plain loops, on every ISA this host runs: transposes (any sizes,
// leading dimensions; nothing outside the destination block written), the bf16 pair packing (nearest even,
// pairs and plain rows), and softmax_grad_row (masked entries exactly 0 whatever their score).
TEST(BackwardKernels, TableEntriesMatchPlainLoops) {
  std::mt19937_64 rng(2024);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(nsa::cpu_isa_name(isa));
    const nsa::cpu::KernelTable* kt = nsa::cpu::kernels_for(isa);
    ASSERT_EQ(kt->isa, isa);
    for (int64_t rows : {1, 2, 7, 31, 32, 33, 64, 70})
      for (int64_t cols : {1, 15, 16, 17, 40, 192}) {
        const int64_t ld_src = cols + 3, ld_dst = rows + 5;
        std::vector<uint16_t> src16(static_cast<size_t>(rows * ld_src)), dst16(static_cast<size_t>(cols * ld_dst), 0xABCD);
        std::vector<uint32_t> src32(src16.size()), dst32(dst16.size(), 0xDEADBEEFu);
        for (size_t i = 0; i < src16.size(); ++i) {
          src16[i] = static_cast<uint16_t>(rng());
          src32[i] = static_cast<uint32_t>(rng());
        }
        kt->grad.transpose_u16(src16.data(), ld_src, rows, cols, dst16.data(), ld_dst);
        kt->grad.transpose_u32(src32.data(), ld_src, rows, cols, dst32.data(), ld_dst);
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = 0; r < ld_dst; ++r) {
            const size_t d = static_cast<size_t>(c * ld_dst + r), sidx = static_cast<size_t>(r * ld_src + c);
            ASSERT_EQ(dst16[d], r < rows ? src16[sidx] : 0xABCD) << "u16 rows=" << rows << " cols=" << cols << " c=" << c
                                                                 << " r=" << r;
            ASSERT_EQ(dst32[d], r < rows ? src32[sidx] : 0xDEADBEEFu) << "u32 rows=" << rows << " cols=" << cols;
          }
      }
    // pack_rows_bf16: values with exact ties (x.5 ulp of bf16), random values, signed zeros
    if (kt->grad.pack_rows_bf16 != nullptr) {
      const int64_t n = 48;
      std::vector<float> a(n), b(n);
      std::uniform_real_distribution<float> u(-3, 3);
      for (int64_t i = 0; i < n; ++i) {
        a[i] = u(rng);
        b[i] = i % 3 == 0 ? nsa::detail::bits_f32(0x3f808000u + (static_cast<uint32_t>(i) << 16)) : u(rng);  // ties
      }
      a[5] = -0.0f;
      std::vector<uint16_t> pairs(2 * n, 0), ra(n + 1, 0x1234), rb(n, 0);
      kt->grad.pack_rows_bf16(a.data(), b.data(), n, pairs.data(), ra.data(), rb.data());
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(pairs[2 * i], nsa::detail::f32_to_bf16(a[i])) << i;
        ASSERT_EQ(pairs[2 * i + 1], nsa::detail::f32_to_bf16(b[i])) << i;
        ASSERT_EQ(ra[i], nsa::detail::f32_to_bf16(a[i])) << i;
        ASSERT_EQ(rb[i], nsa::detail::f32_to_bf16(b[i])) << i;
      }
      ASSERT_EQ(ra[n], 0x1234);
      std::vector<uint16_t> pairs2(2 * n, 0);
      kt->grad.pack_rows_bf16(a.data(), b.data(), n, pairs2.data(), nullptr, nullptr);
      ASSERT_TRUE(pairs2 == pairs);
    }
    // softmax_grad_row
    {
      const int64_t n = 64;
      std::vector<float> s(n), dp(n);
      std::vector<uint8_t> keep(n);
      std::uniform_real_distribution<float> u(-6, 2);
      for (int64_t i = 0; i < n; ++i) {
        s[i] = u(rng);
        dp[i] = u(rng);
        keep[i] = (rng() % 4) != 0;
      }
      s[3] = INFINITY, keep[3] = 0;  // masked entries give 0 whatever their score
      s[4] = NAN, keep[4] = 0;
      s[6] = 1e30f, keep[6] = 0;
      s[7] = -200.0f, keep[7] = 1;  // exp underflows to 0
      const float m = 1.5f, il = 0.25f, dlt = 0.375f;
      std::vector<float> s2 = s, dp2 = dp;
      kt->grad.softmax_grad_row(s2.data(), dp2.data(), keep.data(), n, m, il, dlt);
      for (int64_t i = 0; i < n; ++i) {
        const double p = keep[i] ? std::exp(static_cast<double>(s[i]) - m) * il : 0.0;
        const double ds = p * (static_cast<double>(dp[i]) - dlt);
        if (!keep[i]) {
          ASSERT_EQ(s2[i], 0.0f) << i;
          ASSERT_EQ(dp2[i], 0.0f) << i;
        }
        ASSERT_NEAR(s2[i], p, 4e-7 * std::fabs(p) + 1e-30) << i;
        ASSERT_NEAR(dp2[i], ds, 4e-7 * (std::fabs(p) * (std::fabs(dp[i]) + dlt)) + 1e-30) << i;
      }
    }
  }
}

// ------------------------------------------------------------------------------------ workspace

// Stride-0 views of one element describe inputs far larger than memory. A workspace that cannot be allocated is an
// error Status naming the entry point, never a crash, and nothing is written: N1 = N2 = D = 2^19, C = 128 (packed
// K/V panels of 2^47 bytes, above AlignedBuffer's 2^46-byte ceiling); sizes whose workspace arithmetic would
// overflow int64 (C_b = 2^50) are refused before any allocation.
TEST(CpuWorkspace, TooLargeIsAnErrorStatusNothingWritten) {
  auto bcast = [](const void* data, int64_t a, int64_t b, int64_t c) {
    nsa::Tensor3 t;
    t.data = data;
    t.size[0] = a, t.size[1] = b, t.size[2] = c;  // every stride 0: one element seen everywhere
    return t;
  };
  const float one = 0.5f;
  for (const auto& [C, want] : {std::pair<int64_t, const char*>{128, "out of memory for the workspace"},
                                std::pair<int64_t, const char*>{int64_t(1) << 50, "sizes too large"}}) {
    const int64_t N = int64_t(1) << 19, D = N, D2 = 16;
    const int64_t qlen[1] = {1}, clen[1] = {C};
    std::vector<unsigned char> out(64, 0xFF), gq(64, 0xFF), gk(64, 0xFF), gv(64, 0xFF);
    std::vector<int32_t> topk(4, -1);
    std::vector<float> smax(16, -1.0f), ssum(16, -1.0f);
    nsa::CompressAttentionParams p;
    p.dtype = DType::kF32;
    p.query = bcast(&one, 1, N, D);
    p.key = bcast(&one, C, N, D);
    p.value = bcast(&one, C, N, D2);
    p.scale_value = 0.125;
    p.head_num = N;
    p.compress_block_size = 32, p.compress_stride = 16, p.select_block_size = 64, p.select_block_count = 1;
    p.actual_seq_qlen = {qlen, 1};
    p.actual_cmp_seq_kvlen = {clen, 1};
    p.attention_out = out.data();
    p.topk_indices = topk.data();
    p.softmax_max = smax.data();
    p.softmax_sum = ssum.data();
    CompressAttentionGradParams g;
    g.fwd = p;
    g.attention_out = bcast(&one, 1, N, D2);
    g.grad_out = bcast(&one, 1, N, D2);
    g.softmax_max = smax.data();
    g.softmax_sum = ssum.data();
    g.grad_query = gq.data();
    g.grad_key = gk.data();
    g.grad_value = gv.data();
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(::testing::Message() << nsa::cpu_isa_name(isa) << " C=" << C);
      const Status fs = nsa::compress_attention_cpu(p, nsa::CpuOptions{static_cast<int>(isa), 2});
      ASSERT_FALSE(fs.ok());
      EXPECT_NE(fs.message().find("compress_attention_cpu: "), std::string::npos) << fs.message();
      EXPECT_NE(fs.message().find(want), std::string::npos) << fs.message();
      const Status bs = nsa::compress_attention_backward_cpu(g, nsa::CpuOptions{static_cast<int>(isa), 2});
      ASSERT_FALSE(bs.ok());
      EXPECT_NE(bs.message().find("compress_attention_backward_cpu: "), std::string::npos) << bs.message();
      EXPECT_NE(bs.message().find(want), std::string::npos) << bs.message();
    }
    for (const auto* buf : {&out, &gq, &gk, &gv})
      EXPECT_TRUE(std::all_of(buf->begin(), buf->end(), [](unsigned char x) { return x == 0xFF; }));
    EXPECT_TRUE(std::all_of(topk.begin(), topk.end(), [](int32_t x) { return x == -1; }));
    EXPECT_TRUE(std::all_of(smax.begin(), smax.end(), [](float x) { return x == -1.0f; }));
  }
}

// ------------------------------------------------------------------------------------ arguments

// Each bad argument is an error naming it; nothing is written. The forward's output pointers are not needed.
TEST(BackwardArguments, NamedErrorsAndNothingWritten) {
  std::mt19937_64 rng(5);
  Case cs = Case::make(DType::kBF16, {4, 3}, {5, 7}, 4, 2, 8, 6);
  cs.fill_uniform(rng, -1, 1);
  const BwdInputs in = make_inputs(cs, rng);
  struct Bad {
    const char* expect;
    void (*mutate)(CompressAttentionGradParams&);
  };
  const Bad bads[] = {
      {"attention_out", [](CompressAttentionGradParams& p) { p.attention_out.data = nullptr; }},
      {"attention_out", [](CompressAttentionGradParams& p) { p.attention_out.size[2] += 1; }},
      {"grad_out", [](CompressAttentionGradParams& p) { p.grad_out.data = nullptr; }},
      {"grad_out", [](CompressAttentionGradParams& p) { p.grad_out.size[0] -= 1; }},
      {"grad_out", [](CompressAttentionGradParams& p) { p.grad_out.size[1] = 3; }},
      {"softmax_max", [](CompressAttentionGradParams& p) { p.softmax_max = nullptr; }},
      {"softmax_sum", [](CompressAttentionGradParams& p) { p.softmax_sum = nullptr; }},
      {"grad_query", [](CompressAttentionGradParams& p) { p.grad_query = nullptr; }},
      {"grad_key", [](CompressAttentionGradParams& p) { p.grad_key = nullptr; }},
      {"grad_value", [](CompressAttentionGradParams& p) { p.grad_value = nullptr; }},
      {"head_num", [](CompressAttentionGradParams& p) { p.fwd.head_num = 3; }},
      {"query", [](CompressAttentionGradParams& p) { p.fwd.query.data = nullptr; }},
      {"actual_seq_qlen", [](CompressAttentionGradParams& p) { p.fwd.actual_seq_qlen.data = nullptr; }},
  };
  for (const Bad& bad : bads)
    for (BwdBackend be : {BwdBackend::kReference, BwdBackend::kCpu}) {
      BoundBwd bd(cs, in);
      bad.mutate(bd.p);
      const Status st = call_bwd(be, bd.p);
      EXPECT_FALSE(st.ok()) << bad.expect;
      EXPECT_NE(st.message().find(bad.expect), std::string::npos) << "message: " << st.message();
      EXPECT_TRUE(bd.outputs_untouched()) << bad.expect;
    }
  // An out-of-range ISA, and one this host cannot run, are errors of the CPU backend only.
  for (int i : {-2, 4, 99}) {
    BoundBwd bd(cs, in);
    const Status st = call_bwd(BwdBackend::kCpu, bd.p, nsa::CpuOptions{i, 0});
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("options.isa"), std::string::npos) << st.message();
    EXPECT_TRUE(bd.outputs_untouched());
  }
  for (int i = 0; i <= static_cast<int>(CpuIsa::kAvx512Bf16); ++i) {
    if (nsa::cpu_isa_supported(static_cast<CpuIsa>(i))) continue;
    BoundBwd bd(cs, in);
    const Status st = call_bwd(BwdBackend::kCpu, bd.p, nsa::CpuOptions{i, 0});
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("options.isa"), std::string::npos) << st.message();
    EXPECT_TRUE(bd.outputs_untouched());
  }
}

}  // namespace
}  // namespace nsa_test
