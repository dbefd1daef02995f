// src/cuda/common.cu compiled as C++ against the CPU emulation (cuda_emu.h).
#include "cuda/common.cu"
