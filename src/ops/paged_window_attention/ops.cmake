# Sources of the paged decode sliding-window attention (nsa_ops.paged_window_attention, docs/spec/decode.md §9),
# in nsa_core. The paged gather and the tile worker are src/ops/select_attention_infer/paged.h (header-only).
nsa_op_sources(paged_window_attention
  validate.cpp
  reference.cpp
  cpu.cpp)
