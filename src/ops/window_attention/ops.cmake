# Sources of the sliding-window attention operator (torch_npu.npu_fusion_attention / npu_fusion_attention_grad,
# TND subset; docs/spec/window_attention.md), in nsa_core.
nsa_op_sources(window_attention
  validate.cpp
  reference_forward.cpp
  reference_backward.cpp
  cpu_common.cpp
  cpu_forward.cpp
  cpu_backward.cpp
  cpu_entry_points.cpp)
