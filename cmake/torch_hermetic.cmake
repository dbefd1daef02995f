# find_package(Torch) for the PyTorch binding, hermetically: the binding links only the torch it is configured
# with, whatever other torch the system has. Included by torch_binding/CMakeLists.txt instead of a plain
# find_package(Torch REQUIRED); sets what that sets (TORCH_LIBRARIES, TORCH_INSTALL_PREFIX, ...) plus
#   NSA_TORCH_LIBDIR          <torch>/lib of that torch, symbolic links resolved
#   NSA_TORCH_LINK_LIBRARIES  TORCH_LIBRARIES with every file inside NSA_TORCH_LIBDIR
# or stops the configuration with the list of offending files.
#
# Why: with a second torch on the system (Debian's libtorch-dev: torch 1.13 in /usr/lib/<arch>, its CMake
# packages in /usr/lib/<arch>/cmake), torch's own CMake package mixes the two:
#  * TorchConfig.cmake loads Caffe2 (the imported targets c10, torch_cpu, torch) with
#    find_package(Caffe2 PATHS <its own dir>/../Caffe2), and the system directories come before PATHS: unless
#    CMAKE_PREFIX_PATH happens to hold torch/share/cmake, the system's Caffe2 is loaded;
#  * it looks c10 and torch up with find_library(<name> PATHS <torch>/lib), same order: c10_LIBRARY and
#    TORCH_LIBRARY become /usr/lib/<arch>/libc10.so and libtorch.so.
# The binding then needs two c10 libraries (libc10.so.1.13 and torch's libc10.so) and crashes on its first
# exception. tests/python/test_binding_deps.py checks the built library's resolved dependencies.
#
# How:
#  1. Which torch: Torch_DIR when given; else the torch that the configured Python imports
#     (Python3_EXECUTABLE: scripts/setup.sh and scikit-build-core set it); else CMake's search.
#  2. Caffe2_DIR is set to the Caffe2 package next to Torch_DIR, before TorchConfig.cmake looks for one.
#  3. After find_package(Torch): every library file cached or listed outside <torch>/lib of which <torch>/lib
#     has a file of the same name is replaced by that file (in the cache: c10_LIBRARY, TORCH_LIBRARY, ...,
#     and in the link list); any other file outside <torch>/lib that the link list names (directly, or as an
#     imported target's location) is an error.
if(NOT Torch_DIR AND Python3_EXECUTABLE)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _nsa_torch_cmake RESULT_VARIABLE _nsa_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_nsa_rc EQUAL 0 AND EXISTS "${_nsa_torch_cmake}/Torch/TorchConfig.cmake")
    set(Torch_DIR "${_nsa_torch_cmake}/Torch" CACHE PATH "The directory containing TorchConfig.cmake")
    message(STATUS "torch binding: torch of ${Python3_EXECUTABLE}: Torch_DIR=${Torch_DIR}")
  endif()
endif()
if(Torch_DIR AND EXISTS "${Torch_DIR}/../Caffe2/Caffe2Config.cmake")
  get_filename_component(_nsa_caffe2 "${Torch_DIR}/../Caffe2" ABSOLUTE)
  set(Caffe2_DIR "${_nsa_caffe2}" CACHE PATH "The directory containing Caffe2Config.cmake" FORCE)
endif()
find_package(Torch REQUIRED)
get_filename_component(NSA_TORCH_LIBDIR "${TORCH_INSTALL_PREFIX}/lib" REALPATH)

# out = file when it lies inside <torch>/lib (symbolic links resolved), else <torch>/lib/<its name> when that
# exists, else "".
function(nsa_torch_own_copy file out)
  get_filename_component(_real "${file}" REALPATH)
  cmake_path(IS_PREFIX NSA_TORCH_LIBDIR "${_real}" NORMALIZE _inside)
  get_filename_component(_name "${file}" NAME)
  if(_inside)
    set(${out} "${file}" PARENT_SCOPE)
  elseif(EXISTS "${NSA_TORCH_LIBDIR}/${_name}")
    set(${out} "${NSA_TORCH_LIBDIR}/${_name}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

# out = the files linked through an imported target: its locations and, recursively, the targets and paths of
# its link interface (generator expressions and linker flags are not followed).
function(nsa_torch_target_files target out)
  set(_files "")
  set(_todo ${target})
  set(_seen "")
  while(_todo)
    list(POP_FRONT _todo _t)
    if(_t IN_LIST _seen)
      continue()
    endif()
    list(APPEND _seen ${_t})
    get_target_property(_imported ${_t} IMPORTED)
    if(NOT _imported)
      continue()
    endif()
    get_target_property(_type ${_t} TYPE)
    if(NOT _type STREQUAL "INTERFACE_LIBRARY")
      set(_props IMPORTED_LOCATION)
      get_target_property(_configs ${_t} IMPORTED_CONFIGURATIONS)
      foreach(_c IN LISTS _configs)
        string(TOUPPER "IMPORTED_LOCATION_${_c}" _c)
        list(APPEND _props ${_c})
      endforeach()
      foreach(_prop IN LISTS _props)
        get_target_property(_loc ${_t} ${_prop})
        if(_loc)
          list(APPEND _files "${_loc}")
        endif()
      endforeach()
    endif()
    get_target_property(_deps ${_t} INTERFACE_LINK_LIBRARIES)
    foreach(_d IN LISTS _deps)
      if(TARGET "${_d}")
        list(APPEND _todo "${_d}")
      elseif(IS_ABSOLUTE "${_d}" AND NOT _d MATCHES "\\$<")
        list(APPEND _files "${_d}")
      endif()
    endforeach()
  endwhile()
  set(${out} "${_files}" PARENT_SCOPE)
endfunction()

# The cache entries TorchConfig.cmake's find_library calls filled (c10_LIBRARY, TORCH_LIBRARY, ...).
get_property(_nsa_cache_vars DIRECTORY PROPERTY CACHE_VARIABLES)
foreach(_v IN LISTS _nsa_cache_vars)
  get_property(_type CACHE ${_v} PROPERTY TYPE)
  if(_type STREQUAL "FILEPATH" AND IS_ABSOLUTE "${${_v}}" AND "${${_v}}" MATCHES "/lib[^/]*\\.(so|a)(\\.[0-9.]+)?$")
    nsa_torch_own_copy("${${_v}}" _own)
    if(_own AND NOT _own STREQUAL "${${_v}}")
      message(STATUS "torch binding: ${_v}=${${_v}} is not the configured torch's; using ${_own}")
      get_property(_doc CACHE ${_v} PROPERTY HELPSTRING)
      set(${_v} "${_own}" CACHE FILEPATH "${_doc}" FORCE)
    endif()
  endif()
endforeach()

set(NSA_TORCH_LINK_LIBRARIES "")
set(_nsa_foreign "")
foreach(_lib IN LISTS TORCH_LIBRARIES)
  if(TARGET "${_lib}")
    nsa_torch_target_files(${_lib} _files)
    foreach(_f IN LISTS _files)
      nsa_torch_own_copy("${_f}" _own)
      if(NOT _own STREQUAL "${_f}")
        list(APPEND _nsa_foreign "${_f} (location of imported target ${_lib} or of its link interface)")
      endif()
    endforeach()
  elseif(IS_ABSOLUTE "${_lib}")
    nsa_torch_own_copy("${_lib}" _own)
    if(_own)
      set(_lib "${_own}")
    else()
      set(_held_by "")
      foreach(_v IN LISTS _nsa_cache_vars)
        if("${${_v}}" STREQUAL "${_lib}")
          set(_held_by " (cache variable ${_v})")
        endif()
      endforeach()
      list(APPEND _nsa_foreign "${_lib}${_held_by}")
    endif()
  endif()
  list(APPEND NSA_TORCH_LINK_LIBRARIES "${_lib}")
endforeach()
if(_nsa_foreign)
  list(JOIN _nsa_foreign "\n  " _nsa_foreign)
  message(FATAL_ERROR "torch binding: the torch package found (Torch_DIR=${Torch_DIR}) would link files "
    "outside its own library directory ${NSA_TORCH_LIBDIR}:\n  ${_nsa_foreign}\n"
    "(its Caffe2 package: Caffe2_DIR=${Caffe2_DIR}). A binary linking two torch installations crashes. "
    "Configure with -DTorch_DIR=<the torch package to build against> (here ${Torch_DIR}; Caffe2_DIR is then "
    "taken next to it), or set the cache variable named above to torch's own file.")
endif()
