// IDX files, the format of MNIST and Fashion-MNIST: a 4-byte magic (two zero bytes, a type code,
// a dimension count), the dimensions as big-endian u32, then the elements, big-endian, row-major.
// Plain and gzip-compressed files are read transparently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace libtransfer::io {

// The element types IDX defines; the enumerator values are the type codes in the magic.
enum class IdxType : std::uint8_t {
  kU8 = 0x08,
  kI8 = 0x09,
  kI16 = 0x0B,
  kI32 = 0x0C,
  kF32 = 0x0D,
  kF64 = 0x0E,
};

// Bounds that turn a corrupt or hostile header into an error instead of a huge allocation.
// MNIST uses 1 or 3 dimensions; 8 leaves room for any real use.
constexpr std::size_t kIdxMaxDims = 8;
// 16 GiB of element data, far above any IDX data set (Fashion-MNIST train images: 47 MB).
constexpr std::uint64_t kIdxMaxDataBytes = std::uint64_t{1} << 34;

// Size in bytes of one element of `type` (1, 2, 4 or 8).
std::size_t idx_element_size(IdxType type);
// Short name of `type`: "u8", "i8", "i16", "i32", "f32" or "f64".
const char* idx_type_name(IdxType type);

// An n-dimensional array as stored in an IDX file, with its elements in host byte order.
// Owns its bytes (one contiguous buffer, row-major); moving it is cheap, copying copies the data.
struct IdxArray {
  IdxType type = IdxType::kU8;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;  // numel() * idx_element_size(type) bytes, host-endian

  std::int64_t numel() const;
};

// Reads a plain or gzip-compressed IDX file. Memory: the data plus one read chunk; a gzip bomb
// is stopped one byte past the size the header announces.
// Throws FileError if the file cannot be opened or read, InvalidInput (naming the file and the
// problem) if it is too short, has a bad magic or type code, a dimension count of 0 or above
// kIdxMaxDims, more than kIdxMaxDataBytes of data, fewer or more data bytes than the header
// says, or a corrupt gzip stream.
IdxArray read_idx(const std::string& path);

// Writes `array` as an IDX file, atomically (see AtomicFile); gzip-compressed if `gzip`.
// Throws InvalidInput if the shape is empty, has more than kIdxMaxDims dimensions, a negative
// dimension or one above 2^32 - 1, or does not match the size of `data`; FileError on I/O errors.
void write_idx(const std::string& path, const IdxArray& array, bool gzip = false);

// The same from borrowed memory: `data` holds `bytes` host-endian bytes of `type`, row-major.
void write_idx(const std::string& path, IdxType type, const std::vector<std::int64_t>& shape,
               const void* data, std::size_t bytes, bool gzip = false);

}  // namespace libtransfer::io
