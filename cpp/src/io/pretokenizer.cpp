#include "libtransfer/io/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <new>
#include <vector>

#include "libtransfer/errors.h"

namespace libtransfer::io {
namespace {

// Unicode White_Space (Unicode 15): what `\s` matches in GPT-2's Python `regex` module.
constexpr const char* kWhiteSpaceClass =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

void append_utf8(std::string* out, std::uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

std::string gpt2_split_pattern() {
  const std::string ws = kWhiteSpaceClass;
  return "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + ws + "\\p{L}\\p{N}]+|[" + ws +
         "]+(?![^" + ws + "])|[" + ws + "]+";
}

std::size_t find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;  // continuation byte, C0/C1 (always overlong) or F5..FF
    }
    if (i + len > n) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    const bool overlong = (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return i;
    i += len;
  }
  return std::string_view::npos;
}

void check_utf8(std::string_view text, const std::string& what) {
  const std::size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos) {
    throw InvalidInput(what + ": invalid UTF-8 at byte offset " + std::to_string(bad));
  }
}

ByteAlphabet::ByteAlphabet() {
  byte_of_code_point_.fill(-1);
  // Printable Latin-1 bytes stand for themselves; the other 68 take 256, 257, ... in order.
  auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const int cp = printable(b) ? b : next++;
    append_utf8(&symbols_[b], static_cast<std::uint32_t>(cp));
    byte_of_code_point_[cp] = static_cast<std::int16_t>(b);
  }
}

std::string ByteAlphabet::encode(std::string_view bytes) const {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char c : bytes) out += symbols_[static_cast<unsigned char>(c)];
  return out;
}

bool ByteAlphabet::decode(std::string_view symbols, std::string* out) const {
  out->clear();
  const auto* s = reinterpret_cast<const unsigned char*>(symbols.data());
  std::size_t i = 0;
  while (i < symbols.size()) {
    std::uint32_t cp;
    if (s[i] < 0x80) {
      cp = s[i];
      i += 1;
    } else if ((s[i] & 0xE0) == 0xC0 && i + 1 < symbols.size()) {
      cp = ((s[i] & 0x1F) << 6) | (s[i + 1] & 0x3F);
      i += 2;
    } else {
      return false;  // every symbol of the alphabet is below U+0800
    }
    if (cp >= byte_of_code_point_.size() || byte_of_code_point_[cp] < 0) return false;
    out->push_back(static_cast<char>(byte_of_code_point_[cp]));
  }
  return true;
}

struct Pretokenizer::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() {
    if (code != nullptr) pcre2_code_free(code);
  }
};

Pretokenizer::Pretokenizer(const std::string& pattern)
    : pattern_(pattern), compiled_(std::make_unique<Compiled>()) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  compiled_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                  PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (compiled_->code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    throw InvalidInput("pre-tokenizer regex '" + pattern + "' does not compile at offset " +
                       std::to_string(offset) + ": " + reinterpret_cast<const char*>(message));
  }
  // JIT is several times faster; without it (unsupported CPU) the interpreter still works.
  compiled_->jit = pcre2_jit_compile(compiled_->code, PCRE2_JIT_COMPLETE) == 0;
}

Pretokenizer::~Pretokenizer() = default;

void Pretokenizer::split(std::string_view text,
                         const std::function<void(std::size_t, std::size_t)>& piece) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(compiled_->code, nullptr);
  if (md == nullptr) throw std::bad_alloc();
  std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> guard(md, &pcre2_match_data_free);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  PCRE2_SIZE offset = 0;
  while (offset < text.size()) {
    // The text was validated once by the caller; re-checking on every call would be quadratic.
    const int rc = compiled_->jit ? pcre2_jit_match(compiled_->code, subject, text.size(), offset,
                                                    0, md, nullptr)
                                  : pcre2_match(compiled_->code, subject, text.size(), offset,
                                                PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      throw InvalidInput("pre-tokenizer regex failed at byte offset " + std::to_string(offset) +
                         ": " + reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[1] == ov[0]) {  // an empty match (custom patterns only): step one character
      offset = ov[1] + 1;
      while (offset < text.size() && (subject[offset] & 0xC0) == 0x80) ++offset;
      continue;
    }
    piece(ov[0], ov[1]);
    offset = ov[1];
  }
}

}  // namespace libtransfer::io
