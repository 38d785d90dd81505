// Element types of the safetensors format, with their names and sizes. Torch-free, so the io layer
// and its tests can use them; the bindings map them to torch dtypes.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace libtransfer::io {

// One element type of the safetensors format (the names in the header are in the comments).
// A plain enum: free to copy and compare; only the types torch 1.13 has reach torch.
enum class Dtype {
  kBool,    // BOOL, 1 byte
  kU8,      // U8
  kI8,      // I8
  kI16,     // I16
  kU16,     // U16 (not in torch 1.13)
  kI32,     // I32
  kU32,     // U32 (not in torch 1.13)
  kI64,     // I64
  kU64,     // U64 (not in torch 1.13)
  kF16,     // F16, IEEE half
  kBF16,    // BF16, bfloat16
  kF32,     // F32
  kF64,     // F64
  kF8E4M3,  // F8_E4M3 (not in torch 1.13)
  kF8E5M2,  // F8_E5M2 (not in torch 1.13)
};

// Every Dtype, in enum order (for tests and error messages).
const std::vector<Dtype>& all_dtypes();

// The header name of a dtype, e.g. "BF16".
std::string dtype_name(Dtype dtype);

// The dtype with that header name (case-sensitive, as the format requires); nullopt if unknown.
std::optional<Dtype> parse_dtype(const std::string& name);

// Like parse_dtype, but an unknown name raises InvalidInput listing the known names.
Dtype dtype_from_name(const std::string& name);

// Bytes per element (1, 2, 4 or 8).
std::size_t dtype_size(Dtype dtype);

// "BOOL, U8, I8, ..." (for error messages).
std::string known_dtype_names();

}  // namespace libtransfer::io
