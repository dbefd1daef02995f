# Sources of the selected-attention operator (torch_npu.npu_nsa_select_attention and its grad,
# docs/spec/select_attention.md), in nsa_core. The row kernels (kernels_impl.h: the conversions rounded half away
# from zero) are compiled once per ISA: with the baseline flags (kernels_scalar.cpp) and, on x86, with AVX2 and
# AVX-512 flags; the GEMMs and softmax steps come from the shared KernelTable (src/cpu/kernels.h).
list(APPEND NSA_OP_SOURCES
  src/ops/select_attention/validate.cpp
  src/ops/select_attention/reference_forward.cpp
  src/ops/select_attention/reference_backward.cpp
  src/ops/select_attention/cpu_forward.cpp
  src/ops/select_attention/cpu_backward.cpp
  src/ops/select_attention/kernels_scalar.cpp)
set_source_files_properties(src/ops/select_attention/kernels_scalar.cpp PROPERTIES COMPILE_OPTIONS "-ffp-contract=off")
if(NSA_X86)
  set_source_files_properties(src/ops/select_attention/kernels_avx2.cpp PROPERTIES
    COMPILE_OPTIONS "-mavx2;-mfma;-mf16c;-ffp-contract=off")
  set_source_files_properties(src/ops/select_attention/kernels_avx512.cpp PROPERTIES
    COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c;-ffp-contract=off")
  list(APPEND NSA_OP_SOURCES src/ops/select_attention/kernels_avx2.cpp src/ops/select_attention/kernels_avx512.cpp)
endif()
