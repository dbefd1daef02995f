# Sources of the selected-attention operator (torch_npu.npu_nsa_select_attention and its grad,
# docs/spec/select_attention.md), in nsa_core. The row kernels (kernels_impl.h: the conversions rounded half away
# from zero) are compiled once per ISA: with the baseline flags (kernels_scalar.cpp) and, on x86, with AVX2 and
# AVX-512 flags; the GEMMs and softmax steps come from the shared KernelTable (src/cpu/kernels.h).
nsa_op_sources(select_attention
  validate.cpp
  reference_forward.cpp
  reference_backward.cpp
  cpu_forward.cpp
  cpu_backward.cpp
  cpu_entry_points.cpp)
nsa_op_sources(select_attention kernels_scalar.cpp OPTIONS -ffp-contract=off)
nsa_op_isa_kernels(select_attention OPTIONS -ffp-contract=off)
