// Fuzzes SafetensorsFile::open. Accepted files must satisfy the format's invariants (tensors
// tile the data section) and survive a round trip through write_safetensors unchanged.
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "libtransfer/io/safetensors.h"

using libtransfer::fuzz::check;
using libtransfer::fuzz::parses_cleanly;
using libtransfer::fuzz::ScratchFile;
namespace io = libtransfer::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ScratchFile input("safetensors_in"), output("safetensors_out");
  const std::string& path = input.write(data, size);
  std::optional<io::SafetensorsFile> file;
  if (!parses_cleanly([&] { file.emplace(io::SafetensorsFile::open(path)); })) return 0;

  // Invariants of an accepted file.
  const std::uint64_t data_size = size - file->data_start();
  std::uint64_t expected = 0;
  std::vector<io::TensorView> views;
  for (const io::TensorInfo& t : file->tensors()) {
    check(t.begin == expected, "tensors do not tile the data section");
    check(t.nbytes() == static_cast<std::uint64_t>(t.numel()) * io::dtype_size(t.dtype),
          "a tensor's byte count disagrees with its shape");
    check(file->contains(t.name) && &file->info(t.name) == &t, "info() finds another entry");
    expected = t.end;
    const std::uint8_t* bytes = file->data(t);
    check(
        t.nbytes() == 0 || std::memcmp(bytes, data + file->data_start() + t.begin, t.nbytes()) == 0,
        "data() does not point at the tensor's bytes");
    views.push_back({t.name, t.dtype, t.shape, bytes, t.nbytes()});
  }
  check(expected == data_size, "trailing bytes were accepted");

  // Round trip: what we read, we can write, and read back the same.
  io::write_safetensors(output.path(), views, file->metadata());
  const auto again = io::SafetensorsFile::open(output.path());
  check(again.metadata() == file->metadata(), "metadata changed in a round trip");
  check(again.size() == file->size(), "tensor count changed in a round trip");
  for (const io::TensorInfo& t : file->tensors()) {
    const io::TensorInfo& u = again.info(t.name);
    check(u.dtype == t.dtype && u.shape == t.shape, "dtype or shape changed in a round trip");
    check(t.nbytes() == 0 || std::memcmp(again.data(u), file->data(t), t.nbytes()) == 0,
          "tensor bytes changed in a round trip");
  }
  return 0;
}
