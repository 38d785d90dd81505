// A whole file mapped into memory, private and copy-on-write: the pages are readable and writable,
// and writes go to private copies, never to the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace libtransfer::io {

// A read-only view of a file that callers may scribble on (MAP_PRIVATE, PROT_READ|PROT_WRITE).
// Costs address space, not memory: pages load on first touch; a written page is copied once.
// Share it through std::shared_ptr so that every borrower (e.g. a torch tensor) keeps it mapped.
// If another process rewrites the file in place, pages not yet touched may show the new bytes;
// writers that replace files by rename (AtomicFile) do not have this problem.
class MappedFile {
 public:
  // Maps the whole regular file at `path`. FileError if it is missing, not a regular file (a
  // directory, a FIFO) or cannot be mapped. An empty file maps to data() == nullptr, size() == 0.
  static std::shared_ptr<MappedFile> open_private(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // The first byte of the mapping; writable (copy-on-write), page-aligned.
  std::uint8_t* data() { return data_; }
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, std::uint8_t* data, std::size_t size);

  std::string path_;
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace libtransfer::io
