// nsa-ops CUDA backend: entry points (torch-free). Built only with -DNSA_ENABLE_CUDA=ON (target nsa_cuda).
//
// Same params and the same contract (docs/spec/compress_attention.md) as the CPU entry points of nsa/compress_attention.h, with
// these differences in where the data lives:
//   DEVICE pointers: query, key, value, attention_out, topk_indices, softmax_max, softmax_sum (forward);
//                    attention_out, grad_out, softmax_max, softmax_sum, grad_query, grad_key, grad_value
//                    (backward); atten_mask and topk_mask (uint8/bool, any element strides, nullptr = absent).
//   HOST pointers:   the length lists actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen (torch_npu
//                    takes them as Python lists); they are read before the call returns and may be freed then.
// `stream` is a cudaStream_t passed as void* (nullptr = the legacy default stream). Work is enqueued on it and
// the call returns without synchronizing; errors of the launch itself come back as a Status, errors during the
// kernels' execution surface at the caller's next synchronization. The call runs on the current device
// (cudaGetDevice), which must be the device holding the pointers.
//
// Arguments are checked first with validate_compress_attention / validate_compress_attention_backward (the
// messages are those of every other backend); nothing is enqueued when a check fails. Additional CUDA limits
// (clear errors naming the reason): dtype float64 is not supported (bfloat16, float16, float32 are); G = N1/N2
// must leave room for a 64-column score block in shared memory (G <= 384 on A100, <= 576 on H100); C_b and Sq_b * G
// below 2^31. Temporary device memory (a few bytes per batch, and T*N1 floats in the backward) is taken with
// cudaMallocAsync on `stream` and given back on it.
//
// Results are deterministic: every output element has one writer and a fixed summation order (no atomics);
// they do not depend on the device model or the launch configuration chosen for it except through the
// environment variable below.
//
// NSA_CUDA_SIMPLE=1 (read at every call) selects the plain CUDA-core kernels for the forward instead of the
// tensor-core ones (bf16/fp16 on sm_80+); fp32 inputs always use the CUDA-core kernels. Both follow docs/spec/compress_attention.md §3
// literally (exact softmax, P rounded to the dtype before P.V, fp32 accumulation).
#pragma once

#include "nsa/compress_attention.h"

namespace nsa {

// Forward (docs/spec/compress_attention.md §3, §4, §5). Outputs in §4's layout (statistics per batch [N1][Sq_b][8]).
Status compress_attention_cuda(const CompressAttentionParams& p, void* stream);

// Backward (docs/spec/compress_attention.md §7): grad_query, grad_key, grad_value (contiguous, dtype); key/value rows past
// actual_cmp_seq_kvlen[B-1] and rows of batches without queries receive zeros. P and dS stay fp32.
Status compress_attention_backward_cuda(const CompressAttentionGradParams& p, void* stream);

// Number of CUDA devices visible (0 when there is no driver or no device; never an error).
int cuda_device_count();

}  // namespace nsa
