# Sources of decode-time compressed attention (torch_npu.npu_nsa_compress_attention_infer, docs/spec/decode.md §3), in
# nsa_core. The CPU backend runs the shared kernel tables of src/cpu (GEMMs, row softmax, box filters, top-k).
list(APPEND NSA_OP_SOURCES
  src/ops/compress_attention_infer/validate.cpp
  src/ops/compress_attention_infer/reference.cpp
  src/ops/compress_attention_infer/cpu.cpp)
