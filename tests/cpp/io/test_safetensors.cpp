// Tests of the safetensors reader and writer. Files are assembled byte by byte here (an 8-byte
// little-endian length, a JSON header typed out by hand, raw data), independently of
// write_safetensors; the writer's output is parsed back here with plain byte arithmetic and
// nlohmann::json.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"
#include "libtransfer/io/dtype.h"
#include "libtransfer/io/safetensors.h"

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using libtransfer::FileError;
using libtransfer::InvalidInput;
using libtransfer::io::Dtype;
using libtransfer::io::SafetensorsFile;
using libtransfer::io::TensorInfo;
using libtransfer::io::TensorView;
using libtransfer::io::write_safetensors;
using libtransfer::testing::TempDir;
using libtransfer::testing::write_bytes;

// The format's dtype names and element sizes, typed from the specification.
const std::vector<std::pair<std::string, std::size_t>> kFormatDtypes = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"I16", 2},     {"U16", 2},
    {"I32", 4},  {"U32", 4}, {"I64", 8}, {"U64", 8},     {"F16", 2},
    {"BF16", 2}, {"F32", 4}, {"F64", 8}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};

std::string le64(std::uint64_t value) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  return out;
}

// The test's own writer: length, header text as given, data.
std::string file_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

std::string read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A deterministic byte pattern, different for each seed.
std::string pattern_bytes(std::size_t n, unsigned seed) {
  std::string out(n, '\0');
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<char>((i * 37 + seed * 101 + 11) & 0xFF);
  return out;
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// Writes bytes to a file and opens it.
SafetensorsFile open_bytes(const TempDir& dir, const std::string& bytes) {
  const std::string path = dir.file("t.safetensors");
  write_bytes(path, bytes);
  return SafetensorsFile::open(path);
}

std::string tensor_bytes(const SafetensorsFile& file, const TensorInfo& info) {
  return std::string(reinterpret_cast<const char*>(file.data(info)), info.nbytes());
}

// Expects InvalidInput whose message names the file and contains every fragment.
void require_invalid(const TempDir& dir, const std::string& bytes,
                     const std::vector<std::string>& fragments) {
  const std::string path = dir.file("t.safetensors");
  write_bytes(path, bytes);
  try {
    SafetensorsFile::open(path);
    FAIL("expected InvalidInput containing '" << fragments.front() << "'");
  } catch (const InvalidInput& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK_THAT(message, Contains(path));
    for (const auto& fragment : fragments) CHECK_THAT(message, Contains(fragment));
  }
}

}  // namespace

TEST_CASE("Dtype names and sizes match the safetensors format", "[safetensors]") {
  using namespace libtransfer::io;
  REQUIRE(all_dtypes().size() == kFormatDtypes.size());
  for (const auto& [name, size] : kFormatDtypes) {
    INFO(name);
    const Dtype dtype = dtype_from_name(name);
    CHECK(dtype_name(dtype) == name);
    CHECK(dtype_size(dtype) == size);
    CHECK(parse_dtype(name) == dtype);
  }
  CHECK_FALSE(parse_dtype("f32").has_value());  // names are case-sensitive
  REQUIRE_THROWS_AS(dtype_from_name("F17"), InvalidInput);
  REQUIRE_THROWS_WITH(dtype_from_name("F17"), Contains("F17") && Contains("BF16"));
}

TEST_CASE("A hand-written file is read with its tensors, offsets, bytes and metadata",
          "[safetensors]") {
  TempDir dir("test_safetensors");
  // "b" is listed first in the header but lies second in the data section.
  const float floats[2] = {1.5f, -2.0f};
  const std::int16_t shorts[2] = {7, -3};
  std::string data(reinterpret_cast<const char*>(floats), 8);
  data += std::string(reinterpret_cast<const char*>(shorts), 4);
  const std::string header = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"h\\u00e9\"}," +
                             entry("b", "I16", "[2,1]", 8, 12) + "," +
                             entry("a", "F32", "[2]", 0, 8) + "}";
  const auto file = open_bytes(dir, file_bytes(header, data));

  REQUIRE(file.size() == 2);
  CHECK(file.tensors()[0].name == "a");
  CHECK(file.tensors()[1].name == "b");
  CHECK(file.contains("a"));
  CHECK_FALSE(file.contains("c"));
  CHECK(file.data_start() == 8 + header.size());

  const TensorInfo& a = file.info("a");
  CHECK(a.dtype == Dtype::kF32);
  CHECK(a.shape == std::vector<std::int64_t>{2});
  CHECK(a.begin == 0);
  CHECK(a.end == 8);
  float read_floats[2];
  std::memcpy(read_floats, file.data(a), 8);
  CHECK(read_floats[0] == 1.5f);
  CHECK(read_floats[1] == -2.0f);

  const TensorInfo& b = file.info("b");
  CHECK(b.dtype == Dtype::kI16);
  CHECK(b.shape == std::vector<std::int64_t>{2, 1});
  CHECK(b.numel() == 2);
  std::int16_t read_shorts[2];
  std::memcpy(read_shorts, file.data(b), 4);
  CHECK(read_shorts[0] == 7);
  CHECK(read_shorts[1] == -3);

  CHECK(file.metadata() ==
        std::map<std::string, std::string>{{"format", "pt"}, {"note", "h\xc3\xa9"}});
}

TEST_CASE("Every dtype is read from a hand-written file", "[safetensors]") {
  TempDir dir("test_safetensors");
  std::string header = "{";
  std::string data;
  unsigned seed = 0;
  for (const auto& [name, size] : kFormatDtypes) {
    const std::size_t nbytes = 2 * 3 * size;
    if (seed > 0) header += ",";
    header += entry("t_" + name, name, "[2,3]", data.size(), data.size() + nbytes);
    data += pattern_bytes(nbytes, seed++);
  }
  header += "}";
  const auto file = open_bytes(dir, file_bytes(header, data));

  REQUIRE(file.size() == kFormatDtypes.size());
  seed = 0;
  std::uint64_t offset = 0;
  for (const auto& [name, size] : kFormatDtypes) {
    INFO(name);
    const TensorInfo& info = file.info("t_" + name);
    CHECK(libtransfer::io::dtype_name(info.dtype) == name);
    CHECK(info.shape == std::vector<std::int64_t>{2, 3});
    CHECK(info.begin == offset);
    CHECK(tensor_bytes(file, info) == pattern_bytes(6 * size, seed++));
    // The bytes are read in place from the mapping.
    CHECK(file.data(info) == file.mapping()->data() + file.data_start() + offset);
    offset += 6 * size;
  }
}

TEST_CASE("write_safetensors output parses independently, for every dtype", "[safetensors]") {
  TempDir dir("test_safetensors");
  const std::string path = dir.file("all.safetensors");
  std::vector<std::string> payloads;
  std::vector<TensorView> views;
  unsigned seed = 0;
  // An odd element count per tensor makes a naive name-order layout misalign wider types.
  for (const auto& [name, size] : kFormatDtypes)
    payloads.push_back(pattern_bytes(3 * size, seed++));
  for (std::size_t i = 0; i < kFormatDtypes.size(); ++i) {
    const auto& [name, size] = kFormatDtypes[i];
    views.push_back({"t_" + name,
                     libtransfer::io::dtype_from_name(name),
                     {3},
                     payloads[i].data(),
                     payloads[i].size()});
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"k", "v"}};
  write_safetensors(path, views, metadata);

  const std::string raw = read_raw(path);
  REQUIRE(raw.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(raw[i]);
  CHECK((8 + n) % 8 == 0);
  REQUIRE(8 + n <= raw.size());
  const std::string header_text = raw.substr(8, n);
  const auto header = nlohmann::json::parse(header_text);
  CHECK(header["__metadata__"] == nlohmann::json(metadata));
  const std::uint64_t data_start = 8 + n;

  std::uint64_t total = 0;
  std::size_t previous_size = 8;
  std::string previous_name;
  std::vector<std::pair<std::uint64_t, std::string>> by_offset;
  for (std::size_t i = 0; i < kFormatDtypes.size(); ++i) {
    const auto& [name, size] = kFormatDtypes[i];
    INFO(name);
    const auto& e = header.at("t_" + name);
    CHECK(e.size() == 3);
    CHECK(e["dtype"] == name);
    CHECK(e["shape"] == nlohmann::json::array({3}));
    const std::uint64_t begin = e["data_offsets"][0], end = e["data_offsets"][1];
    CHECK(end - begin == 3 * size);
    CHECK((data_start + begin) % size == 0);  // aligned for zero-copy use
    CHECK(raw.substr(data_start + begin, end - begin) == payloads[i]);
    by_offset.emplace_back(begin, "t_" + name);
    total += end - begin;
  }
  CHECK(raw.size() == data_start + total);

  // Layout: element size descending, then name.
  std::sort(by_offset.begin(), by_offset.end());
  for (const auto& [begin, name] : by_offset) {
    const std::size_t size = libtransfer::io::dtype_size(
        libtransfer::io::dtype_from_name(header.at(name)["dtype"].get<std::string>()));
    CHECK(size <= previous_size);
    if (size == previous_size) CHECK(previous_name < name);
    previous_size = size;
    previous_name = name;
  }

  // And our reader agrees.
  const auto file = SafetensorsFile::open(path);
  CHECK(file.metadata() == metadata);
  for (std::size_t i = 0; i < kFormatDtypes.size(); ++i) {
    CHECK(tensor_bytes(file, file.info("t_" + kFormatDtypes[i].first)) == payloads[i]);
  }
}

TEST_CASE("Zero-size and scalar tensors are legal", "[safetensors]") {
  TempDir dir("test_safetensors");
  SECTION("hand-written, with empty tensors sharing offsets with others") {
    const std::string data = pattern_bytes(4 + 8, 1);
    const std::string header =
        "{" + entry("empty_first", "F32", "[0]", 0, 0) + "," + entry("scalar", "F32", "[]", 0, 4) +
        "," + entry("empty_mid", "I64", "[2,0,3]", 4, 4) + "," + entry("vec", "I64", "[1]", 4, 12) +
        "," + entry("empty_last", "U8", "[0]", 12, 12) + "}";
    const auto file = open_bytes(dir, file_bytes(header, data));
    REQUIRE(file.size() == 5);
    CHECK(file.tensors()[0].name == "empty_first");
    CHECK(file.tensors()[4].name == "empty_last");
    CHECK(file.info("empty_mid").numel() == 0);
    CHECK(file.info("empty_mid").shape == std::vector<std::int64_t>{2, 0, 3});
    CHECK(file.info("scalar").shape.empty());
    CHECK(file.info("scalar").numel() == 1);
    CHECK(tensor_bytes(file, file.info("scalar")) == data.substr(0, 4));
  }
  SECTION("written and read back") {
    const std::string path = dir.file("z.safetensors");
    const double scalar = 2.5;
    write_safetensors(path,
                      {{"e", Dtype::kF32, {0, 4}, nullptr, 0}, {"s", Dtype::kF64, {}, &scalar, 8}});
    const auto file = SafetensorsFile::open(path);
    CHECK(file.info("e").shape == std::vector<std::int64_t>{0, 4});
    CHECK(file.info("e").nbytes() == 0);
    double read = 0;
    std::memcpy(&read, file.data(file.info("s")), 8);
    CHECK(read == 2.5);
  }
}

TEST_CASE("A header {} with no data is a legal empty file", "[safetensors]") {
  TempDir dir("test_safetensors");
  SECTION("hand-written") {
    const auto file = open_bytes(dir, file_bytes("{}"));
    CHECK(file.size() == 0);
    CHECK(file.metadata().empty());
  }
  SECTION("padded with spaces") { CHECK(open_bytes(dir, file_bytes("{}      ")).size() == 0); }
  SECTION("written") {
    const std::string path = dir.file("empty.safetensors");
    write_safetensors(path, {});
    CHECK(read_raw(path) == le64(8) + "{}      ");
    CHECK(SafetensorsFile::open(path).size() == 0);
  }
}

TEST_CASE("A missing file or a directory is a FileError", "[safetensors]") {
  TempDir dir("test_safetensors");
  REQUIRE_THROWS_AS(SafetensorsFile::open(dir.file("missing.safetensors")), FileError);
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.file("missing.safetensors")),
                      Contains("missing.safetensors"));
  REQUIRE_THROWS_AS(SafetensorsFile::open(dir.path.string()), FileError);
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.path.string()), Contains("directory"));
}

TEST_CASE("Asking for an absent tensor names it and lists those present", "[safetensors]") {
  TempDir dir("test_safetensors");
  const auto file =
      open_bytes(dir, file_bytes("{" + entry("weight", "U8", "[1]", 0, 1) + "}", "x"));
  REQUIRE_THROWS_AS(file.info("bias"), InvalidInput);
  REQUIRE_THROWS_WITH(file.info("bias"), Contains("'bias'") && Contains("'weight'"));
}

TEST_CASE("A file shorter than the 8-byte length is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, "", {"0 bytes"});
  require_invalid(dir, std::string("\x02\0\0\0\0", 5), {"5 bytes", "8-byte"});
}

TEST_CASE("A header length above the 100 MB limit is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, le64(100'000'001) + "{}", {"100000001", "limit"});
  require_invalid(dir, le64(~std::uint64_t{0}) + "{}", {"exceeds the limit"});
}

TEST_CASE("A header length beyond the end of the file is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, le64(40) + "{}", {"header length 40", "2 bytes", "truncated"});
}

TEST_CASE("A header that is not UTF-8 is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{\"w\xff\":{}}"), {"not valid UTF-8", "byte 3"});
  SECTION("overlong and surrogate encodings too") {
    require_invalid(dir, file_bytes("{\"\xc0\xaf\":1}"), {"UTF-8"});
    require_invalid(dir, file_bytes("{\"\xed\xa0\x80\":1}"), {"UTF-8"});
  }
}

TEST_CASE("A header that is not JSON or not an object is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{\"weight\":"), {"not valid JSON"});
  require_invalid(dir, file_bytes("[]"), {"must be a JSON object", "array"});
  require_invalid(dir, file_bytes("{} {}"), {"not valid JSON"});
}

TEST_CASE("An entry that is not an object, lacks a key or has an extra one is rejected",
          "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{\"weight\":3}"), {"'weight'", "must be an object"});
  require_invalid(dir, file_bytes("{\"weight\":{\"dtype\":\"U8\",\"data_offsets\":[0,0]}}"),
                  {"'weight'", "lacks \"shape\""});
  require_invalid(dir,
                  file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0],"
                             "\"extra\":1}}"),
                  {"'weight'", "unexpected key 'extra'"});
}

TEST_CASE("Entry values of the wrong JSON type are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  SECTION("dtype") {
    require_invalid(dir,
                    file_bytes("{\"weight\":{\"dtype\":4,\"shape\":[],\"data_offsets\":[0,0]}}"),
                    {"'weight'", "dtype must be a string"});
  }
  SECTION("shape") {
    require_invalid(
        dir, file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":3,\"data_offsets\":[0,3]}}"),
        {"'weight'", "shape must be an array"});
    require_invalid(
        dir, file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":[\"3\"],\"data_offsets\":[0,3]}}"),
        {"'weight'", "non-negative integers", "string"});
  }
  SECTION("data_offsets") {
    require_invalid(
        dir, file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}"),
        {"'weight'", "data_offsets must be an array [begin, end]"});
    require_invalid(
        dir,
        file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1.0]}}", "x"),
        {"'weight'", "non-integer"});
  }
}

TEST_CASE("An unknown dtype is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{" + entry("weight", "F17", "[1]", 0, 4) + "}", "abcd"),
                  {"'weight'", "unknown dtype 'F17'"});
}

TEST_CASE("A shape with a negative or non-integer dimension is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[2,-1]", 0, 0) + "}"),
                  {"'weight'", "negative value -1"});
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[2.5]", 0, 2) + "}", "ab"),
                  {"'weight'", "non-integer 2.5"});
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[9223372036854775808]", 0, 0) + "}"),
                  {"'weight'", "too large"});
}

TEST_CASE("A byte count that does not match dtype and shape is rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(
      dir, file_bytes("{" + entry("weight", "F32", "[2,2]", 0, 12) + "}", pattern_bytes(12, 0)),
      {"'weight'", "hold 12 bytes", "needs 16"});
  SECTION("including when the product overflows") {
    require_invalid(dir,
                    file_bytes("{" + entry("weight", "F64", "[4294967296,4294967296]", 0, 0) + "}"),
                    {"'weight'", "overflows"});
    require_invalid(dir,
                    file_bytes("{" + entry("weight", "F64", "[2305843009213693952,4]", 0, 0) + "}"),
                    {"'weight'", "overflows"});
  }
}

TEST_CASE("Offsets that run backwards or past the data are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[0]", 4, 2) + "}", "abcd"),
                  {"'weight'", "[4, 2]", "begin after they end"});
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[8]", 0, 8) + "}", "abcd"),
                  {"'weight'", "past the data section", "4 bytes"});
}

TEST_CASE("Overlapping tensors are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir,
                  file_bytes("{" + entry("weight", "U8", "[4]", 0, 4) + "," +
                                 entry("bias", "U8", "[4]", 2, 6) + "}",
                             "abcdef"),
                  {"'bias'", "overlap tensor 'weight'"});
  SECTION("including two tensors on the same bytes") {
    require_invalid(dir,
                    file_bytes("{" + entry("weight", "U8", "[4]", 0, 4) + "," +
                                   entry("bias", "I8", "[4]", 0, 4) + "}",
                               "abcd"),
                    {"overlap"});
  }
  SECTION("including an empty tensor inside another") {
    require_invalid(dir,
                    file_bytes("{" + entry("weight", "U8", "[4]", 0, 4) + "," +
                                   entry("bias", "U8", "[0]", 2, 2) + "}",
                               "abcd"),
                    {"'bias'", "overlap tensor 'weight'"});
  }
}

TEST_CASE("Gaps between tensors or before the first are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir,
                  file_bytes("{" + entry("weight", "U8", "[2]", 0, 2) + "," +
                                 entry("bias", "U8", "[2]", 4, 6) + "}",
                             "abcdef"),
                  {"'bias'", "gap of 2 bytes after tensor 'weight'"});
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[2]", 2, 4) + "}", "abcd"),
                  {"'weight'", "offset 0"});
}

TEST_CASE("Trailing bytes after the last tensor are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{" + entry("weight", "U8", "[2]", 0, 2) + "}", "abc"),
                  {"'weight'", "1 trailing bytes"});
  require_invalid(dir, file_bytes("{}", "abc"), {"no tensors", "3 trailing bytes"});
}

TEST_CASE("Duplicate keys are rejected rather than silently merged", "[safetensors]") {
  TempDir dir("test_safetensors");
  SECTION("a tensor name") {
    require_invalid(dir,
                    file_bytes("{" + entry("weight", "U8", "[2]", 0, 2) + "," +
                                   entry("weight", "U8", "[2]", 2, 4) + "}",
                               "abcd"),
                    {"'weight'", "twice"});
  }
  SECTION("a key inside an entry") {
    require_invalid(dir,
                    file_bytes("{\"weight\":{\"dtype\":\"U8\",\"dtype\":\"I8\",\"shape\":[1],"
                               "\"data_offsets\":[0,1]}}",
                               "a"),
                    {"'weight'", "'dtype' twice"});
  }
  SECTION("a metadata key or the metadata itself") {
    require_invalid(dir, file_bytes("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}"),
                    {"__metadata__", "'a' twice"});
    require_invalid(dir, file_bytes("{\"__metadata__\":{},\"__metadata__\":{}}"),
                    {"two \"__metadata__\""});
  }
}

TEST_CASE("Metadata must map strings to strings", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(dir, file_bytes("{\"__metadata__\":[\"a\"]}"), {"__metadata__", "array"});
  require_invalid(dir, file_bytes("{\"__metadata__\":{\"epoch\":3}}"),
                  {"__metadata__", "'epoch'", "number"});
}

TEST_CASE("Headers nested deeper than the format are rejected", "[safetensors]") {
  TempDir dir("test_safetensors");
  require_invalid(
      dir,
      file_bytes("{\"weight\":{\"dtype\":\"U8\",\"shape\":[[1]],\"data_offsets\":[0,1]}}", "a"),
      {"'weight'", "nests deeper"});
  // Deep nesting must fail fast, without recursion trouble.
  const std::string deep =
      "{\"weight\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  require_invalid(dir, file_bytes(deep), {"nests deeper"});
}

TEST_CASE("Writes to a mapped tensor change neither the file nor a reopened copy",
          "[safetensors]") {
  TempDir dir("test_safetensors");
  const std::string path = dir.file("cow.safetensors");
  const std::string bytes = file_bytes("{" + entry("w", "U8", "[4]", 0, 4) + "}", "abcd");
  write_bytes(path, bytes);
  const auto file = SafetensorsFile::open(path);
  std::uint8_t* data = file.mutable_data(file.info("w"));
  data[0] = 'Z';
  CHECK(file.data(file.info("w"))[0] == 'Z');
  CHECK(read_raw(path) == bytes);
  const auto again = SafetensorsFile::open(path);
  CHECK(tensor_bytes(again, again.info("w")) == "abcd");
}

TEST_CASE("The mapping outlives the SafetensorsFile that made it", "[safetensors]") {
  TempDir dir("test_safetensors");
  const std::string path = dir.file("keep.safetensors");
  write_bytes(path, file_bytes("{" + entry("w", "U8", "[4]", 0, 4) + "}", "abcd"));
  std::shared_ptr<libtransfer::io::MappedFile> mapping;
  const std::uint8_t* data = nullptr;
  {
    const auto file = SafetensorsFile::open(path);
    mapping = file.mapping();
    data = file.data(file.info("w"));
  }
  CHECK(std::string(reinterpret_cast<const char*>(data), 4) == "abcd");
}

TEST_CASE("write_safetensors refuses invalid tensors and leaves the old file intact",
          "[safetensors]") {
  TempDir dir("test_safetensors");
  const std::string path = dir.file("model.safetensors");
  const std::int32_t values[3] = {1, 2, 3};
  write_safetensors(path, {{"w", Dtype::kI32, {3}, values, 12}}, {{"step", "1"}});
  const std::string before = read_raw(path);

  const auto require_refused = [&](const std::vector<TensorView>& views, const std::string& what) {
    REQUIRE_THROWS_AS(write_safetensors(path, views), InvalidInput);
    REQUIRE_THROWS_WITH(write_safetensors(path, views), Contains(what));
    CHECK(read_raw(path) == before);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  };
  SECTION("wrong byte count") {
    require_refused({{"w", Dtype::kI32, {3}, values, 8}}, "'w': nbytes is 8, but I32 [3] needs 12");
  }
  SECTION("negative dimension") {
    require_refused({{"w", Dtype::kI32, {-3}, values, 12}}, "negative");
  }
  SECTION("duplicate, empty or reserved name") {
    require_refused({{"w", Dtype::kI32, {3}, values, 12}, {"w", Dtype::kI32, {3}, values, 12}},
                    "'w' appears twice");
    require_refused({{"", Dtype::kI32, {3}, values, 12}}, "empty name");
    require_refused({{"__metadata__", Dtype::kI32, {3}, values, 12}}, "reserved");
    require_refused({{"w\xff", Dtype::kI32, {3}, values, 12}}, "UTF-8");
  }
  SECTION("null data") {
    require_refused({{"w", Dtype::kI32, {3}, nullptr, 12}}, "'w': data is null");
  }
  SECTION("a folder that does not exist is a FileError, with no file left") {
    REQUIRE_THROWS_AS(write_safetensors(dir.file("no/such/dir.safetensors"),
                                        {{"w", Dtype::kI32, {3}, values, 12}}),
                      FileError);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  }
}

TEST_CASE("write_safetensors replaces an existing file and leaves no temporary file",
          "[safetensors]") {
  TempDir dir("test_safetensors");
  const std::string path = dir.file("model.safetensors");
  const std::int64_t first[1] = {1};
  const std::int64_t second[2] = {5, 6};
  write_safetensors(path, {{"a", Dtype::kI64, {1}, first, 8}});
  write_safetensors(path, {{"b", Dtype::kI64, {2}, second, 16}});
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  const auto file = SafetensorsFile::open(path);
  CHECK_FALSE(file.contains("a"));
  REQUIRE(file.contains("b"));
  std::int64_t read[2];
  std::memcpy(read, file.data(file.info("b")), 16);
  CHECK(read[0] == 5);
  CHECK(read[1] == 6);
}
