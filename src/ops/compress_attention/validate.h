// Internal argument checks of compress_attention beyond the public validate_* functions (validate.cpp).
#pragma once

#include "nsa/compress_attention.h"

namespace nsa {

// The sizes that the CPU drivers' 64-bit workspace arithmetic holds (reached beyond only with stride-0 views of a
// small buffer): an error naming `entry` otherwise.
Status check_cpu_workspace_sizes(const CompressAttentionShape& sh, const char* entry);

}  // namespace nsa
