// Conversions between the io layer's safetensors dtypes and torch's, in one place for every
// reader and writer (the io layer itself stays torch-free). Both directions are a switch: O(1),
// no allocation.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "libtransfer/io/dtype.h"

namespace libtransfer {

// The torch dtype of a safetensors dtype; nullopt for U16, U32, U64 and the F8 types, which
// torch 1.13 does not have.
std::optional<c10::ScalarType> torch_dtype(io::Dtype dtype);

// The safetensors dtype of a torch dtype; nullopt for complex, quantized and other dtypes that
// safetensors cannot hold.
std::optional<io::Dtype> safetensors_dtype(c10::ScalarType type);

}  // namespace libtransfer
