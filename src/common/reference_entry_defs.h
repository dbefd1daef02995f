// Out-of-class definitions of ReferenceEntry (common/reference_entry.h), internal: included only by the reference
// source that defines run<Acc> for its entry point and instantiates ReferenceEntry<kValidate>, so the steps are
// instantiated there and nowhere else.
#pragma once

#include "common/reference_entry.h"

namespace nsa::detail {

// The argument checks every backend shares first: on an error nothing is written and their Status is returned.
template <auto kValidate>
template <typename Acc>
Status ReferenceEntry<kValidate>::validated_run(const Params& p) {
  Shape sh;
  const Status st = kValidate(p, &sh);
  if (!st.ok()) return st;
  run<Acc>(p, sh, input_dtype(p));
  return Status::Ok();
}

template <auto kValidate>
Status ReferenceEntry<kValidate>::fp32(const Params& p) {
  return validated_run<float>(p);
}
template <auto kValidate>
Status ReferenceEntry<kValidate>::fp64(const Params& p) {
  return validated_run<double>(p);
}

}  // namespace nsa::detail
