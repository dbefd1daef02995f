# Sources of the compression operator (torch_npu.npu_nsa_compress / npu_nsa_compress_grad,
# docs/spec/compress.md), in nsa_core. The row kernels (kernels_impl.h) are compiled once per ISA: with the
# baseline flags (kernels_scalar.cpp) and, on x86, with AVX2 and AVX-512 flags; cpu.cpp picks one per call.
# -ffp-contract=off on all of them: products are rounded before they are added (no fused multiply-add), so the
# reference, the scalar path and the SIMD paths add the same rounded values in the same order (bitwise equal
# results, docs/spec/compress.md §9).
set(_nsa_compress_sources
  src/ops/compress/validate.cpp
  src/ops/compress/reference.cpp
  src/ops/compress/cpu.cpp
  src/ops/compress/kernels_scalar.cpp)
set_source_files_properties(${_nsa_compress_sources} PROPERTIES COMPILE_OPTIONS "-ffp-contract=off")
list(APPEND NSA_OP_SOURCES ${_nsa_compress_sources})
if(NSA_X86)
  set_source_files_properties(src/ops/compress/kernels_avx2.cpp PROPERTIES
    COMPILE_OPTIONS "-mavx2;-mfma;-mf16c;-ffp-contract=off")
  set_source_files_properties(src/ops/compress/kernels_avx512.cpp PROPERTIES
    COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c;-ffp-contract=off;-Wno-maybe-uninitialized")
  list(APPEND NSA_OP_SOURCES src/ops/compress/kernels_avx2.cpp src/ops/compress/kernels_avx512.cpp)
endif()
