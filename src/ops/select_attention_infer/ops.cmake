# Sources of the decode selected-attention operator (torch_npu.npu_nsa_select_attention_infer,
# docs/spec/decode.md §4), in nsa_core. paged.h (header-only) holds the paged gather and the tile worker that
# paged_window_attention shares; the GEMMs and softmax row steps come from the shared KernelTable (src/cpu/kernels.h).
nsa_op_sources(select_attention_infer
  validate.cpp
  reference.cpp
  cpu.cpp)
