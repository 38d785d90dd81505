// Bounds of the safetensors reader against forged headers: the tensor count and rank limits, a
// parse time linear in the number of tensors, and the header order kept for same-offset tensors.
// Files are assembled byte by byte here, independently of write_safetensors.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <string>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"

namespace {

using Catch::Matchers::Contains;
using libtransfer::InvalidInput;
using libtransfer::io::kSafetensorsMaxRank;
using libtransfer::io::kSafetensorsMaxTensors;
using libtransfer::io::SafetensorsFile;
using libtransfer::testing::TempDir;
using libtransfer::testing::write_bytes;

std::string le64(std::uint64_t value) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  return out;
}

std::string file_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// A header of `count` empty U8 tensors named t0, t1, ... (all at offset 0).
std::string empty_tensors_header(std::size_t count) {
  std::string header = "{";
  for (std::size_t i = 0; i < count; ++i) {
    if (i > 0) header += ",";
    header +=
        "\"t" + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}";
  }
  return header + "}";
}

// A U8 tensor of shape [1, 1, ..., 1] with `rank` dimensions holding one byte.
std::string rank_header(std::size_t rank) {
  std::string shape;
  for (std::size_t i = 0; i < rank; ++i) shape += (i > 0 ? ",1" : "1");
  return "{\"w\":{\"dtype\":\"U8\",\"shape\":[" + shape + "],\"data_offsets\":[0,1]}}";
}

}  // namespace

TEST_CASE("A tensor of the maximal rank loads and one more dimension is refused",
          "[io][safetensors][bounds]") {
  TempDir dir;
  const auto path = dir.file("rank.safetensors");
  write_bytes(path, file_bytes(rank_header(kSafetensorsMaxRank), "x"));
  const auto file = SafetensorsFile::open(path);
  CHECK(file.info("w").shape.size() == kSafetensorsMaxRank);

  write_bytes(path, file_bytes(rank_header(kSafetensorsMaxRank + 1), "x"));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), Contains("'w'") && Contains("more than 64"));
  // A million dimensions are refused as quickly: the shape is never built.
  write_bytes(path, file_bytes(rank_header(1'000'000), "x"));
  CHECK_THROWS_AS(SafetensorsFile::open(path), InvalidInput);
}

TEST_CASE("The maximal tensor count loads in linear time and one more tensor is refused",
          "[io][safetensors][bounds]") {
  TempDir dir;
  const auto path = dir.file("many.safetensors");
  write_bytes(path, file_bytes(empty_tensors_header(kSafetensorsMaxTensors)));
  const auto start = std::chrono::steady_clock::now();
  const auto file = SafetensorsFile::open(path);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(file.size() == kSafetensorsMaxTensors);
  // Quadratic parsing (nlohmann's callback parser, ordered_json inserts) took minutes here; a
  // linear parse takes about a second (generous bound: sanitizer builds are slower).
  CHECK(seconds < 60.0);

  write_bytes(path, file_bytes(empty_tensors_header(kSafetensorsMaxTensors + 1)));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), Contains("more than 262144 tensors"));
}

TEST_CASE("Same-offset tensors keep the header's order, metadata anywhere",
          "[io][safetensors][bounds]") {
  TempDir dir;
  const auto path = dir.file("order.safetensors");
  write_bytes(path, file_bytes("{\"zeta\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                               "\"__metadata__\":{\"k\":\"v\"},"
                               "\"alpha\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                               "\"mid\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}",
                               "ab"));
  const auto file = SafetensorsFile::open(path);
  REQUIRE(file.size() == 3);
  CHECK(file.tensors()[0].name == "zeta");
  CHECK(file.tensors()[1].name == "alpha");
  CHECK(file.tensors()[2].name == "mid");
  CHECK(file.metadata().at("k") == "v");
}
