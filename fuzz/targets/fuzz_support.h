// Shared pieces of the libFuzzer targets: a scratch file per process (the parsers read paths),
// the error contract every parser must keep, and small checks that abort with a message.
//
// The contract: for any input, a parser returns or throws libtransfer::InvalidInput (a clean,
// typed error). Any other exception, a crash, a leak or undefined behaviour is a bug.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <utility>

#include "libtransfer/errors.h"

namespace libtransfer::fuzz {

// Separates the parts of a multi-part input (vocab.json / merges.txt / text): a form feed on a
// line of its own, which no seed file contains otherwise.
inline constexpr std::string_view kPartSeparator = "\n\f\n";

// A file named after the process and `tag`, rewritten for every input and removed at a normal
// exit. It lives in $LIBTRANSFER_FUZZ_SCRATCH (run_fuzzers.sh points it at a folder it removes,
// so a crash leaves nothing behind), else /dev/shm (memory), else $TMPDIR or /tmp. Costs one
// open/write/close per input.
class ScratchFile {
 public:
  explicit ScratchFile(const std::string& tag) {
    const char* dir = std::getenv("LIBTRANSFER_FUZZ_SCRATCH");
    if (dir == nullptr) dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : std::getenv("TMPDIR");
    if (dir == nullptr) dir = "/tmp";
    path_ = std::string(dir) + "/libtransfer_fuzz." + std::to_string(::getpid()) + "." + tag;
  }
  ~ScratchFile() { ::unlink(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& write(const void* data, std::size_t size) {
    const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) fatal("cannot create " + path_);
    const auto* bytes = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t done = ::write(fd, bytes, size);
      if (done <= 0) fatal("cannot write " + path_);
      bytes += done;
      size -= static_cast<std::size_t>(done);
    }
    ::close(fd);
    return path_;
  }
  const std::string& write(std::string_view text) { return write(text.data(), text.size()); }
  const std::string& path() const { return path_; }

  [[noreturn]] static void fatal(const std::string& message) {
    std::fprintf(stderr, "fuzz harness: %s\n", message.c_str());
    std::abort();
  }

 private:
  std::string path_;
};

// Aborts (a finding for libFuzzer) with `message` unless `condition` holds.
inline void check(bool condition, const char* message) {
  if (!condition) {
    std::fprintf(stderr, "fuzz invariant violated: %s\n", message);
    std::abort();
  }
}

// Runs `parse`; InvalidInput is the expected way to refuse an input and returns false. Any other
// exception aborts with its type and message: parsers must not leak untyped errors (nlohmann's
// type_error, std::out_of_range, std::bad_alloc, ...) to callers.
template <typename Parse>
bool parses_cleanly(Parse&& parse) {
  try {
    std::forward<Parse>(parse)();
    return true;
  } catch (const InvalidInput&) {
    return false;
  } catch (const FileError& e) {
    std::fprintf(stderr, "unexpected FileError on a readable scratch file: %s\n", e.what());
  } catch (const WrongType& e) {
    std::fprintf(stderr, "unexpected WrongType from a parser: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "untyped exception escaped the parser: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "non-standard exception escaped the parser\n");
  }
  std::abort();
}

// Splits `data` at the first kPartSeparator: {before, after}; no separator: {data, ""}.
inline std::pair<std::string_view, std::string_view> split_part(std::string_view data) {
  const std::size_t at = data.find(kPartSeparator);
  if (at == std::string_view::npos) return {data, std::string_view()};
  return {data.substr(0, at), data.substr(at + kPartSeparator.size())};
}

}  // namespace libtransfer::fuzz
