# Tests of decode-time compressed attention (docs/spec/decode.md §3); support code in cai_util.h:
#   test_compress_attention_infer.cpp  §5 worked example (Sel', forced blocks, -1 padding, MTP masking) by hand;
#       random cases (TND/BSND, G = 1 and G > 1, D != Dv, P = 1, shuffled pages, -1 padding, MTP) on the reference
#       and every ISA path vs an independent fp64 model, bitwise over thread counts; every §3 rule with its message,
#       nothing written on error
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_compress_attention_infer.cpp)
