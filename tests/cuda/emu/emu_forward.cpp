// src/cuda/forward.cu compiled as C++ against the CPU emulation (cuda_emu.h).
#include "cuda/forward.cu"
