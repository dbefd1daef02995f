list(APPEND NSA_CPP_TEST_SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_select_attention_infer.cpp)
