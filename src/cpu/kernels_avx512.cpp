// ISA kernels (avx512): being written
