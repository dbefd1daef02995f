# Sources of decode-time compressed attention (torch_npu.npu_nsa_compress_attention_infer, docs/spec/decode.md §3), in
# nsa_core. The CPU backend runs the shared kernel tables of src/cpu (GEMMs, row softmax, box filters, top-k) and, on
# x86, its own in-place bf16 P.V kernel (kernels_avx512bf16.cpp, compiled with AVX-512 BF16 flags, run only on the
# avx512bf16 path).
list(APPEND NSA_OP_SOURCES
  src/ops/compress_attention_infer/validate.cpp
  src/ops/compress_attention_infer/reference.cpp
  src/ops/compress_attention_infer/cpu.cpp)
if(NSA_X86)
  set_source_files_properties(src/ops/compress_attention_infer/kernels_avx512bf16.cpp PROPERTIES
    COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512bf16;-mavx2;-mfma;-mf16c")
  list(APPEND NSA_OP_SOURCES src/ops/compress_attention_infer/kernels_avx512bf16.cpp)
endif()
