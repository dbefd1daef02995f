# Tests of the selected-attention operator (docs/spec/select_attention.md); select_util.h holds the case builder,
# the runners, the fp64 model and the comparison rules of §10.
#   test_forward.cpp     §10 worked example; references and select_attention_cpu vs the fp64 model on every ISA
#                        path; thread counts, layouts, index dtypes; inputs no entry reaches
#   test_backward.cpp    §8: reference gradcheck (finite differences), §10 gradients, CPU vs the fp64 model,
#                        structural zeros, thread counts, layouts, invisible inf / NaN
#   test_kernels.cpp     the per-ISA rha row kernels against rounding.h; fp16 rha against a double rounding
#   test_validation.cpp  §7 argument rules, forward and backward: named errors, nothing written; accepted bounds
list(APPEND NSA_CPP_TEST_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/test_validation.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_kernels.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_forward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_backward.cpp)
