// Atomic file writing: data goes to a temporary file in the destination's folder, is flushed
// and fsynced, then renamed over the destination. A run killed midway leaves the old file intact.
// Test hook: LIBTRANSFER_TEST_WRITE_DELAY_MS=<ms> pauses every write after its first bytes and
// before its rename, so fault-injection tests can kill a process inside a write (atomic_file.cpp).
#pragma once

#include <cstddef>
#include <cstdio>
#include <string>
#include <string_view>

namespace libtransfer::io {

// Writes a file atomically. Usage: AtomicFile f(path); f.write(...); f.commit();
// If commit() is not reached (exception, early return) the temporary file is removed.
// Errors raise libtransfer::FileError naming the path and the system's reason.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  // Flushes, fsyncs, renames over the destination and fsyncs the folder.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  std::string path_;
  std::string temp_path_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

// Convenience: writes `contents` to `path` atomically.
void write_file_atomically(const std::string& path, std::string_view contents);

// Reads a whole file into a string; FileError if it cannot be opened or read.
std::string read_file(const std::string& path);

}  // namespace libtransfer::io
