// ISA kernels (avx512bf16): being written
