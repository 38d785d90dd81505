// Exception types shared by every part of libtransfer. Torch-free, so the io layer can use them.
//
// The Python bindings translate them: InvalidInput -> ValueError, FileError -> OSError,
// WrongType -> TypeError. Messages say what was expected and what was got.
#pragma once

#include <stdexcept>
#include <string>

namespace libtransfer {

// Input that is malformed or inconsistent: a corrupt file, a bad argument value.
class InvalidInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The file system refused: missing file, permission denied, disk full, failed rename.
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An argument of the wrong kind (dtype, type of a JSON value).
class WrongType : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace libtransfer
