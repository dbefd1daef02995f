// Runtime ISA selection of the CPU backend (internal).
#pragma once

#include "nsa/cpu.h"

namespace nsa::cpu {

// Resolves CpuOptions::isa (-1 = active ISA) to a runnable path, or an error naming options.isa.
Status resolve_isa(int requested, CpuIsa* out);

}  // namespace nsa::cpu
