# Sources of the selected-attention operator (torch_npu.npu_nsa_select_attention and its grad), in nsa_core.
list(APPEND NSA_OP_SOURCES
  src/ops/select_attention/validate.cpp
  src/ops/select_attention/reference_forward.cpp
  src/ops/select_attention/reference_backward.cpp
  src/ops/select_attention/cpu_forward.cpp
  src/ops/select_attention/cpu_backward.cpp)
