#include "libtransfer/io/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"

namespace libtransfer::io {
namespace {

// Bytes read or converted per step: large enough to amortize zlib calls, small enough that a
// bogus header costs no more than this before the file proves it holds the data.
constexpr std::size_t kChunkBytes = std::size_t{4} << 20;
// Up-front reservation cap: a header may lie about the size, so beyond this the buffer grows
// only as data actually arrives.
constexpr std::size_t kMaxReserveBytes = std::size_t{64} << 20;
// zlib's internal input buffer for reading (default 8 KiB); bigger is faster on large files.
constexpr unsigned kGzBufferBytes = 1u << 17;
constexpr std::size_t kMagicBytes = 4;

bool host_is_little_endian() {
  const std::uint16_t probe = 1;
  std::uint8_t first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// Converts between big-endian (file) and host order, in place; the same operation both ways.
void big_endian_to_host(std::uint8_t* bytes, std::size_t size, std::size_t element_size) {
  if (element_size == 1 || !host_is_little_endian()) return;
  for (std::size_t i = 0; i + element_size <= size; i += element_size) {
    std::reverse(bytes + i, bytes + i + element_size);
  }
}

std::uint32_t read_u32_be(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

void append_u32_be(std::string& out, std::uint32_t v) {
  out.push_back(static_cast<char>((v >> 24) & 0xFF));
  out.push_back(static_cast<char>((v >> 16) & 0xFF));
  out.push_back(static_cast<char>((v >> 8) & 0xFF));
  out.push_back(static_cast<char>(v & 0xFF));
}

std::string hex_byte(unsigned v) {
  char text[8];
  std::snprintf(text, sizeof text, "0x%02X", v & 0xFFu);
  return text;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += " x ";
    out += std::to_string(shape[i]);
  }
  return out.empty() ? "(no dimensions)" : out;
}

std::optional<IdxType> idx_type_from_code(std::uint8_t code) {
  switch (code) {
    case 0x08:
    case 0x09:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x0E:
      return static_cast<IdxType>(code);
    default:
      return std::nullopt;
  }
}

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw InvalidInput("IDX file '" + path + "': " + problem);
}

// Bytes of data a shape holds; InvalidInput (via `fail`) on overflow or above kIdxMaxDataBytes.
std::uint64_t data_bytes_for(const std::string& path, const std::vector<std::int64_t>& shape,
                             IdxType type) {
  const std::uint64_t element = idx_element_size(type);
  std::uint64_t numel = 1;
  for (const std::int64_t dim : shape) {
    const auto d = static_cast<std::uint64_t>(dim);
    // Checked before multiplying, so the product never overflows and stays within the limit.
    if (d != 0 && numel > kIdxMaxDataBytes / element / d) {
      fail(path, "shape " + shape_text(shape) + " of " + idx_type_name(type) +
                     " elements is above the limit of " + std::to_string(kIdxMaxDataBytes) +
                     " data bytes");
    }
    numel *= d;
  }
  return numel * element;
}

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads up to `size` bytes (fewer only at the end of the stream); throws on read errors and on
// corrupt or truncated gzip streams.
std::size_t read_up_to(gzFile file, const std::string& path, void* buffer, std::size_t size) {
  auto* out = static_cast<std::uint8_t*>(buffer);
  std::size_t done = 0;
  while (done < size) {
    const auto want = static_cast<unsigned>(std::min<std::size_t>(size - done, kChunkBytes));
    const int got = gzread(file, out + done, want);
    if (got > 0) done += static_cast<std::size_t>(got);
    if (got == static_cast<int>(want)) continue;
    int code = Z_OK;
    const char* message = gzerror(file, &code);
    if (code == Z_ERRNO) {
      throw FileError("cannot read '" + path + "': " + std::strerror(errno));
    }
    if (code != Z_OK) {
      // zlib prefixes its message with the path, which fail() already names.
      std::string reason = message;
      if (reason.rfind(path + ": ", 0) == 0) reason.erase(0, path.size() + 2);
      fail(path, "corrupt or truncated gzip stream: " + reason);
    }
    if (got <= 0) break;  // end of stream
  }
  return done;
}

// Where the encoded bytes of an IDX file go: straight to the file, or through deflate (gzip).
class IdxSink {
 public:
  IdxSink(AtomicFile& file, bool gzip) : file_(file), gzip_(gzip) {
    if (!gzip_) return;
    // windowBits 15 + 16 asks for a gzip wrapper; the header's mtime stays 0, so output is
    // deterministic.
    if (deflateInit2(&stream_, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK) {
      throw FileError("cannot start gzip compression for '" + file_.path() + "'");
    }
    started_ = true;
  }
  ~IdxSink() {
    if (started_) deflateEnd(&stream_);
  }
  IdxSink(const IdxSink&) = delete;
  IdxSink& operator=(const IdxSink&) = delete;

  void write(const void* data, std::size_t size) {
    if (!gzip_) {
      file_.write(data, size);
      return;
    }
    const auto* in = static_cast<const std::uint8_t*>(data);
    while (size > 0) {
      const auto step = static_cast<uInt>(std::min<std::size_t>(size, kChunkBytes));
      stream_.next_in = const_cast<Bytef*>(in);
      stream_.avail_in = step;
      deflate_all(Z_NO_FLUSH);
      in += step;
      size -= step;
    }
  }

  void finish() {
    if (gzip_) deflate_all(Z_FINISH);
  }

 private:
  void deflate_all(int flush) {
    Bytef out[1 << 16];
    int result = Z_OK;
    do {
      stream_.next_out = out;
      stream_.avail_out = sizeof out;
      result = deflate(&stream_, flush);
      if (result == Z_STREAM_ERROR) {
        throw FileError("gzip compression failed for '" + file_.path() + "'");
      }
      file_.write(out, sizeof out - stream_.avail_out);
    } while (stream_.avail_out == 0 || (flush == Z_FINISH && result != Z_STREAM_END));
  }

  AtomicFile& file_;
  bool gzip_;
  bool started_ = false;
  z_stream stream_{};
};

}  // namespace

std::size_t idx_element_size(IdxType type) {
  switch (type) {
    case IdxType::kU8:
    case IdxType::kI8:
      return 1;
    case IdxType::kI16:
      return 2;
    case IdxType::kI32:
    case IdxType::kF32:
      return 4;
    case IdxType::kF64:
      return 8;
  }
  throw InvalidInput("unknown IDX type code " + hex_byte(static_cast<unsigned>(type)));
}

const char* idx_type_name(IdxType type) {
  switch (type) {
    case IdxType::kU8:
      return "u8";
    case IdxType::kI8:
      return "i8";
    case IdxType::kI16:
      return "i16";
    case IdxType::kI32:
      return "i32";
    case IdxType::kF32:
      return "f32";
    case IdxType::kF64:
      return "f64";
  }
  return "unknown";
}

std::int64_t IdxArray::numel() const {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;
  return n;
}

IdxArray read_idx(const std::string& path) {
  // gzopen reads plain files as they are ("transparent" mode) and decompresses gzip ones.
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) throw FileError("cannot open '" + path + "': " + std::strerror(errno));
  gzbuffer(file.get(), kGzBufferBytes);

  std::uint8_t magic[kMagicBytes];
  const std::size_t magic_got = read_up_to(file.get(), path, magic, kMagicBytes);
  if (magic_got < kMagicBytes) {
    fail(path, "too short: " + std::to_string(magic_got) + " bytes, an IDX header needs at least " +
                   std::to_string(kMagicBytes));
  }
  if (magic[0] != 0 || magic[1] != 0) {
    fail(path, "bad magic: expected two zero bytes, got " + hex_byte(magic[0]) + " " +
                   hex_byte(magic[1]) + " (not an IDX file?)");
  }
  const auto type = idx_type_from_code(magic[2]);
  if (!type) {
    fail(path, "unknown type code " + hex_byte(magic[2]) +
                   " (expected 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32 or 0x0E f64)");
  }
  const std::size_t dims = magic[3];
  if (dims == 0 || dims > kIdxMaxDims) {
    fail(path, "dimension count is " + std::to_string(dims) + ", expected 1 to " +
                   std::to_string(kIdxMaxDims));
  }

  std::uint8_t dim_bytes[4 * kIdxMaxDims];
  const std::size_t dims_got = read_up_to(file.get(), path, dim_bytes, 4 * dims);
  if (dims_got < 4 * dims) {
    fail(path, "too short: the header announces " + std::to_string(dims) +
                   " dimensions but the file ends after " + std::to_string(kMagicBytes + dims_got) +
                   " bytes");
  }
  IdxArray array;
  array.type = *type;
  for (std::size_t i = 0; i < dims; ++i) array.shape.push_back(read_u32_be(dim_bytes + 4 * i));
  const std::uint64_t expected = data_bytes_for(path, array.shape, array.type);

  // Grow with the data actually read, so a header that lies costs at most one chunk.
  array.data.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(expected, kMaxReserveBytes)));
  while (array.data.size() < expected) {
    const std::size_t old_size = array.data.size();
    const auto step =
        static_cast<std::size_t>(std::min<std::uint64_t>(expected - old_size, kChunkBytes));
    array.data.resize(old_size + step);
    const std::size_t got = read_up_to(file.get(), path, array.data.data() + old_size, step);
    array.data.resize(old_size + got);
    if (got < step) {
      fail(path, "truncated: the header announces " + std::to_string(expected) +
                     " data bytes (shape " + shape_text(array.shape) + ", " +
                     idx_type_name(array.type) + ") but the file holds only " +
                     std::to_string(array.data.size()));
    }
  }
  std::uint8_t extra = 0;
  if (read_up_to(file.get(), path, &extra, 1) != 0) {
    fail(path, "trailing bytes after the " + std::to_string(expected) +
                   " data bytes the header announces (shape " + shape_text(array.shape) + ", " +
                   idx_type_name(array.type) + ")");
  }
  big_endian_to_host(array.data.data(), array.data.size(), idx_element_size(array.type));
  return array;
}

void write_idx(const std::string& path, IdxType type, const std::vector<std::int64_t>& shape,
               const void* data, std::size_t bytes, bool gzip) {
  if (!idx_type_from_code(static_cast<std::uint8_t>(type))) {
    fail(path, "cannot write unknown type code " + hex_byte(static_cast<unsigned>(type)));
  }
  if (shape.empty() || shape.size() > kIdxMaxDims) {
    fail(path, "cannot write " + std::to_string(shape.size()) + " dimensions, expected 1 to " +
                   std::to_string(kIdxMaxDims));
  }
  for (const std::int64_t d : shape) {
    if (d < 0 || static_cast<std::uint64_t>(d) > std::numeric_limits<std::uint32_t>::max()) {
      fail(path, "cannot write shape " + shape_text(shape) +
                     ": every dimension must be in 0 .. 2^32 - 1");
    }
  }
  const std::uint64_t expected = data_bytes_for(path, shape, type);
  if (expected != bytes) {
    fail(path, "cannot write shape " + shape_text(shape) + " of " + idx_type_name(type) +
                   ": it needs " + std::to_string(expected) + " data bytes, got " +
                   std::to_string(bytes));
  }

  std::string header = {'\0', '\0', static_cast<char>(type), static_cast<char>(shape.size())};
  for (const std::int64_t d : shape) append_u32_be(header, static_cast<std::uint32_t>(d));

  AtomicFile file(path);
  IdxSink sink(file, gzip);
  sink.write(header.data(), header.size());
  const std::size_t element = idx_element_size(type);
  const auto* in = static_cast<const std::uint8_t*>(data);
  std::vector<std::uint8_t> chunk;
  for (std::size_t offset = 0; offset < bytes; offset += kChunkBytes) {
    const std::size_t step = std::min(kChunkBytes, bytes - offset);  // kChunkBytes % 8 == 0
    chunk.assign(in + offset, in + offset + step);
    big_endian_to_host(chunk.data(), chunk.size(), element);
    sink.write(chunk.data(), chunk.size());
  }
  sink.finish();
  file.commit();
}

void write_idx(const std::string& path, const IdxArray& array, bool gzip) {
  write_idx(path, array.type, array.shape, array.data.data(), array.data.size(), gzip);
}

}  // namespace libtransfer::io
