// Byte-level BPE tokenizer (GPT-2 family): loads vocab.json + merges.txt or a Hugging Face
// tokenizer.json, encodes text to ids exactly as GPT-2 does, decodes, and classifies tokens
// (numeric, alphabetic, ...) for the fingerprint pillar's token subsets and number units.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace libtransfer::io {

// Per-token flags (a bitmask), computed once at load from each token's raw bytes.
// Combine with | and test with has_class(); token_classes() returns the mask as uint32_t.
enum class TokenClass : std::uint32_t {
  kNone = 0,
  kNumeric = 1u << 0,        // 1+ ASCII digits, optionally after one leading space: "087", " 7"
  kAlphabetic = 1u << 1,     // 1+ Unicode letters, optionally after one leading space
  kSpacePrefixed = 1u << 2,  // the bytes start with a space (0x20)
  kWhitespace = 1u << 3,     // 1+ Unicode White_Space characters and nothing else
  kPunctuation = 1u << 4,    // 1+ Unicode punctuation/symbol characters, optional leading space
  kSpecial = 1u << 5,        // a special added token, or a vocab entry BPE never produces
  kAdded = 1u << 6,          // an added token (matched in the text before pre-tokenization)
  kPartialUtf8 = 1u << 7,    // the bytes are not valid UTF-8 alone (part of a character)
};
constexpr TokenClass operator|(TokenClass a, TokenClass b) {
  return static_cast<TokenClass>(static_cast<std::uint32_t>(a) | static_cast<std::uint32_t>(b));
}
constexpr bool has_class(std::uint32_t mask, TokenClass c) {
  return (mask & static_cast<std::uint32_t>(c)) != 0;
}

// A token matched verbatim in the input before pre-tokenization (tokenizer.json "added_tokens").
struct AddedToken {
  std::int32_t id = 0;
  std::string content;   // raw UTF-8 text, matched as is (lstrip/rstrip/single_word ignored)
  bool special = false;  // flagged TokenClass::kSpecial
};

// How numbers tokenize: the "number unit" view the fingerprint pillar needs.
struct NumberSummary {
  static constexpr int kMaxDigits = 3;  // the paper's numbers are 0..999
  // units_*[d] = how many tokens are exactly d ASCII digits, for d = 1 .. max(kMaxDigits, the
  // longest numeric token) ([0] unused),
  // without / with one leading space.
  std::vector<std::int64_t> units_without_space;
  std::vector<std::int64_t> units_with_space;
  // Of "0".."999" (1000 strings), how many encode to a single token.
  std::int64_t single_token_0_999_without_space = 0;
  std::int64_t single_token_0_999_with_space = 0;
  // Of "000".."099" (100 zero-padded strings), how many encode to a single token.
  std::int64_t single_token_000_099_without_space = 0;
  std::int64_t single_token_000_099_with_space = 0;
};

// A byte-level BPE tokenizer. Loading costs one pass over the vocabulary (about 50 ms for
// GPT-2); encoding is regex pre-tokenization (PCRE2 JIT) plus BPE per piece, with a cache.
//
// Thread-safety: every method is const and may be called concurrently. The piece -> ids cache
// is split into mutex-protected shards (bounded: a full shard is cleared). Copies share the
// immutable tables and the cache.
//
// Validation (InvalidInput, message naming the file and the problem): the ids of vocab and
// added tokens together must be distinct and dense, 0..N-1 (a gap is an error: vocab_size()
// is then exact and every id decodes); every merge must be two symbols present in the vocab
// whose concatenation is in the vocab; all files must be UTF-8. A merge listed twice keeps
// its last rank, as GPT-2's `dict(zip(merges, range(n)))` and Hugging Face do.
//
// Known difference to the JavaScript port (gpt-3-encoder): its `\s` omits U+0085 and adds
// U+FEFF; we follow GPT-2's Python `regex` (Unicode White_Space), so texts containing those two
// characters may split differently. Tokenizers from tokenizer.json with their own Split regex
// use PCRE2's `\s` (UCP: separators plus \t\n\v\f\r).
class Tokenizer {
 public:
  // GPT-2 files: vocab.json (encoder.json) maps byte-level tokens to ids; merges.txt
  // (vocab.bpe) lists "a b" pairs by rank, with an optional "#version" first line.
  // FileError if a file cannot be read; InvalidInput if it is malformed.
  static Tokenizer from_files(const std::string& vocab_json_path,
                              const std::string& merges_txt_path);
  // A Hugging Face tokenizer.json with model.type "BPE", a ByteLevel pre-tokenizer (or a
  // Sequence of a Split regex then ByteLevel without regex) and a ByteLevel decoder.
  static Tokenizer from_tokenizer_json(const std::string& path);

  // Ids of `text` (valid UTF-8, else InvalidInput with the byte offset). No BOS/EOS added.
  std::vector<std::int32_t> encode(std::string_view text) const;
  // encode() of each text, on up to `num_threads` threads (0: hardware concurrency).
  std::vector<std::vector<std::int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                      int num_threads = 0) const;
  // Raw bytes of the tokens, concatenated. May be invalid UTF-8 when a multi-byte character is
  // cut between ids. InvalidInput for an id outside 0..vocab_size()-1.
  std::string decode(const std::vector<std::int32_t>& ids) const;

  std::int32_t vocab_size() const;
  // The id of a token in byte-level form ("Ġthe") or of an added token's content.
  std::optional<std::int32_t> token_to_id(std::string_view token) const;
  // The byte-level form of a token ("Ġthe"); an added token's content as is.
  const std::string& id_to_token(std::int32_t id) const;
  // The raw bytes a token stands for (" the").
  const std::string& token_bytes(std::int32_t id) const;
  // A readable form: spaces shown as "␣" (U+2423), backslash as "\\", control bytes, DEL and
  // bytes that are not valid UTF-8 as "\xNN". "␣the", "\x0A", "\xE2\x80".
  std::string display_token(std::int32_t id) const;

  // TokenClass bits of a token.
  std::uint32_t token_classes(std::int32_t id) const;
  // Ids having every bit of `required` and none of `excluded`, ascending.
  std::vector<std::int32_t> ids_with_class(TokenClass required,
                                           TokenClass excluded = TokenClass::kNone) const;
  // Tokens that are 1+ ASCII digits: with a leading space (true), without (false), or both.
  std::vector<std::int32_t> numeric_token_ids(std::optional<bool> leading_space) const;
  // How a number tokenizes: encode(number) or encode(" " + number). `number` must be 1+ ASCII
  // digits (InvalidInput otherwise).
  std::vector<std::int32_t> encode_number(std::string_view number, bool leading_space) const;
  NumberSummary number_summary() const;

  const std::vector<AddedToken>& added_tokens() const;
  // FNV-1a 64 (hex, 16 characters) of a canonical serialization of the token strings by id,
  // the merges by rank, the added tokens, the split regex and add_prefix_space: equal hashes
  // mean equal encodings. A GPT-2 from_files() and its tokenizer.json differ (added tokens).
  std::string hash() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<Impl> impl_;
};

}  // namespace libtransfer::io
