// ISA kernels (scalar): being written
