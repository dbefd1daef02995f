// src/cuda/backward.cu compiled as C++ against the CPU emulation (cuda_emu.h).
#include "ops/compress_attention/cuda_backward.cu"
