// The public CPU entry points of select_attention (nsa/select_attention.h): the internal ones of cpu.h with the default
// tuning.
#include "nsa/select_attention.h"
#include "ops/select_attention/cpu.h"

nsa::Status nsa::select_attention_cpu(const SelectAttentionParams& p, const CpuOptions& options) {
  return select_cpu::forward(p, options, {});
}

nsa::Status nsa::select_attention_backward_cpu(const SelectAttentionGradParams& p, const CpuOptions& options) {
  return select_cpu::backward(p, options, {});
}
