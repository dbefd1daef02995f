# Sources of the compressed-attention operator (torch_npu.npu_nsa_compress_attention), in nsa_core.
list(APPEND NSA_OP_SOURCES
  src/ops/compress_attention/validate.cpp
  src/ops/compress_attention/reference_forward.cpp
  src/ops/compress_attention/reference_backward.cpp
  src/ops/compress_attention/cpu_forward.cpp
  src/ops/compress_attention/cpu_backward.cpp)
