// Fuzzes Tokenizer::from_tokenizer_json (a Hugging Face tokenizer.json). The input is the JSON
// text, "\n\f\n", then a text to encode with the loaded tokenizer. Accepted tokenizers must map
// ids and token strings both ways, display every token as UTF-8, and encode valid UTF-8 to
// in-range ids that decode (a custom Split regex may drop text between its matches and
// add_prefix_space adds a space, so decode(encode(text)) == text is not required here).
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
  static ScratchFile json_file("tokenizer.json");
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const auto [json, text] = split_part(all);
  json_file.write(json);
  std::optional<io::Tokenizer> tok;
  if (!parses_cleanly([&] { tok.emplace(io::Tokenizer::from_tokenizer_json(json_file.path())); })) {
    return 0;
  }
  const std::int32_t n = tok->vocab_size();
  for (std::int32_t id = 0; id < n; ++id) {
    check(tok->token_to_id(tok->id_to_token(id)) == id, "token_to_id(id_to_token(id)) != id");
    check(io::find_invalid_utf8(tok->display_token(id)) == std::string_view::npos,
          "display_token is not UTF-8");
  }
  std::vector<std::int32_t> ids;
  const std::string_view to_encode = text;  // lambdas cannot capture bindings in C++17
  if (!parses_cleanly([&] { ids = tok->encode(to_encode); })) return 0;
  for (const std::int32_t id : ids) check(id >= 0 && id < n, "encode produced an id out of range");
  const std::string decoded = tok->decode(ids);
  // add_prefix_space adds at most one space per segment between added tokens.
  check(decoded.size() <= text.size() + ids.size() + 1, "decode(encode(text)) invents bytes");
  return 0;
}
