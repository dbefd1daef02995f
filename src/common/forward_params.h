// The forward's params of an operator call of either direction (internal; C++17, also for the CUDA sources): a
// forward's params are their own, a backward's hold them as `.fwd` (the *GradParams structs of include/nsa/).
#pragma once

#include <type_traits>
#include <utility>

namespace nsa::detail {

template <typename Params, typename = void>
struct HasForwardParams : std::false_type {};
template <typename Params>
struct HasForwardParams<Params, std::void_t<decltype(std::declval<const Params&>().fwd)>> : std::true_type {};

template <typename Params>
const auto& forward_params(const Params& p) {
  if constexpr (HasForwardParams<Params>::value)
    return p.fwd;
  else
    return p;
}

}  // namespace nsa::detail
