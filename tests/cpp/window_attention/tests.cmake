# Tests of the sliding-window attention operator (docs/spec/window_attention.md):
#   test_reference_hand.cpp  the reference (and the CPU backend on every ISA) on cases worked out by hand (§10)
#   test_validation.cpp      argument rules of §2-§4/§9: named errors, nothing written on failure
#   test_cpu_forward.cpp     window_attention_cpu vs the fp64 model on every ISA, thread counts, chunked paths
#   test_backward.cpp        backward (§7): reference vs finite differences and the fp64 model, CPU vs the model
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_reference_hand.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_validation.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_cpu_forward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_backward.cpp)
