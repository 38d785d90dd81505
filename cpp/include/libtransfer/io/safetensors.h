// The safetensors format (https://github.com/huggingface/safetensors): read by mapping the file,
// write atomically. Torch-free; bindings/safetensors.cpp turns the bytes into torch tensors.
//
// Layout: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON header (may end in spaces), then the
// data section. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
// end]} (offsets relative to the data section) plus an optional "__metadata__": {str: str}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "libtransfer/io/dtype.h"
#include "libtransfer/io/mapped_file.h"

namespace libtransfer::io {

// The largest header we accept, in bytes: the reference implementation's limit (MAX_HEADER_SIZE),
// which stops a corrupt length from making us parse gigabytes of JSON.
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

// The most tensors one file may list, and the most dimensions one tensor may have. A forged header
// within kSafetensorsMaxHeaderBytes could otherwise make the parser build millions of entries or
// million-dimension shapes; both are refused as soon as the parser passes the limit. Real files
// hold at most tens of thousands of tensors and fewer than ten dimensions per tensor.
inline constexpr std::size_t kSafetensorsMaxTensors = std::size_t{1} << 18;  // 262,144
inline constexpr std::size_t kSafetensorsMaxRank = 64;

// Bytes of the little-endian header length that opens every file.
inline constexpr std::size_t kSafetensorsLengthBytes = 8;

// The data section starts at a multiple of this when we write (header padded with spaces), so
// every tensor we write is aligned for zero-copy use.
inline constexpr std::size_t kSafetensorsDataAlignment = 8;

// One tensor's entry in the header: what it is and where its bytes are.
// Plain data; begin/end are byte offsets relative to the data section, end - begin = nbytes().
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  std::uint64_t nbytes() const { return end - begin; }
  // Product of the shape (1 for a scalar, 0 if any dimension is 0).
  std::int64_t numel() const;
};

// An opened safetensors file: the validated header plus the mapped bytes.
// Opening costs one mmap and one JSON parse of the header; tensor data is paged in on first touch.
// Copies are cheap and share the mapping, which stays alive while any copy or mapping() holder
// does.
class SafetensorsFile {
 public:
  // Maps and validates `path`. FileError if it cannot be opened (missing, a directory);
  // InvalidInput naming the file, the tensor where there is one, and the problem otherwise (an
  // empty tensor name is refused, as write_safetensors refuses it).
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return mapping_->path(); }

  // Every tensor, sorted by data offset (the file's layout order; tensors of size 0 that share an
  // offset keep their header order).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // InvalidInput naming the missing tensor and a few of those present.
  const TensorInfo& info(const std::string& name) const;

  // The "__metadata__" object; empty if the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // First byte of a tensor's data inside the mapping (valid while the mapping lives).
  const std::uint8_t* data(const TensorInfo& info) const;
  // The same address, writable: writes change this process's private copy, never the file.
  std::uint8_t* mutable_data(const TensorInfo& info) const;

  // The mapping; hold it to keep data() pointers valid (e.g. in a torch tensor's deleter).
  std::shared_ptr<MappedFile> mapping() const { return mapping_; }
  // Offset of the data section inside the mapping: 8 + header length.
  std::uint64_t data_start() const { return data_start_; }

 private:
  SafetensorsFile() = default;

  std::shared_ptr<MappedFile> mapping_;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: borrowed bytes in row-major (C) order, little-endian.
// Costs nothing to build; `data` must stay valid until write_safetensors returns.
struct TensorView {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  std::uint64_t nbytes = 0;
};

// Writes a safetensors file atomically (AtomicFile: the old file survives any failure).
// Validates first (InvalidInput): names unique, non-empty, valid UTF-8 and not "__metadata__";
// shapes non-negative; nbytes == numel * dtype_size; data non-null when nbytes > 0.
// Layout: tensors sorted by element size (descending), then name, so that after the header (padded
// with spaces to a multiple of 8 bytes) every tensor is aligned to its element size. The header
// lists "__metadata__" first (only when non-empty), then the tensors in layout order.
void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace libtransfer::io
