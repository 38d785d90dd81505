#include "libtransfer/io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "libtransfer/errors.h"

namespace libtransfer::io {
namespace {

// Closes the descriptor on every path out of open_private; the mapping outlives it.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() { ::close(fd_); }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

}  // namespace

MappedFile::MappedFile(std::string path, std::uint8_t* data, std::size_t size)
    : path_(std::move(path)), data_(data), size_(size) {}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

std::shared_ptr<MappedFile> MappedFile::open_private(const std::string& path) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is rejected below anyway.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw FileError("cannot open '" + path + "': " + std::strerror(errno));
  FdCloser closer(fd);

  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw FileError("cannot stat '" + path + "': " + std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) throw FileError("'" + path + "' is a directory, expected a file");
  if (!S_ISREG(st.st_mode)) throw FileError("'" + path + "' is not a regular file");
  if (static_cast<std::uint64_t>(st.st_size) > std::numeric_limits<std::size_t>::max()) {
    throw FileError("'" + path + "' is too large to map on this system");
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size == 0) return std::shared_ptr<MappedFile>(new MappedFile(path, nullptr, 0));

  void* mapped = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (mapped == MAP_FAILED) {
    throw FileError("cannot map '" + path + "' into memory: " + std::strerror(errno));
  }
  return std::shared_ptr<MappedFile>(
      new MappedFile(path, static_cast<std::uint8_t*>(mapped), size));
}

}  // namespace libtransfer::io
