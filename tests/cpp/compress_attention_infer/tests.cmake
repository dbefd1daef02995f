# Tests of decode-time compressed attention (docs/spec/decode.md §3); support code in cai_util.h:
#   test_compress_attention_infer.cpp  §5 worked example (Sel', forced blocks, -1 padding, MTP masking) by hand;
#       random cases (TND/BSND, G = 1 and G > 1, D != Dv, P = 1, shuffled pages, -1 padding, MTP) on the reference
#       and every ISA path vs an independent fp64 model, bitwise over thread counts; longer rows for the CPU backend's
#       in-place reads (several pages and P.V chunks, odd C, C below one sub-block, masked value lanes, more than 64
#       query rows, G = 1, B = 1 over 1, 2 and 7 threads); every §3 rule with its message, nothing written on error
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_compress_attention_infer.cpp)
