# Sources of the compressed-attention operator (torch_npu.npu_nsa_compress_attention), in nsa_core.
nsa_op_sources(compress_attention
  validate.cpp
  reference_forward.cpp
  reference_backward.cpp
  cpu_forward.cpp
  cpu_backward.cpp)
