# Tests of the compression operator (docs/spec/compress.md); support code in compress_test_util.h:
#   test_hand.cpp        §8 A-D by hand on the reference and every CPU ISA path; the rounding rules; §3 helpers
#   test_validation.cpp  §7 argument rules: named errors, nothing written on failure; wider-than-NPU accepted
#   test_cpu.cpp         the CPU backend on every ISA path and thread count vs the reference (bitwise) and the
#                        independent fp64 model (§9 rule)
#   test_backward.cpp    the backward as the derivative of the forward (adjoint identities, finite differences)
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_hand.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_validation.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_cpu.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_backward.cpp)
