// ISA kernels (avx2): being written
