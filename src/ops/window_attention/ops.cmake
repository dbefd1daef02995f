# Sources of the sliding-window attention operator (torch_npu.npu_fusion_attention / npu_fusion_attention_grad,
# TND subset; docs/spec/window_attention.md), in nsa_core.
list(APPEND NSA_OP_SOURCES
  src/ops/window_attention/validate.cpp
  src/ops/window_attention/reference_forward.cpp
  src/ops/window_attention/reference_backward.cpp
  src/ops/window_attention/cpu_common.cpp
  src/ops/window_attention/cpu_forward.cpp
  src/ops/window_attention/cpu_backward.cpp)
