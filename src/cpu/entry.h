// The steps every operator's optimized CPU entry point takes before any work (internal):
//   1. validate the params (the operator's validate_*: its Status names the argument; it fills the shape);
//   2. resolve CpuOptions::isa to a runnable path (resolve_isa: an error names options.isa).
// Nothing is written by either step, so an error leaves every output untouched.
#pragma once

#include "common/reference_entry.h"
#include "common/status_guard.h"
#include "cpu/isa.h"
#include "nsa/common.h"
#include "nsa/cpu.h"

namespace nsa::cpu {

// validate(p, shape) then resolve_isa(options.isa, isa); the first error is returned.
template <typename Params, typename Shape>
inline Status validate_and_resolve(Status (*validate)(const Params&, Shape*), const Params& p,
                                   const CpuOptions& options, Shape* shape, CpuIsa* isa) {
  const Status st = validate(p, shape);
  if (!st.ok()) return st;
  return resolve_isa(options.isa, isa);
}

// The skeleton of an entry point that has an fp64 reference path: inside detail::guarded(entry, workspace, ...)
// (exceptions, a workspace allocation or a thread that cannot start, become an error naming `entry`), the two
// steps above, then fp64(p) for fp64 inputs (detail::input_dtype: a backward's is its forward's; a testing
// extension: the fp64 reference), else body(shape, isa), the optimized path, whose Status is returned.
template <typename Params, typename Shape, typename Body>
inline Status run_entry(const char* entry, const char* workspace, Status (*validate)(const Params&, Shape*),
                        Status (*fp64)(const Params&), const Params& p, const CpuOptions& options, Body&& body) {
  return detail::guarded(entry, workspace, [&]() -> Status {
    Shape sh;
    CpuIsa isa;
    const Status st = validate_and_resolve(validate, p, options, &sh, &isa);
    if (!st.ok()) return st;
    if (detail::input_dtype(p) == DType::kF64) return fp64(p);
    return body(static_cast<const Shape&>(sh), isa);
  });
}

}  // namespace nsa::cpu
