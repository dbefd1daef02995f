// The public CPU entry points of window_attention (nsa/window_attention.h): the internal ones of cpu.h with the default
// tuning.
#include "nsa/window_attention.h"
#include "ops/window_attention/cpu.h"

nsa::Status nsa::window_attention_cpu(const WindowAttentionParams& p, const CpuOptions& options) {
  return window_cpu::forward(p, options, {});
}

nsa::Status nsa::window_attention_backward_cpu(const WindowAttentionGradParams& p, const CpuOptions& options) {
  return window_cpu::backward(p, options, {});
}
