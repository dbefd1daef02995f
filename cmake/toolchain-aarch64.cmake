# Cross compilation for 64-bit Arm Linux (aarch64) with Debian's cross toolchain
# (apt-get install g++-aarch64-linux-gnu; its target libraries live in /usr/aarch64-linux-gnu).
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64.cmake ...
# Programs built with it run on an x86 host under qemu-user (apt-get install qemu-user):
#   qemu-aarch64 -L /usr/aarch64-linux-gnu ./nsa_cpp_tests
# scripts/aarch64.sh drives the whole leg (GoogleTest built from source for the target, then the C++ suite).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(NSA_CROSS_TRIPLE aarch64-linux-gnu CACHE STRING "GNU triple of the cross compiler")
set(NSA_CROSS_SYSROOT /usr/${NSA_CROSS_TRIPLE} CACHE PATH "Target libraries (Debian's multiarch cross root)")

set(CMAKE_C_COMPILER ${NSA_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${NSA_CROSS_TRIPLE}-g++)

# Libraries and headers come from the target root (and from prefixes the caller adds to CMAKE_FIND_ROOT_PATH,
# such as the aarch64 GoogleTest that scripts/aarch64.sh installs); programs (build tools) from the host.
# CMAKE_FIND_ROOT_PATH is appended to, not set, so that a caller's -DCMAKE_FIND_ROOT_PATH=... is kept.
list(APPEND CMAKE_FIND_ROOT_PATH ${NSA_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run, ctest and gtest_discover_tests run target programs through qemu-user.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;${NSA_CROSS_SYSROOT})
