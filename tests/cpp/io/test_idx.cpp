// Tests of the IDX reader and writer against an independent byte-level encoder written here
// (big-endian headers and elements by hand, gzip through zlib's gzwrite), and on Fashion-MNIST.
#include <zlib.h>

#include <array>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/idx.h"

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using libtransfer::FileError;
using libtransfer::InvalidInput;
using libtransfer::io::IdxArray;
using libtransfer::io::IdxType;
using libtransfer::io::read_idx;
using libtransfer::io::write_idx;
using libtransfer::testing::TempDir;
using libtransfer::testing::write_bytes;

void write_gzip(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty()) {
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  }
  REQUIRE(gzclose(f) == Z_OK);
}

std::string read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string gunzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  REQUIRE(f != nullptr);
  std::string out;
  char buffer[4096];
  int n = 0;
  while ((n = gzread(f, buffer, sizeof buffer)) > 0) out.append(buffer, static_cast<size_t>(n));
  REQUIRE(n == 0);
  gzclose(f);
  return out;
}

// Big-endian encoding by shifts, independent of the library's byte swapping.
void put_be(std::string& out, std::uint64_t bits, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
}

std::string header(std::uint8_t type_code, const std::vector<std::uint32_t>& dims) {
  std::string out = {'\0', '\0', static_cast<char>(type_code), static_cast<char>(dims.size())};
  for (const std::uint32_t d : dims) put_be(out, d, 4);
  return out;
}

template <class T>
std::uint64_t bits_of(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t> bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
  } else {
    // Two's complement bit pattern of the value, truncated to its width by put_be.
    return static_cast<std::uint64_t>(static_cast<std::int64_t>(value));
  }
}

template <class T>
std::string encode(std::uint8_t type_code, const std::vector<std::uint32_t>& dims,
                   const std::vector<T>& values) {
  std::string out = header(type_code, dims);
  for (const T v : values) put_be(out, bits_of(v), sizeof(T));
  return out;
}

template <class T>
std::vector<T> values_of(const IdxArray& array) {
  REQUIRE(array.data.size() % sizeof(T) == 0);
  std::vector<T> out(array.data.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), array.data.data(), array.data.size());
  return out;
}

IdxArray array_of(IdxType type, std::vector<std::int64_t> shape, const void* data,
                  std::size_t bytes) {
  IdxArray array;
  array.type = type;
  array.shape = std::move(shape);
  const auto* p = static_cast<const std::uint8_t*>(data);
  array.data.assign(p, p + bytes);
  return array;
}

// Reads files from the independent encoder, and checks that write_idx produces the same bytes.
template <class T>
void check_round_trip(IdxType type, std::uint8_t code, const std::vector<T>& values) {
  REQUIRE(values.size() == 6);
  const std::vector<std::uint32_t> dims = {2, 3};
  const std::string expected = encode(code, dims, values);
  TempDir dir("test_idx");
  for (const bool gzip : {false, true}) {
    CAPTURE(gzip);
    const std::string hand = dir.file(gzip ? "hand.idx.gz" : "hand.idx");
    gzip ? write_gzip(hand, expected) : write_bytes(hand, expected);
    const IdxArray read = read_idx(hand);
    CHECK(read.type == type);
    CHECK(read.shape == std::vector<std::int64_t>{2, 3});
    CHECK(read.numel() == 6);
    CHECK(values_of<T>(read) == values);

    const std::string ours = dir.file(gzip ? "ours.idx.gz" : "ours.idx");
    write_idx(ours, array_of(type, {2, 3}, values.data(), values.size() * sizeof(T)), gzip);
    const std::string raw = read_raw(ours);
    if (gzip) {
      REQUIRE(raw.size() >= 2);
      CHECK(static_cast<unsigned char>(raw[0]) == 0x1F);
      CHECK(static_cast<unsigned char>(raw[1]) == 0x8B);
      CHECK(gunzip(ours) == expected);
    } else {
      CHECK(raw == expected);
    }
    CHECK(values_of<T>(read_idx(ours)) == values);
  }
}

template <class F>
std::string invalid_input_message(F&& f) {
  try {
    f();
  } catch (const InvalidInput& e) {
    return e.what();
  }
  FAIL("expected libtransfer::InvalidInput");
  return {};
}

}  // namespace

TEST_CASE("IDX files of every element type round-trip through plain and gzip files", "[idx]") {
  SECTION("u8") { check_round_trip<std::uint8_t>(IdxType::kU8, 0x08, {0, 1, 127, 128, 200, 255}); }
  SECTION("i8") { check_round_trip<std::int8_t>(IdxType::kI8, 0x09, {-128, -1, 0, 1, 100, 127}); }
  SECTION("i16") {
    check_round_trip<std::int16_t>(IdxType::kI16, 0x0B, {-32768, -258, -1, 0, 258, 32767});
  }
  SECTION("i32") {
    check_round_trip<std::int32_t>(IdxType::kI32, 0x0C,
                                   {std::numeric_limits<std::int32_t>::min(), -16909060, -1, 0,
                                    16909060, std::numeric_limits<std::int32_t>::max()});
  }
  SECTION("f32") {
    check_round_trip<float>(
        IdxType::kF32, 0x0D,
        {-1.5f, 0.0f, 3.14159274f, 1e-38f, -3.4e38f, std::numeric_limits<float>::infinity()});
  }
  SECTION("f64") {
    check_round_trip<double>(IdxType::kF64, 0x0E,
                             {-1.5, 0.0, 3.141592653589793, 1e-300, -1.7e308, 2.0 / 3.0});
  }
}

TEST_CASE("IDX element bytes are big-endian in the file and host order in memory", "[idx]") {
  TempDir dir("test_idx");
  // 0x0102 = 258 and 0x01020304 = 16909060, written byte by byte.
  write_bytes(dir.file("i16"), header(0x0B, {1}) + std::string("\x01\x02", 2));
  write_bytes(dir.file("i32"), header(0x0C, {1}) + std::string("\x01\x02\x03\x04", 4));
  CHECK(values_of<std::int16_t>(read_idx(dir.file("i16"))) == std::vector<std::int16_t>{258});
  CHECK(values_of<std::int32_t>(read_idx(dir.file("i32"))) == std::vector<std::int32_t>{16909060});
}

TEST_CASE("IDX arrays keep their shape, including 1, 3 and 8 dimensions and empty ones", "[idx]") {
  TempDir dir("test_idx");
  const std::string path = dir.file("a.idx");
  SECTION("1 dimension") {
    write_bytes(path, encode<std::uint8_t>(0x08, {4}, {9, 8, 7, 6}));
    CHECK(read_idx(path).shape == std::vector<std::int64_t>{4});
  }
  SECTION("3 dimensions, as MNIST images") {
    std::vector<std::uint8_t> v(2 * 3 * 4);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint8_t>(i);
    write_bytes(path, encode(0x08, {2, 3, 4}, v));
    const IdxArray a = read_idx(path);
    CHECK(a.shape == std::vector<std::int64_t>{2, 3, 4});
    CHECK(values_of<std::uint8_t>(a) == v);
  }
  SECTION("the maximum number of dimensions") {
    write_bytes(path, encode<std::uint8_t>(0x08, {1, 1, 1, 1, 1, 1, 1, 2}, {5, 6}));
    CHECK(read_idx(path).shape == std::vector<std::int64_t>{1, 1, 1, 1, 1, 1, 1, 2});
  }
  SECTION("a zero-length dimension holds no data") {
    write_bytes(path, header(0x0D, {0, 28}));
    const IdxArray a = read_idx(path);
    CHECK(a.shape == std::vector<std::int64_t>{0, 28});
    CHECK(a.data.empty());
    write_idx(dir.file("b.idx"), a);
    CHECK(read_raw(dir.file("b.idx")) == header(0x0D, {0, 28}));
  }
}

TEST_CASE("IDX files that are malformed raise InvalidInput naming the file and problem", "[idx]") {
  TempDir dir("test_idx");
  const std::string valid = encode<std::uint8_t>(0x08, {2, 2}, {1, 2, 3, 4});
  struct Case {
    const char* name;
    std::string bytes;
    const char* problem;
  };
  const std::vector<Case> cases = {
      {"empty file", "", "too short"},
      {"truncated magic", std::string("\0\0\x08", 3), "too short"},
      {"truncated dimensions", valid.substr(0, 9), "too short"},
      {"truncated data", valid.substr(0, valid.size() - 1), "truncated"},
      {"trailing bytes", valid + "x", "trailing bytes"},
      {"nonzero first magic byte", "\x01" + valid.substr(1), "bad magic"},
      {"nonzero second magic byte", valid.substr(0, 1) + "\x01" + valid.substr(2), "bad magic"},
      {"unknown type code", valid.substr(0, 2) + "\x0A" + valid.substr(3),
       "unknown type code 0x0A"},
      {"zero dimensions", header(0x08, {}), "dimension count is 0"},
      {"too many dimensions", header(0x08, {1, 1, 1, 1, 1, 1, 1, 1, 1}) + "x",
       "dimension count is 9"},
      {"dimensions whose product overflows", header(0x08, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}),
       "above the limit"},
      {"absurd size within 64 bits", header(0x0E, {1u << 16, 1u << 16}), "above the limit"},
  };
  for (const Case& c : cases) {
    for (const bool gzip : {false, true}) {
      CAPTURE(c.name, gzip);
      const std::string path = dir.file(gzip ? "bad.idx.gz" : "bad.idx");
      gzip ? write_gzip(path, c.bytes) : write_bytes(path, c.bytes);
      const std::string message = invalid_input_message([&] { read_idx(path); });
      CHECK_THAT(message, Contains(path) && Contains(c.problem));
    }
  }
}

TEST_CASE("IDX files at exactly the size limit pass the header check", "[idx]") {
  // 2^34 bytes of u8 in one dimension is allowed by the bound; the missing data is then reported
  // as truncation (the header check does not allocate).
  TempDir dir("test_idx");
  write_bytes(dir.file("a"), header(0x08, {1u << 17, 1u << 17}));
  CHECK_THAT(invalid_input_message([&] { read_idx(dir.file("a")); }), Contains("truncated"));
}

TEST_CASE("IDX gzip streams that are corrupt or cut short raise InvalidInput", "[idx]") {
  TempDir dir("test_idx");
  std::vector<std::uint8_t> values(4096);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<std::uint8_t>(i * 7);
  const std::string path = dir.file("a.idx.gz");
  write_gzip(path, encode(0x08, {64, 64}, values));
  const std::string gz = read_raw(path);
  REQUIRE(gz.size() > 40);

  SECTION("flipped bytes in the deflate data") {
    std::string bad = gz;
    for (std::size_t i = 12; i < 20; ++i) bad[i] = static_cast<char>(bad[i] ^ 0x5A);
    write_bytes(path, bad);
  }
  SECTION("a wrong CRC in the trailer") {
    std::string bad = gz;
    bad[bad.size() - 8] = static_cast<char>(bad[bad.size() - 8] ^ 0xFF);
    write_bytes(path, bad);
  }
  SECTION("a stream cut in the middle") { write_bytes(path, gz.substr(0, gz.size() / 2)); }
  SECTION("a stream missing its trailer") { write_bytes(path, gz.substr(0, gz.size() - 4)); }
  const std::string message = invalid_input_message([&] { read_idx(path); });
  CHECK_THAT(message, Contains(path) && (Contains("gzip") || Contains("truncated")));
}

TEST_CASE("IDX gzip bombs stop one byte past the announced size", "[idx]") {
  // 256 MiB of zeros compress to about 256 KiB; the header announces 16 bytes.
  TempDir dir("test_idx");
  const std::string path = dir.file("bomb.idx.gz");
  gzFile f = gzopen(path.c_str(), "wb9");
  REQUIRE(f != nullptr);
  const std::string head = header(0x08, {4, 4});
  gzwrite(f, head.data(), static_cast<unsigned>(head.size()));
  const std::vector<char> zeros(1 << 20, 0);
  for (int i = 0; i < 256; ++i) gzwrite(f, zeros.data(), static_cast<unsigned>(zeros.size()));
  REQUIRE(gzclose(f) == Z_OK);
  CHECK_THAT(invalid_input_message([&] { read_idx(path); }), Contains("trailing bytes"));
}

TEST_CASE("IDX reading a missing file raises FileError", "[idx]") {
  TempDir dir("test_idx");
  CHECK_THROWS_AS(read_idx(dir.file("missing.idx")), FileError);
  CHECK_THROWS_AS(read_idx(dir.path.string()), FileError);  // a folder
}

TEST_CASE("IDX writing checks the shape against the data and leaves no file on error", "[idx]") {
  TempDir dir("test_idx");
  const std::string path = dir.file("out.idx");
  const std::vector<std::uint8_t> four = {1, 2, 3, 4};
  SECTION("data size does not match the shape") {
    CHECK_THAT(invalid_input_message([&] {
                 write_idx(path, array_of(IdxType::kI16, {2, 2}, four.data(), 4));
               }),
               Contains("needs 8 data bytes, got 4"));
  }
  SECTION("no dimensions") {
    CHECK_THAT(
        invalid_input_message([&] { write_idx(path, array_of(IdxType::kU8, {}, four.data(), 4)); }),
        Contains("0 dimensions"));
  }
  SECTION("too many dimensions") {
    CHECK_THAT(
        invalid_input_message([&] {
          write_idx(path, array_of(IdxType::kU8, {1, 1, 1, 1, 1, 1, 1, 1, 4}, four.data(), 4));
        }),
        Contains("9 dimensions"));
  }
  SECTION("a negative dimension") {
    CHECK_THAT(invalid_input_message(
                   [&] { write_idx(path, array_of(IdxType::kU8, {-4}, four.data(), 4)); }),
               Contains("every dimension"));
  }
  SECTION("a dimension above 2^32 - 1") {
    CHECK_THAT(invalid_input_message([&] {
                 write_idx(path, array_of(IdxType::kU8, {std::int64_t{1} << 32}, four.data(), 4));
               }),
               Contains("every dimension"));
  }
  SECTION("an unknown type code") {
    CHECK_THAT(invalid_input_message([&] {
                 write_idx(path, array_of(static_cast<IdxType>(0x0A), {4}, four.data(), 4));
               }),
               Contains("unknown type code 0x0A"));
  }
  CHECK_FALSE(fs::exists(path));
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("IDX writing replaces an existing file", "[idx]") {
  TempDir dir("test_idx");
  const std::string path = dir.file("out.idx.gz");
  const std::vector<std::uint8_t> a = {1, 2, 3}, b = {4, 5};
  write_idx(path, array_of(IdxType::kU8, {3}, a.data(), 3), true);
  write_idx(path, array_of(IdxType::kU8, {2}, b.data(), 2), true);
  CHECK(values_of<std::uint8_t>(read_idx(path)) == b);
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
}

TEST_CASE("IDX reading Fashion-MNIST gives 28x28 u8 images and balanced labels 0..9", "[idx]") {
  const fs::path root = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(root)) {
    WARN("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist); skipped");
    return;
  }
  struct Split {
    const char* prefix;
    std::int64_t count;
  };
  for (const Split& split : {Split{"train", 60000}, Split{"t10k", 10000}}) {
    CAPTURE(split.prefix);
    const std::string images_path =
        (root / (std::string(split.prefix) + "-images-idx3-ubyte.gz")).string();
    const std::string labels_path =
        (root / (std::string(split.prefix) + "-labels-idx1-ubyte.gz")).string();
    const IdxArray images = read_idx(images_path);
    const IdxArray labels = read_idx(labels_path);
    CHECK(images.type == IdxType::kU8);
    CHECK(images.shape == std::vector<std::int64_t>{split.count, 28, 28});
    CHECK(labels.type == IdxType::kU8);
    CHECK(labels.shape == std::vector<std::int64_t>{split.count});

    // Fashion-MNIST has exactly count / 10 examples of each class in each split.
    std::array<std::int64_t, 10> per_class{};
    std::int64_t out_of_range = 0;
    for (const std::uint8_t label : labels.data) {
      if (label < 10) {
        ++per_class[label];
      } else {
        ++out_of_range;
      }
    }
    CHECK(out_of_range == 0);
    for (const std::int64_t n : per_class) CHECK(n == split.count / 10);

    // The data are the decompressed file after its 16-byte (images) / 8-byte (labels) header.
    CHECK(gunzip(images_path).substr(16) == std::string(images.data.begin(), images.data.end()));
    CHECK(gunzip(labels_path).substr(8) == std::string(labels.data.begin(), labels.data.end()));
  }
}
