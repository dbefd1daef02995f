# Sources of decode-time compressed attention (torch_npu.npu_nsa_compress_attention_infer, docs/spec/decode.md §3), in
# nsa_core. The CPU backend runs the shared kernel tables of src/cpu (GEMMs, the in-place bf16 P.V, row softmax,
# box filters, top-k).
nsa_op_sources(compress_attention_infer
  validate.cpp
  reference.cpp
  cpu.cpp)
