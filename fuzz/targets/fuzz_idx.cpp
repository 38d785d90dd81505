// Fuzzes read_idx (plain or gzip-compressed IDX files). Accepted arrays must hold exactly the
// bytes their shape announces and survive a round trip through write_idx unchanged.
#include <string>

#include "fuzz_support.h"
#include "libtransfer/io/idx.h"

using libtransfer::fuzz::check;
using libtransfer::fuzz::parses_cleanly;
using libtransfer::fuzz::ScratchFile;
namespace io = libtransfer::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ScratchFile input("idx_in"), output("idx_out");
  const std::string& path = input.write(data, size);
  io::IdxArray array;
  if (!parses_cleanly([&] { array = io::read_idx(path); })) return 0;
  check(!array.shape.empty() && array.shape.size() <= io::kIdxMaxDims, "bad dimension count");
  check(array.data.size() ==
            static_cast<std::size_t>(array.numel()) * io::idx_element_size(array.type),
        "data size disagrees with the shape");
  io::write_idx(output.path(), array, /*gzip=*/size % 2 == 1);
  const io::IdxArray again = io::read_idx(output.path());
  check(again.type == array.type && again.shape == array.shape && again.data == array.data,
        "an IDX round trip changed the array");
  return 0;
}
