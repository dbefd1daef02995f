# Tests of the compressed-attention operator (docs/spec/compress_attention.md):
#   test_reference_hand.cpp  the reference (and every CPU ISA path) on cases worked out by hand (§8)
#   test_validation.cpp      §6 argument rules: named errors, nothing written on failure
#   test_cpu_backend.cpp     compress_attention_cpu vs the fp64 model on every ISA this host runs
#   test_backward.cpp        backward (§7): reference gradcheck, fully masked rows, CPU vs the fp64 model
#   test_extensions.cpp      the §10 extensions (causal, larger_masks, short_batches): bitwise equal to the spelled-out
#                            calls on the references and every ISA, forward and backward; rules kept with flags off
#   test_threads.cpp         the parallel loops the CPU backend runs on (src/common/threads.h): persistent workers,
#                            concurrent callers, nested loops, exceptions, fork
#   test_isa_choice.cpp      the choice of the default CPU path (src/cpu/isa.h): speed table, calibration, NSA_CPU_ISA
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_reference_hand.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_validation.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_cpu_backend.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_backward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_threads.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_extensions.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_isa_choice.cpp)
