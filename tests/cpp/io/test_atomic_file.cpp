// AtomicFile: the destination holds either the old contents or the new, never a partial write.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"

namespace io = libtransfer::io;

using libtransfer::testing::TempDir;

TEST_CASE("an atomic write replaces the file and leaves no temporary behind", "[atomic_file]") {
  const TempDir dir("test_atomic_file");
  const auto path = dir.file("out.bin");
  io::write_file_atomically(path, "old contents");
  REQUIRE(io::read_file(path) == "old contents");

  SECTION("a committed write replaces the contents") {
    io::write_file_atomically(path, std::string("new\0bytes", 9));
    REQUIRE(io::read_file(path) == std::string("new\0bytes", 9));
  }
  SECTION("an abandoned write keeps the old contents and removes the temporary") {
    {
      io::AtomicFile file(path);
      file.write("partial");
      REQUIRE(dir.entries().size() == 2);  // the temporary exists beside the destination
    }
    REQUIRE(io::read_file(path) == "old contents");
  }
  SECTION("an exception between write and commit keeps the old contents") {
    try {
      io::AtomicFile file(path);
      file.write("partial");
      throw std::runtime_error("interrupted");
    } catch (const std::runtime_error&) {
    }
    REQUIRE(io::read_file(path) == "old contents");
  }
  REQUIRE(dir.entries() == std::vector<std::string>{"out.bin"});
}

TEST_CASE("file errors name the path and the system's reason", "[atomic_file]") {
  SECTION("writing into a missing folder") {
    const auto write = [] { io::write_file_atomically("/nonexistent_dir_xyz/out.bin", "x"); };
    REQUIRE_THROWS_AS(write(), libtransfer::FileError);
    REQUIRE_THROWS_WITH(write(), Catch::Contains("/nonexistent_dir_xyz/out.bin") &&
                                     Catch::Contains("No such file"));
  }
  SECTION("reading a missing file") {
    REQUIRE_THROWS_AS(io::read_file("/nonexistent_dir_xyz/in.bin"), libtransfer::FileError);
  }
  SECTION("reading a folder") { REQUIRE_THROWS_AS(io::read_file("/tmp"), libtransfer::FileError); }
  SECTION("an empty path") { REQUIRE_THROWS_AS(io::AtomicFile(""), libtransfer::InvalidInput); }
}
