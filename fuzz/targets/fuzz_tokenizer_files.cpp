// Fuzzes Tokenizer::from_files (GPT-2's vocab.json + merges.txt). The input is
// vocab.json, "\n\f\n", merges.txt, "\n\f\n", then a text to encode with the loaded tokenizer.
// Accepted tokenizers must encode valid UTF-8 to in-range ids that decode back to the text (the
// GPT-2 split pattern covers every character), or refuse a byte the vocabulary cannot spell.
#include <optional>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "libtransfer/io/pretokenizer.h"
#include "libtransfer/io/tokenizer.h"

using libtransfer::fuzz::check;
using libtransfer::fuzz::parses_cleanly;
using libtransfer::fuzz::ScratchFile;
using libtransfer::fuzz::split_part;
namespace io = libtransfer::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ScratchFile vocab_file("vocab.json"), merges_file("merges.txt");
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const auto [vocab, rest] = split_part(all);
  const auto [merges, text] = split_part(rest);
  vocab_file.write(vocab);
  merges_file.write(merges);
  std::optional<io::Tokenizer> tok;
  if (!parses_cleanly(
          [&] { tok.emplace(io::Tokenizer::from_files(vocab_file.path(), merges_file.path())); })) {
    return 0;
  }
  const std::int32_t n = tok->vocab_size();
  check(n >= 1 || tok->added_tokens().empty(), "added tokens without a vocabulary");
  for (std::int32_t id = 0; id < n; ++id) {
    check(tok->token_to_id(tok->id_to_token(id)) == id, "token_to_id(id_to_token(id)) != id");
    const std::string shown = tok->display_token(id);
    check(io::find_invalid_utf8(shown) == std::string_view::npos, "display_token is not UTF-8");
  }
  std::vector<std::int32_t> ids;
  const std::string_view to_encode = text;  // lambdas cannot capture bindings in C++17
  if (!parses_cleanly([&] { ids = tok->encode(to_encode); })) return 0;
  for (const std::int32_t id : ids) check(id >= 0 && id < n, "encode produced an id out of range");
  check(tok->decode(ids) == text, "decode(encode(text)) != text");
  return 0;
}
