// Runtime ISA selection of the CPU backend (internal).
#pragma once

#include "nsa/compress_attention.h"

namespace nsa::cpu {

// Resolves params.cpu_isa (-1 = active ISA) to a runnable path, or an error naming cpu_isa.
Status resolve_isa(int requested, CpuIsa* out);

}  // namespace nsa::cpu
