# Sources of the decode-time compressed-cache update (torch_npu.npu_nsa_compress_infer, docs/spec/decode.md §2), in
# nsa_core. The CPU backend runs the compression operator's per-ISA row kernels (src/ops/compress/kernels*.cpp),
# so this operator needs `compress` in NSA_OPERATORS. -ffp-contract=off: products are rounded before they are
# added, as in those kernels, so the reference and every ISA path give the same bits.
nsa_op_sources(compress_infer
  validate.cpp
  reference.cpp
  cpu.cpp
  OPTIONS -ffp-contract=off)
if(NOT "compress" IN_LIST NSA_OPERATORS)
  message(FATAL_ERROR "NSA_OPERATORS: compress_infer uses the row kernels of compress; add compress to the list")
endif()
