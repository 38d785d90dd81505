// Where the weight test reads a model's tensors from: an in-memory state dict (NamedTensors) or
// safetensors files read lazily through the memory map, one tensor at a time.
//
// The weight test never holds a whole model: it asks the source for the few tensors one unit
// group needs, converted to the compute dtype, and drops them before the next group. A file
// source reads through io::SafetensorsFile's mapping and releases the touched pages after each
// conversion, so the resident memory stays at a few groups' worth, not the file size.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// What a source holds under one name, without loading it. dtype is the safetensors name ("BF16",
// "F32", ...) for files and torch's name ("Float", "BFloat16", ...) for tensors. floating: one of
// f16, bf16, f32, f64 (the dtypes the weight test accepts).
struct TensorMeta {
  std::string name;
  std::vector<std::int64_t> shape;
  std::string dtype;
  bool floating = false;
};

// One model's named tensors, listed up front and materialized on demand. Implementations are
// immutable after construction and safe to read from one thread at a time.
class StateSource {
 public:
  virtual ~StateSource() = default;

  // Every tensor in a stable order (registration order for state dicts; file order, then data
  // offset, for safetensors).
  const std::vector<TensorMeta>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // InvalidInput naming the tensor and the source when it is missing.
  const TensorMeta& meta(const std::string& name) const;

  // The tensor converted to `dtype` (a floating dtype) on `device`: always a fresh tensor that
  // owns its memory, so callers may modify it. Non-floating stored dtypes -> WrongType.
  virtual torch::Tensor load(const std::string& name, torch::ScalarType dtype,
                             const torch::Device& device) const = 0;

  // String metadata: a safetensors "__metadata__" (merged over files) or what the caller gave.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // "state dict (12 tensors)", "model.safetensors": for messages.
  const std::string& describe() const { return description_; }
  // Where the tensors live (CPU for files; the first tensor's device for state dicts).
  virtual torch::Device device() const { return torch::kCPU; }

 protected:
  void set_listing(std::vector<TensorMeta> tensors);

  std::map<std::string, std::string> metadata_;
  std::string description_;

 private:
  std::vector<TensorMeta> tensors_;
  std::map<std::string, std::size_t> index_;
};

using StateSourcePtr = std::shared_ptr<const StateSource>;

// A source over tensors in memory (shared, not copied; load() converts or clones). Duplicate
// names -> InvalidInput. `description` names the model in messages ("model A", ...).
StateSourcePtr state_from_tensors(models::NamedTensors tensors,
                                  std::map<std::string, std::string> metadata = {},
                                  std::string description = "state dict");

// A source over one or more safetensors files (a sharded checkpoint is several files; a name in
// two files -> InvalidInput). Opening costs one mmap and one header parse per file; tensors are
// read when loaded and their pages released after conversion. FileError / InvalidInput as
// io::SafetensorsFile::open.
StateSourcePtr state_from_safetensors(const std::vector<std::string>& paths);

}  // namespace libtransfer::detect
