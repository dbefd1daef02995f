// TEMPORARY (being replaced by the tiled SIMD engine): CPU entry point delegating to the reference.
#include "reference/reference.h"
#include "cpu/isa.h"
namespace nsa {
Status compress_attention_cpu(const CompressAttentionParams& p) {
  CpuIsa isa;
  Status st = cpu::resolve_isa(p.cpu_isa, &isa);
  if (!st.ok()) return st;
  return compress_attention_reference(p);
}
}  // namespace nsa
