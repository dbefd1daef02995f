// Stand-in for the CUDA header of the same name in the CPU emulation build (see ../cuda_emu.h).
#pragma once
#include "cuda_emu.h"
