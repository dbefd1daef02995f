# Tests of the decode-time compressed-cache update (docs/spec/decode.md §2); support code in ci_util.h:
#   test_compress_infer.cpp  §5 worked example by hand on the reference and every ISA path; rne ties; random cases
#                            (shuffled pages, P = 1, P not dividing, -1 padding, strided views) bitwise vs the
#                            reference on every ISA and thread count and within §6 of the fp64 model; every §2 rule
#                            with its message, nothing written on error
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_compress_infer.cpp)
