# Helpers of the operators' source lists (src/ops/<op>/ops.cmake, included by the root CMakeLists.txt after this
# file). Each appends to NSA_OP_SOURCES, the sources of nsa_core, in the scope of the root CMakeLists.txt.

# Target flags of the x86 per-ISA sources (src/cpu/arch/x86 and the operators' kernels_avx2.cpp /
# kernels_avx512.cpp): each such source is compiled once with its ISA's flags, the rest of the library for the
# baseline of the target.
set(NSA_AVX2_FLAGS -mavx2 -mfma -mf16c)
set(NSA_AVX512_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -Wno-maybe-uninitialized)

# nsa_op_sources(<op> <file>... [OPTIONS <flag>...])
# Appends src/ops/<op>/<file> for each file, compiled with the extra flags OPTIONS (e.g. -ffp-contract=off).
function(nsa_op_sources op)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "OPTIONS")
  list(TRANSFORM ARG_UNPARSED_ARGUMENTS PREPEND src/ops/${op}/ OUTPUT_VARIABLE _files)
  if(ARG_OPTIONS)
    set_source_files_properties(${_files} PROPERTIES COMPILE_OPTIONS "${ARG_OPTIONS}")
  endif()
  set(NSA_OP_SOURCES ${NSA_OP_SOURCES} ${_files} PARENT_SCOPE)
endfunction()

# nsa_op_isa_kernels(<op> [OPTIONS <flag>...])
# On x86: appends src/ops/<op>/kernels_avx2.cpp and kernels_avx512.cpp (the operator's row kernels compiled for
# AVX2 and AVX-512), with NSA_AVX2_FLAGS / NSA_AVX512_FLAGS plus OPTIONS. Elsewhere: nothing (the operator's
# kernels_scalar.cpp, listed with nsa_op_sources, serves every CPU).
function(nsa_op_isa_kernels op)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "OPTIONS")
  if(NOT NSA_X86)
    return()
  endif()
  set_source_files_properties(src/ops/${op}/kernels_avx2.cpp PROPERTIES
    COMPILE_OPTIONS "${NSA_AVX2_FLAGS};${ARG_OPTIONS}")
  set_source_files_properties(src/ops/${op}/kernels_avx512.cpp PROPERTIES
    COMPILE_OPTIONS "${NSA_AVX512_FLAGS};${ARG_OPTIONS}")
  set(NSA_OP_SOURCES ${NSA_OP_SOURCES} src/ops/${op}/kernels_avx2.cpp src/ops/${op}/kernels_avx512.cpp PARENT_SCOPE)
endfunction()
