// Pieces shared by the CUDA forward (cuda_forward.cu) and backward (cuda_backward.cu) of compress_attention: the
// entry path (argument rules, what the backend supports beyond them, the input part of the kernels' argument blocks),
// the upload of the per-batch tables the kernels read, the key/value element offset and the atten_mask row scan of
// the kernels' visible windows.
#pragma once

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common/forward_params.h"
#include "cuda/common.cuh"
#include "nsa/compress_attention.h"
#include "ops/compress_attention/batches.h"

namespace nsa::cuda_detail {

// The inputs every kernel of the operator reads: query [T, N1, D], key [T2, N2, D], value [T2, N2, D2] (data, and
// strides in elements), atten_mask (nullptr when absent; strides in elements), the sizes and scale_value as float32.
// The forward's and the backward's argument blocks extend it.
struct QkvArgs {
  const void* q;
  const void* k;
  const void* v;
  int64_t qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2;
  const uint8_t* am;  // atten_mask or nullptr
  int64_t am0, am1;
  int B, N1, N2, G, D, D2;
  float scale;
};

// The visible columns of atten_mask row s (a query row of the batch, in [0, maxSq)) over the batch's C compressed
// columns, found by one warp (warp-uniform call): the first and the last c in [0, C) with mask[s][c] == 0, the same
// on every lane; first = INT_MAX and last = -1 when the row is fully masked. Requires a.am != nullptr.
__device__ __forceinline__ void mask_row_window(const QkvArgs& a, int64_t s, int C, int lane, int* first, int* last) {
  const uint8_t* mrow = a.am + s * a.am0;
  int f = INT_MAX, l = -1;
  for (int c = lane; c < C; c += 32)
    if (mrow[static_cast<int64_t>(c) * a.am1] == 0) {
      f = min(f, c);
      l = c;
    }
  *first = warp_min_i(f);
  *last = warp_max_i(l);
}

// Beyond the argument rules of §6 / §7, for a call with forward params p: the backend reads explicit masks only (not
// the §10 causal / short_batches extensions), computes in bf16 / fp16 / fp32 and indexes rows, heads and columns with
// 32-bit ints (C_b, Sq_b G, N1 and D below 2^30; Sq_b <= Sq_b G).
inline Status check_cuda_support(const CompressAttentionParams& p, const CompressAttentionShape& sh) {
  if (p.causal || p.short_batches)
    return Status::Error("the CUDA backend does not implement the causal / short_batches extensions (§10); use the "
                         "CPU backend or explicit masks");
  if (p.dtype == DType::kF64)
    return Status::Error("dtype float64 is not supported by the CUDA backend (use bfloat16, float16 or float32)");
  if (sh.max_c >= INT_MAX / 2 || sh.max_sq * sh.G >= INT_MAX / 2 || sh.N1 >= INT_MAX / 2 || sh.D >= INT_MAX / 2)
    return Status::Error("the CUDA backend needs C_b, Sq_b * G, N1 and D below 2^30");
  return Status::Ok();
}

// The input part of a kernel argument block, from a call that passed check_cuda_support.
inline void set_qkv_args(const CompressAttentionParams& p, const CompressAttentionShape& sh, QkvArgs* a) {
  a->q = p.query.data;
  a->k = p.key.data;
  a->v = p.value.data;
  a->qs0 = p.query.stride[0], a->qs1 = p.query.stride[1], a->qs2 = p.query.stride[2];
  a->ks0 = p.key.stride[0], a->ks1 = p.key.stride[1], a->ks2 = p.key.stride[2];
  a->vs0 = p.value.stride[0], a->vs1 = p.value.stride[1], a->vs2 = p.value.stride[2];
  a->am = p.atten_mask.data;
  a->am0 = p.atten_mask.stride[0], a->am1 = p.atten_mask.stride[1];
  a->B = static_cast<int>(sh.B);
  a->N1 = static_cast<int>(sh.N1), a->N2 = static_cast<int>(sh.N2), a->G = static_cast<int>(sh.G);
  a->D = static_cast<int>(sh.D), a->D2 = static_cast<int>(sh.D2);
  a->scale = static_cast<float>(p.scale_value);
}

// The argument rules of a call, with the reference's messages: §6 for the forward, §7 for the backward.
inline Status validate_call(const CompressAttentionParams& p, CompressAttentionShape* sh) {
  return validate_compress_attention(p, sh);
}
inline Status validate_call(const CompressAttentionGradParams& g, CompressAttentionShape* sh) {
  return validate_compress_attention_backward(g, sh);
}

// The one entry path of the forward (Params = CompressAttentionParams, Args = FwdArgs) and the backward
// (CompressAttentionGradParams, BwdArgs): the call's argument rules (validate_call), what the backend supports
// (check_cuda_support on the forward params), then run(p, sh, batches, a, stream) with the input part of the argument
// block a filled (set_qkv_args; every other field zero) and the call's batches (§2 prefix sums as begin/length pairs).
// Nothing is enqueued and nothing written before run.
template <typename Args, typename Params, typename Run>
Status run_cuda_call(const Params& p, void* stream, Run run) {
  CompressAttentionShape sh;
  Status st = validate_call(p, &sh);
  if (!st.ok()) return st;
  const CompressAttentionParams& f = detail::forward_params(p);
  if (!(st = check_cuda_support(f, sh)).ok()) return st;
  Args a{};
  set_qkv_args(f, sh, &a);
  return run(p, sh, detail::make_batches(f, sh), a, static_cast<cudaStream_t>(stream));
}

// Element offset of row `row` (of T2), KV head n2, column d in a key or value view [T2, N2, *] with strides s0, s1,
// s2 (elements).
__device__ __forceinline__ int64_t kv_off(int64_t row, int n2, int d, int64_t s0, int64_t s1, int64_t s2) {
  return row * s0 + static_cast<int64_t>(n2) * s1 + static_cast<int64_t>(d) * s2;
}

// Device copies of the per-batch tables of one call, in one stream-ordered scratch allocation laid out as
// [B DevBatch][list 0: B + 1 int64]...[list n-1][extra_bytes] (every part 8-byte aligned): the batches as the kernels
// see them (Sq_b, C_b, Sel_b below 2^30 after check_cuda_support), the given per-batch work-unit prefix sums, and
// extra_bytes of uninitialised memory for the caller. On success fills table, units[0..n-1] and extra.
inline Status upload_batch_table(Scratch& scratch, cudaStream_t stream, const std::vector<detail::BatchInfo>& batches,
                                 std::initializer_list<const std::vector<int64_t>*> lists, size_t extra_bytes,
                                 const DevBatch** table, const int64_t** units, void** extra) {
  std::vector<DevBatch> db;
  for (const detail::BatchInfo& bi : batches)
    db.push_back(DevBatch{bi.q_begin, bi.c_begin, bi.stat_begin, static_cast<int>(bi.sq), static_cast<int>(bi.c),
                          static_cast<int>(bi.sel)});
  const size_t db_bytes = db.size() * sizeof(DevBatch), list_bytes = (db.size() + 1) * sizeof(int64_t);
  void* dev = nullptr;
  Status st = scratch.alloc(db_bytes + lists.size() * list_bytes + extra_bytes, &dev);
  if (!st.ok()) return st;
  char* base = static_cast<char*>(dev);
  cudaError_t e = cudaMemcpyAsync(base, db.data(), db_bytes, cudaMemcpyHostToDevice, stream);
  *table = reinterpret_cast<const DevBatch*>(base);
  char* at = base + db_bytes;
  for (const std::vector<int64_t>* list : lists) {
    if (e == cudaSuccess) e = cudaMemcpyAsync(at, list->data(), list_bytes, cudaMemcpyHostToDevice, stream);
    *units++ = reinterpret_cast<const int64_t*>(at);
    at += list_bytes;
  }
  if (e != cudaSuccess) return cuda_error(e, "cudaMemcpyAsync (batch table)");
  *extra = at;
  return Status::Ok();
}

}  // namespace nsa::cuda_detail
