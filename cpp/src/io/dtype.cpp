#include "libtransfer/io/dtype.h"

#include <array>
#include <utility>

#include "libtransfer/errors.h"

namespace libtransfer::io {
namespace {

struct DtypeFacts {
  Dtype dtype;
  const char* name;
  std::size_t size;
};

// The single table of names and sizes, in enum order (checked by a test against the format).
constexpr std::array<DtypeFacts, 15> kDtypeFacts = {{
    {Dtype::kBool, "BOOL", 1},
    {Dtype::kU8, "U8", 1},
    {Dtype::kI8, "I8", 1},
    {Dtype::kI16, "I16", 2},
    {Dtype::kU16, "U16", 2},
    {Dtype::kI32, "I32", 4},
    {Dtype::kU32, "U32", 4},
    {Dtype::kI64, "I64", 8},
    {Dtype::kU64, "U64", 8},
    {Dtype::kF16, "F16", 2},
    {Dtype::kBF16, "BF16", 2},
    {Dtype::kF32, "F32", 4},
    {Dtype::kF64, "F64", 8},
    {Dtype::kF8E4M3, "F8_E4M3", 1},
    {Dtype::kF8E5M2, "F8_E5M2", 1},
}};

const DtypeFacts& facts(Dtype dtype) {
  const auto index = static_cast<std::size_t>(dtype);
  if (index >= kDtypeFacts.size() || kDtypeFacts[index].dtype != dtype) {
    throw InvalidInput("unknown Dtype value " + std::to_string(index));
  }
  return kDtypeFacts[index];
}

}  // namespace

const std::vector<Dtype>& all_dtypes() {
  static const std::vector<Dtype> all = [] {
    std::vector<Dtype> out;
    for (const auto& f : kDtypeFacts) out.push_back(f.dtype);
    return out;
  }();
  return all;
}

std::string dtype_name(Dtype dtype) { return facts(dtype).name; }

std::size_t dtype_size(Dtype dtype) { return facts(dtype).size; }

std::optional<Dtype> parse_dtype(const std::string& name) {
  for (const auto& f : kDtypeFacts) {
    if (name == f.name) return f.dtype;
  }
  return std::nullopt;
}

Dtype dtype_from_name(const std::string& name) {
  if (auto dtype = parse_dtype(name)) return *dtype;
  throw InvalidInput("unknown safetensors dtype '" + name + "'; expected one of " +
                     known_dtype_names());
}

std::string known_dtype_names() {
  std::string out;
  for (const auto& f : kDtypeFacts) {
    if (!out.empty()) out += ", ";
    out += f.name;
  }
  return out;
}

}  // namespace libtransfer::io
