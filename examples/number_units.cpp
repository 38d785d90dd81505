// How GPT-2's tokenizer splits the numbers 0..999, saved as a safetensors file and read back.
//
//   example_number_units <folder with encoder.json and vocab.bpe> <output.safetensors>
//
// Shows the C++ side of the io layer: the byte-level BPE tokenizer, its number-unit view, and
// safetensors writing (atomic) and reading (memory-mapped).
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/io/tokenizer.h"

namespace io = libtransfer::io;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " VOCAB_DIR OUTPUT.safetensors\n";
    return 2;
  }
  try {
    const std::string folder = argv[1];
    const auto tokenizer =
        io::Tokenizer::from_files(folder + "/encoder.json", folder + "/vocab.bpe");

    // tokens[n][s]: how many tokens the number n takes, without (s=0) and with (s=1) a space.
    constexpr int kNumbers = 1000;
    std::vector<std::int32_t> tokens(kNumbers * 2);
    for (int n = 0; n < kNumbers; ++n) {
      for (int s = 0; s < 2; ++s) {
        tokens[n * 2 + s] =
            static_cast<std::int32_t>(tokenizer.encode_number(std::to_string(n), s == 1).size());
      }
    }
    const auto ids = tokenizer.encode("My favorite numbers: 087, 285, 574.");
    std::cout << "vocabulary " << tokenizer.vocab_size() << ", hash " << tokenizer.hash() << "\n";
    for (const auto id : ids) std::cout << tokenizer.display_token(id) << "|" << id << " ";
    std::cout << "\n";

    io::write_safetensors(argv[2],
                          {{"tokens_per_number",
                            io::Dtype::kI32,
                            {kNumbers, 2},
                            tokens.data(),
                            tokens.size() * sizeof(std::int32_t)}},
                          {{"tokenizer_hash", tokenizer.hash()}});
    const auto file = io::SafetensorsFile::open(argv[2]);
    const auto& info = file.info("tokens_per_number");
    const auto* stored = reinterpret_cast<const std::int32_t*>(file.data(info));
    int single[2] = {0, 0};
    for (int n = 0; n < kNumbers; ++n) {
      for (int s = 0; s < 2; ++s) single[s] += stored[n * 2 + s] == 1;
    }
    std::cout << "numbers 0..999 that are one token: " << single[0] << " without a space, "
              << single[1] << " with one\n";
    return 0;
  } catch (const libtransfer::InvalidInput& e) {
    std::cerr << "invalid input: " << e.what() << "\n";
  } catch (const libtransfer::FileError& e) {
    std::cerr << "file error: " << e.what() << "\n";
  }
  return 2;
}
