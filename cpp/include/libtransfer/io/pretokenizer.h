// Byte-level BPE building blocks: UTF-8 validation, GPT-2's byte <-> unicode alphabet and the
// regex pre-tokenizer (PCRE2, JIT compiled). Torch-free; used by io::Tokenizer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace libtransfer::io {

// GPT-2's split pattern with `\s` spelled out as the Unicode White_Space set, which is what
// GPT-2's Python `regex` module matches. PCRE2's own `\s` (UCP) misses U+0085, and the
// JavaScript port's `\s` misses U+0085 but adds U+FEFF: see docs in tokenizer.h.
std::string gpt2_split_pattern();

// Byte offset of the first invalid UTF-8 sequence in `text` (overlong forms, surrogates and
// code points above U+10FFFF are invalid), or npos when the whole text is valid.
std::size_t find_invalid_utf8(std::string_view text);

// Throws InvalidInput "<what>: invalid UTF-8 at byte offset N" when `text` is not valid UTF-8.
void check_utf8(std::string_view text, const std::string& what);

// GPT-2's bytes_to_unicode(): each byte maps to one printable code point, so byte strings can
// be written as text ("Ġ" is the space byte). A table of 256 UTF-8 strings plus its inverse.
class ByteAlphabet {
 public:
  ByteAlphabet();
  // UTF-8 encoding of the code point standing for `byte`.
  const std::string& symbol(std::uint8_t byte) const { return symbols_[byte]; }
  // Encodes raw bytes into the byte-level form (" the" -> "Ġthe").
  std::string encode(std::string_view bytes) const;
  // Decodes a byte-level string back to raw bytes; false when it holds a code point outside
  // the alphabet (then `out` is unspecified).
  bool decode(std::string_view symbols, std::string* out) const;

 private:
  std::array<std::string, 256> symbols_;
  std::array<std::int16_t, 324> byte_of_code_point_;  // -1 where the code point is unused
};

// A compiled split regex. Splitting returns the matched pieces in order (text between matches
// is dropped, as in the reference implementations). Costs one PCRE2 compile + JIT at
// construction; split() allocates one match-data block per call, so it is thread-safe.
class Pretokenizer {
 public:
  // Throws InvalidInput naming the pattern and PCRE2's message if it does not compile.
  explicit Pretokenizer(const std::string& pattern);
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  // Calls `piece(begin, end)` for each match in `text`, which must be valid UTF-8 (not checked
  // here: validate once with check_utf8, then split many times).
  void split(std::string_view text,
             const std::function<void(std::size_t, std::size_t)>& piece) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Compiled;
  std::string pattern_;
  std::unique_ptr<Compiled> compiled_;
};

}  // namespace libtransfer::io
