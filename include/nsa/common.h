// nsa-ops public C++ API, common part (torch-free): element types, Status, strided views and length lists
// shared by every operator header (nsa/<operator>.h). Execution options of the CPU backend are in nsa/cpu.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace nsa {

// Element type of an operator's floating-point tensors. kF64 is a testing extension (gradcheck, fp64 models):
// only the references and the CPU backends accept it, and it does no rounding at all.
enum class DType : int { kBF16 = 0, kF16 = 1, kF32 = 2, kF64 = 3 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

// Result of every entry point: ok() or an error message naming the argument and the expectation.
class Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Error(std::string message) {
    Status s;
    s.ok_ = false;
    s.message_ = std::move(message);
    return s;
  }
  bool ok() const { return ok_; }
  const std::string& message() const { return message_; }

 private:
  bool ok_ = true;
  std::string message_;
};

// A strided 3-D view: element [i][j][k] is at data + i*stride[0] + j*stride[1] + k*stride[2]
// (strides in elements, may be 0; sizes >= 0). The element type is given by the operator's params.
struct Tensor3 {
  const void* data = nullptr;
  int64_t size[3] = {0, 0, 0};
  int64_t stride[3] = {0, 0, 0};
};

// A strided 2-D view with the same conventions (used for weights and index-free 2-D inputs).
struct Tensor2 {
  const void* data = nullptr;
  int64_t size[2] = {0, 0};
  int64_t stride[2] = {0, 0};
};

// A strided 2-D uint8 mask view (bool storage is one byte per element). data == nullptr means "absent".
struct Mask2 {
  const uint8_t* data = nullptr;
  int64_t size[2] = {0, 0};
  int64_t stride[2] = {0, 0};
};

// A list of int64 values (prefix sums of lengths, as torch_npu passes them). data == nullptr means "not given".
struct IntList {
  const int64_t* data = nullptr;
  int64_t size = 0;
};

}  // namespace nsa
