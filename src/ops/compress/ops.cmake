# Sources of the compression operator (torch_npu.npu_nsa_compress / npu_nsa_compress_grad,
# docs/spec/compress.md), in nsa_core. The row kernels (kernels_impl.h) are compiled once per ISA: with the
# baseline flags (kernels_scalar.cpp) and, on x86, with AVX2 and AVX-512 flags; cpu.cpp picks one per call.
# -ffp-contract=off on all of them: products are rounded before they are added (no fused multiply-add), so the
# reference, the scalar path and the SIMD paths add the same rounded values in the same order (bitwise equal
# results, docs/spec/compress.md §9).
nsa_op_sources(compress
  validate.cpp
  reference.cpp
  cpu.cpp
  kernels_scalar.cpp
  OPTIONS -ffp-contract=off)
nsa_op_isa_kernels(compress OPTIONS -ffp-contract=off)
