// Fuzzes read_fingerprint_file (the fingerprint accumulator format: safetensors plus metadata).
// Accepted files must give a state whose sizes agree with each other and with the metadata.
#include <string>

#include "fuzz_support.h"
#include "libtransfer/io/fingerprint_file.h"

using libtransfer::fuzz::check;
using libtransfer::fuzz::parses_cleanly;
using libtransfer::fuzz::ScratchFile;
namespace io = libtransfer::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ScratchFile input("fingerprint_in");
  const std::string& path = input.write(data, size);
  io::FingerprintFileState state;
  if (!parses_cleanly([&] { state = io::read_fingerprint_file(path); })) return 0;

  const auto v = static_cast<std::size_t>(state.vocab_size);
  const std::size_t s = state.subset.size(), q = state.sequence_ids.size();
  check(state.vocab_size >= 1 && state.sum_delta.size() == v && state.sum_delta_sq.size() == v &&
            state.sum_grad.size() == v,
        "[V] sums disagree with vocab_size");
  check(state.sum_centered.size() == s && state.sequence_counts.size() == q,
        "[S] or [Q] tensors disagree");
  check(state.sequence_sum_centered.size() == (state.per_sequence ? q * s : 0),
        "per-sequence sums disagree with [Q, S]");
  check(state.temperature > 0.0, "temperature not positive");
  std::int64_t total = 0;
  for (std::size_t i = 0; i < q; ++i) total += state.sequence_counts[i];
  check(total == state.positions, "sequence counts do not add up to positions");
  for (std::size_t i = 0; i < s; ++i) {
    check(state.subset[i] >= 0 && state.subset[i] < state.vocab_size, "subset id out of range");
    check(i == 0 || state.subset[i - 1] < state.subset[i], "subset not strictly ascending");
  }
  check(state.metadata.at("format") == io::kFingerprintFileFormat, "format key lost");

  // The expected-vocabulary check refuses any other size, cleanly.
  check(!parses_cleanly([&] { io::read_fingerprint_file(path, state.vocab_size + 1); }),
        "a file of another vocabulary size was accepted");
  return 0;
}
