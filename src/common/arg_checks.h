// Building blocks of the operators' argument checks (internal): every failure is a Status whose message names the
// argument and says what was expected.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "nsa/common.h"

namespace nsa::detail {

// An error whose message is the arguments streamed one after the other.
template <typename... Args>
Status arg_error(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return Status::Error(os.str());
}

// "[s0, s1, ...]" of n sizes.
inline std::string shape_str(const int64_t* s, int n) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < n; ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

// The first null pointer of a list of (pointer, argument name) pairs as "<name> must not be null".
inline Status check_not_null(std::initializer_list<std::pair<const void*, const char*>> args) {
  for (const auto& [ptr, name] : args)
    if (ptr == nullptr) return arg_error(name, " must not be null");
  return Status::Ok();
}

// ceil(a / b) for a >= 0, b > 0 without overflow ((a + b - 1) / b overflows for a near INT64_MAX, reachable with
// stride-0 views).
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace nsa::detail
