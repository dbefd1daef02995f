# Sources of the compression operator (torch_npu.npu_nsa_compress / npu_nsa_compress_grad,
# docs/spec/compress.md), in nsa_core. The row kernels (kernels_impl.h) are compiled once per ISA: with the
# baseline flags (kernels_scalar.cpp) and, on x86, with AVX2, AVX-512 and AVX-512 BF16 flags; cpu.cpp picks one per
# call.
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
# x86: the avx512bf16 path's table (the avx512 kernels with vcvtne2ps2bf16 for the gradients' bf16 stores)
if(NSA_X86)
  set_source_files_properties(src/ops/compress/kernels_avx512bf16.cpp PROPERTIES
    COMPILE_OPTIONS "${NSA_AVX512_FLAGS};-mavx512bf16;-ffp-contract=off")
  list(APPEND NSA_OP_SOURCES src/ops/compress/kernels_avx512bf16.cpp)
endif()
