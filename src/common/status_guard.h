// Entry points of the CPU drivers return a Status for every failure, including the ones that surface as C++
// exceptions inside (a workspace allocation, std::bad_alloc; a thread that cannot be started, std::system_error):
// guarded() runs the body and turns those into an error naming the entry point (internal).
#pragma once

#include <exception>
#include <new>
#include <string>

#include "nsa/common.h"

namespace nsa::detail {

// body() -> Status. `workspace` says what the entry point allocates, for the out-of-memory message.
template <typename Body>
Status guarded(const char* entry, const char* workspace, Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Status::Error(std::string(entry) + ": out of memory for the workspace (" + workspace +
                         "); reduce the sizes or the number of threads");
  } catch (const std::exception& e) {
    return Status::Error(std::string(entry) + ": " + e.what());
  }
}

}  // namespace nsa::detail
