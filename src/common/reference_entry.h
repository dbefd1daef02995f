// The entry points of an operator's scalar reference (docs/spec/<op>.md line by line, plain loops, one thread; the
// tests' oracle), declared once for every operator (internal).
//
// An operator's reference is written once per entry point, as a template over Acc, the arithmetic type of every
// float32 quantity of its contract:
//   Acc = float:  the contract literally (the public reference for bf16 / fp16 / fp32 inputs);
//   Acc = double: every float32 quantity computed in float64, the roundings to the input dtype that the contract
//                 makes inside the computation kept (from the float32 value), the outputs rounded once: the fp64
//                 model that tolerances are measured against, and the result for fp64 inputs (a testing extension).
//
// ReferenceEntry<kValidate> is the entry point whose arguments kValidate checks (the operator's public
// Status validate_<op>(const Params&, Shape*), shared by every backend): fp32 / fp64 run kValidate, then, if it
// accepted the arguments, run<float> / run<double> with the shape it derived and the input dtype (on an error
// nothing is written and its Status is returned); for_dtype is the public <op>_reference (fp64 inputs take the fp64
// path, every other dtype the float32 one). The operator's reference source defines run<Acc> (an explicit
// specialization of the member template), includes common/reference_entry_defs.h and instantiates the class: the
// steps are compiled there only, every other user links to fp32 / fp64. Its reference.h names the entry points as
// the tests and the CPU backends call them (ForwardReference / ForwardBackwardReference below:
// <op>_reference::forward_fp32(p), ...).
#pragma once

#include "common/forward_params.h"
#include "nsa/common.h"

namespace nsa::detail {

// Params and Shape of a validation function Status (*)(const Params&, Shape*).
template <typename Validate>
struct ValidateSignature;
template <typename P, typename S>
struct ValidateSignature<Status (*)(const P&, S*)> {
  using Params = P;
  using Shape = S;
};

// The dtype that chooses the path: the forward's, also for a backward's params (which hold it as .fwd).
template <typename Params>
DType input_dtype(const Params& p) {
  return forward_params(p).dtype;
}

template <auto kValidate>
struct ReferenceEntry {
  using Params = typename ValidateSignature<decltype(kValidate)>::Params;
  using Shape = typename ValidateSignature<decltype(kValidate)>::Shape;

  // The steps of the contract in Acc arithmetic on arguments kValidate accepted (the operator's reference source);
  // dt is the input dtype (input_dtype(p)).
  template <typename Acc>
  static void run(const Params& p, const Shape& sh, DType dt);
  static Status fp32(const Params& p);  // kValidate, then run<float>
  static Status fp64(const Params& p);  // kValidate, then run<double>
  static Status for_dtype(const Params& p) { return input_dtype(p) == DType::kF64 ? fp64(p) : fp32(p); }

 private:
  template <typename Acc>
  static Status validated_run(const Params& p);
};

// The names of a forward-only operator's reference.
template <auto kValidate>
struct ForwardReference {
  static constexpr auto forward_fp32 = &ReferenceEntry<kValidate>::fp32;
  static constexpr auto forward_fp64 = &ReferenceEntry<kValidate>::fp64;
};

// The names of an operator with a forward and a backward.
template <auto kValidate, auto kValidateBackward>
struct ForwardBackwardReference : ForwardReference<kValidate> {
  static constexpr auto backward_fp32 = &ReferenceEntry<kValidateBackward>::fp32;
  static constexpr auto backward_fp64 = &ReferenceEntry<kValidateBackward>::fp64;
};

}  // namespace nsa::detail
