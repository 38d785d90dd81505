#include "libtransfer/io/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "libtransfer/errors.h"

namespace libtransfer::io {
namespace {

std::string system_reason() { return std::strerror(errno); }

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// A name that two concurrent writers (threads or processes) cannot share.
std::string temp_name_for(const std::string& path) {
  std::random_device rd;
  return path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(rd());
}

// Test hook, for the fault-injection tests only (tests/python/test_fault_injection.py):
// LIBTRANSFER_TEST_WRITE_DELAY_MS=<ms> (1..60000) makes every atomic write pause twice, once when
// its first bytes have reached the temporary file (a partial file on disk) and once when the
// temporary file is complete and fsynced, just before the rename; a test kills the process in
// either window. Unset (always, outside tests) it costs one getenv per process.
constexpr const char* kWriteDelayVariable = "LIBTRANSFER_TEST_WRITE_DELAY_MS";
constexpr long kMaxWriteDelayMs = 60'000;

long test_write_delay_ms() {
  static const long delay = [] {
    const char* text = std::getenv(kWriteDelayVariable);
    if (text == nullptr) return 0L;
    const long value = std::strtol(text, nullptr, 10);
    return value > 0 && value <= kMaxWriteDelayMs ? value : 0L;
  }();
  return delay;
}

void pause_for_test() {
  std::this_thread::sleep_for(std::chrono::milliseconds(test_write_delay_ms()));
}

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  if (path_.empty()) throw InvalidInput("AtomicFile: expected a file path, got an empty string");
  temp_path_ = temp_name_for(path_);
  file_ = std::fopen(temp_path_.c_str(), "wb");
  if (file_ == nullptr) {
    throw FileError("cannot create '" + temp_path_ + "' to write '" + path_ +
                    "': " + system_reason());
  }
}

AtomicFile::~AtomicFile() {
  if (file_ != nullptr) std::fclose(file_);
  if (!committed_) std::remove(temp_path_.c_str());
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (committed_ || file_ == nullptr) {
    throw FileError("write to '" + path_ + "' after commit");
  }
  if (size > 0 && std::fwrite(data, 1, size, file_) != size) {
    throw FileError("cannot write '" + temp_path_ + "': " + system_reason());
  }
  // Test hook: the first bytes written are on disk while the process pauses.
  if (test_write_delay_ms() > 0 && size > 0 && std::ftell(file_) == static_cast<long>(size)) {
    std::fflush(file_);
    pause_for_test();
  }
}

void AtomicFile::commit() {
  if (committed_) return;
  if (std::fflush(file_) != 0 || ::fsync(::fileno(file_)) != 0) {
    throw FileError("cannot flush '" + temp_path_ + "': " + system_reason());
  }
  const int close_result = std::fclose(file_);
  file_ = nullptr;
  if (close_result != 0) {
    throw FileError("cannot close '" + temp_path_ + "': " + system_reason());
  }
  if (test_write_delay_ms() > 0) pause_for_test();  // complete temporary file, not yet renamed
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    throw FileError("cannot rename '" + temp_path_ + "' to '" + path_ + "': " + system_reason());
  }
  committed_ = true;
  // Make the rename itself durable; a failure here does not lose data, so it is not an error.
  const int dir = ::open(parent_dir(path_).c_str(), O_RDONLY | O_DIRECTORY);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void write_file_atomically(const std::string& path, std::string_view contents) {
  AtomicFile file(path);
  file.write(contents);
  file.commit();
}

std::string read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw FileError("cannot open '" + path + "': " + system_reason());
  std::string out;
  char buffer[1 << 16];
  std::size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) out.append(buffer, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) throw FileError("cannot read '" + path + "': " + system_reason());
  return out;
}

}  // namespace libtransfer::io
