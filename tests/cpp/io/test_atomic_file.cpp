// AtomicFile: the destination holds either the old contents or the new, never a partial write.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <string>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"

namespace io = libtransfer::io;

namespace {

std::string make_temp_dir() {
  char pattern[] = "/tmp/atomic_file_test.XXXXXX";
  REQUIRE(::mkdtemp(pattern) != nullptr);
  return pattern;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* handle = ::opendir(dir.c_str());
  REQUIRE(handle != nullptr);
  while (dirent* entry = ::readdir(handle)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(handle);
  return names;
}

}  // namespace

TEST_CASE("an atomic write replaces the file and leaves no temporary behind", "[atomic_file]") {
  const auto dir = make_temp_dir();
  const auto path = dir + "/out.bin";
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
      REQUIRE(list_dir(dir).size() == 2);  // the temporary exists beside the destination
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
  REQUIRE(list_dir(dir) == std::vector<std::string>{"out.bin"});
  std::system(("rm -rf " + dir).c_str());
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
