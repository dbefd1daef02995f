# Sources of decode-time compressed attention (torch_npu.npu_nsa_compress_attention_infer, docs/spec/decode.md §3), in
# nsa_core. The CPU backend runs the shared kernel tables of src/cpu (GEMMs, row softmax, box filters, top-k) and, on
# x86, its own in-place bf16 P.V kernel (kernels_avx512bf16.cpp, compiled with AVX-512 BF16 flags, run only on the
# avx512bf16 path).
nsa_op_sources(compress_attention_infer
  validate.cpp
  reference.cpp
  cpu.cpp)
if(NSA_X86)
  nsa_op_sources(compress_attention_infer kernels_avx512bf16.cpp OPTIONS ${NSA_AVX512_FLAGS} -mavx512bf16)
endif()
