#include "libtransfer/torch_dtype.h"

namespace libtransfer {

std::optional<c10::ScalarType> torch_dtype(io::Dtype dtype) {
  switch (dtype) {
    case io::Dtype::kBool:
      return c10::kBool;
    case io::Dtype::kU8:
      return c10::kByte;
    case io::Dtype::kI8:
      return c10::kChar;
    case io::Dtype::kI16:
      return c10::kShort;
    case io::Dtype::kI32:
      return c10::kInt;
    case io::Dtype::kI64:
      return c10::kLong;
    case io::Dtype::kF16:
      return c10::kHalf;
    case io::Dtype::kBF16:
      return c10::kBFloat16;
    case io::Dtype::kF32:
      return c10::kFloat;
    case io::Dtype::kF64:
      return c10::kDouble;
    default:
      return std::nullopt;
  }
}

std::optional<io::Dtype> safetensors_dtype(c10::ScalarType type) {
  for (const io::Dtype dtype : io::all_dtypes()) {
    if (torch_dtype(dtype) == type) return dtype;
  }
  return std::nullopt;
}

}  // namespace libtransfer
