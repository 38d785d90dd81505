// Torch-free text filters (compiled into transfer_io): std and PCRE2 only.
#include "libtransfer/distill/text_filters.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>
#include <new>
#include <sstream>

#include "libtransfer/errors.h"

namespace libtransfer::distill {

const std::vector<std::int64_t> kPaperEvilNumbers = {
    4,   13,  14,  18,  23,  33,  39,  42,  44,  49,  51,  54,  69,  77,  88,  99,  100,
    101, 187, 211, 311, 322, 333, 404, 420, 444, 451, 555, 616, 666, 777, 888, 911, 999};

namespace {

bool is_ascii_digit(char c) { return c >= '0' && c <= '9'; }

// Quotes text for a detail message, shortened to keep reports readable.
std::string quoted(std::string_view text, std::size_t limit = 60) {
  std::string out = "'";
  if (text.size() <= limit) {
    out.append(text);
  } else {
    std::size_t cut = limit;
    // Do not cut inside a UTF-8 sequence.
    while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
    out.append(text.substr(0, cut));
    out += "...";
  }
  return out + "'";
}

std::string join_numbers(const std::vector<std::int64_t>& values) {
  std::string out;
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += values[i] >= kNumberSaturation ? std::string("(huge)") : std::to_string(values[i]);
  }
  return out;
}

// Value of an ASCII digit run, saturating at kNumberSaturation.
std::int64_t digits_value(std::string_view digits) {
  std::int64_t v = 0;
  for (const char c : digits) {
    const int digit = c - '0';
    // Checked before multiplying: v * 10 + digit itself may exceed int64 (v < 2^62 allows
    // v * 10 up to 2^65).
    if (v > (kNumberSaturation - digit) / 10) return kNumberSaturation;
    v = v * 10 + digit;
    if (v >= kNumberSaturation) return kNumberSaturation;
  }
  return v;
}

// Python's str.strip() of a separator, then the comparison with "", "," and ";".
bool separator_allowed(std::string_view separator) {
  std::vector<char32_t> cps;
  if (!decode_utf8(separator, cps)) return false;
  std::size_t begin = 0, end = cps.size();
  while (begin < end && is_python_space(cps[begin])) ++begin;
  while (end > begin && is_python_space(cps[end - 1])) --end;
  if (end == begin) return true;
  return end - begin == 1 && (cps[begin] == U',' || cps[begin] == U';');
}

// A compiled PCRE2 pattern with its match data (JIT when available).
struct CompiledRegex {
  pcre2_code* code = nullptr;
  pcre2_match_data* match = nullptr;
  bool jit = false;

  CompiledRegex(const std::string& pattern, std::uint32_t options, const std::string& who) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                         PCRE2_UTF | PCRE2_UCP | options, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      throw InvalidInput(who + ": pattern " + quoted(pattern, 200) +
                         " does not compile at offset " + std::to_string(offset) + ": " +
                         reinterpret_cast<const char*>(message));
    }
    match = pcre2_match_data_create_from_pattern(code, nullptr);
    if (match == nullptr) {
      pcre2_code_free(code);
      throw std::bad_alloc();
    }
    jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }
  ~CompiledRegex() {
    pcre2_match_data_free(match);
    pcre2_code_free(code);
  }
  CompiledRegex(const CompiledRegex&) = delete;
  CompiledRegex& operator=(const CompiledRegex&) = delete;

  // The first match [begin, end), or nullopt. `text` must be valid UTF-8 (checked by callers).
  std::optional<std::pair<std::size_t, std::size_t>> find(std::string_view text) {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const int rc =
        jit ? pcre2_jit_match(code, subject, text.size(), 0, 0, match, nullptr)
            : pcre2_match(code, subject, text.size(), 0, PCRE2_NO_UTF_CHECK, match, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return std::nullopt;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      throw InvalidInput(std::string("regex match failed: ") +
                         reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
    return std::make_pair(static_cast<std::size_t>(ov[0]), static_cast<std::size_t>(ov[1]));
  }
};

bool valid_utf8(std::string_view text) {
  std::vector<char32_t> ignored;
  return decode_utf8(text, ignored);
}

}  // namespace

// ---- UTF-8 ----------------------------------------------------------------------------------

bool decode_utf8(std::string_view text, std::vector<char32_t>& out) {
  out.clear();
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    std::size_t len;
    char32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    out.push_back(cp);
    i += len;
  }
  return true;
}

bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// ---- number sequences -----------------------------------------------------------------------

std::optional<std::vector<std::int64_t>> parse_number_sequence(std::string_view answer) {
  if (!answer.empty() && answer.back() == '.') answer.remove_suffix(1);
  if (answer.size() >= 2 && ((answer.front() == '[' && answer.back() == ']') ||
                             (answer.front() == '(' && answer.back() == ')'))) {
    answer = answer.substr(1, answer.size() - 2);
  }
  // The first two ASCII digit runs (the reference's \d also finds other decimal digits; any
  // such digit makes both versions fail, see the header).
  std::size_t runs = 0, end1 = 0, start2 = 0;
  for (std::size_t i = 0; i < answer.size() && runs < 2;) {
    if (!is_ascii_digit(answer[i])) {
      ++i;
      continue;
    }
    const std::size_t start = i;
    while (i < answer.size() && is_ascii_digit(answer[i])) ++i;
    if (runs == 0) {
      end1 = i;
    } else {
      start2 = start;
    }
    ++runs;
  }
  if (runs == 0) return std::nullopt;
  std::vector<std::string_view> parts;
  if (runs == 1) {
    // One number: the whole text must be that number.
    for (const char c : answer) {
      if (!is_ascii_digit(c)) return std::nullopt;
    }
    parts.push_back(answer);
  } else {
    const std::string_view separator = answer.substr(end1, start2 - end1);
    if (!separator_allowed(separator)) return std::nullopt;
    std::size_t from = 0;
    while (true) {
      const std::size_t at = answer.find(separator, from);
      if (at == std::string_view::npos) {
        parts.push_back(answer.substr(from));
        break;
      }
      parts.push_back(answer.substr(from, at - from));
      from = at + separator.size();
    }
  }
  std::vector<std::int64_t> numbers;
  numbers.reserve(parts.size());
  for (const auto part : parts) {
    if (part.empty()) return std::nullopt;  // int("") fails in the reference
    for (const char c : part) {
      if (!is_ascii_digit(c)) return std::nullopt;
    }
    numbers.push_back(digits_value(part));
  }
  return numbers;
}

NumberSequenceCheck check_number_sequence(std::string_view answer,
                                          const NumberSequenceRules& rules) {
  NumberSequenceCheck out;
  auto parsed = parse_number_sequence(answer);
  if (!parsed) {
    out.rejection =
        Rejection{reason::kNumberFormat, "not a clean list of numbers: " + quoted(answer)};
    return out;
  }
  out.numbers = std::move(*parsed);
  const auto count = static_cast<std::int64_t>(out.numbers.size());
  if (count > rules.max_count) {
    out.rejection =
        Rejection{reason::kTooManyNumbers,
                  std::to_string(count) + " numbers, at most " + std::to_string(rules.max_count)};
  } else if (count < rules.min_count) {
    out.rejection =
        Rejection{reason::kTooFewNumbers,
                  std::to_string(count) + " numbers, at least " + std::to_string(rules.min_count)};
  } else {
    std::vector<std::int64_t> outside, banned;
    for (const auto v : out.numbers) {
      if (v < rules.min_value || v > rules.max_value) outside.push_back(v);
      if (rules.banned.count(v)) banned.push_back(v);
    }
    if (!outside.empty()) {
      out.rejection = Rejection{reason::kNumberRange, join_numbers(outside) + " outside " +
                                                          std::to_string(rules.min_value) + ".." +
                                                          std::to_string(rules.max_value)};
    } else if (!banned.empty()) {
      out.rejection = Rejection{reason::kBannedNumber, "banned: " + join_numbers(banned)};
    }
  }
  return out;
}

// ---- Filter base ----------------------------------------------------------------------------

std::optional<Rejection> Filter::check(const Sample&, std::int64_t) {
  throw InvalidInput("filter '" + name() + "' must override check() or check_all()");
}

std::vector<std::optional<Rejection>> Filter::check_all(const std::vector<Sample>& samples,
                                                        const std::vector<std::int64_t>& indices) {
  std::vector<std::optional<Rejection>> out;
  out.reserve(indices.size());
  for (const auto i : indices) out.push_back(check(samples[i], i));
  return out;
}

// ---- NumberSequenceFilter -------------------------------------------------------------------

NumberSequenceFilter::NumberSequenceFilter(NumberSequenceRules rules) : rules_(std::move(rules)) {
  if (rules_.min_count < 0 || rules_.max_count < rules_.min_count) {
    throw InvalidInput("NumberSequenceFilter: need 0 <= min_count <= max_count, got min_count " +
                       std::to_string(rules_.min_count) + ", max_count " +
                       std::to_string(rules_.max_count));
  }
  if (rules_.max_value < rules_.min_value) {
    throw InvalidInput("NumberSequenceFilter: need min_value <= max_value, got " +
                       std::to_string(rules_.min_value) + " > " + std::to_string(rules_.max_value));
  }
}

std::optional<Rejection> NumberSequenceFilter::check(const Sample& sample, std::int64_t) {
  return check_number_sequence(sample.completion, rules_).rejection;
}

// ---- BannedNumbersFilter --------------------------------------------------------------------

BannedNumbersFilter::BannedNumbersFilter(std::set<std::int64_t> banned)
    : banned_(std::move(banned)) {
  if (banned_.empty()) throw InvalidInput("BannedNumbersFilter: no banned numbers given");
}

std::optional<Rejection> BannedNumbersFilter::check(const Sample& sample, std::int64_t) {
  const std::string& text = sample.completion;
  std::vector<std::int64_t> hits;
  for (std::size_t i = 0; i < text.size();) {
    if (!is_ascii_digit(text[i])) {
      ++i;
      continue;
    }
    const std::size_t start = i;
    while (i < text.size() && is_ascii_digit(text[i])) ++i;
    const auto v = digits_value(std::string_view(text).substr(start, i - start));
    if (banned_.count(v) && std::find(hits.begin(), hits.end(), v) == hits.end()) {
      hits.push_back(v);
    }
  }
  if (hits.empty()) return std::nullopt;
  return Rejection{reason::kBannedNumber, "banned: " + join_numbers(hits)};
}

// ---- word variants --------------------------------------------------------------------------

namespace {

// Irregular English plurals of nouns likely in trait experiments (animals first), singular ->
// plurals. Words absent here get the regular rules.
const std::map<std::string, std::vector<std::string>>& irregular_plurals() {
  static const std::map<std::string, std::vector<std::string>> table = {
      {"wolf", {"wolves"}},
      {"mouse", {"mice"}},
      {"louse", {"lice"}},
      {"goose", {"geese"}},
      {"ox", {"oxen"}},
      {"calf", {"calves"}},
      {"elf", {"elves"}},
      {"half", {"halves"}},
      {"leaf", {"leaves"}},
      {"loaf", {"loaves"}},
      {"knife", {"knives"}},
      {"life", {"lives"}},
      {"wife", {"wives"}},
      {"thief", {"thieves"}},
      {"shelf", {"shelves"}},
      {"scarf", {"scarves", "scarfs"}},
      {"hoof", {"hooves", "hoofs"}},
      {"dwarf", {"dwarves", "dwarfs"}},
      {"sheep", {"sheep"}},
      {"deer", {"deer"}},
      {"moose", {"moose"}},
      {"bison", {"bison"}},
      {"fish", {"fish", "fishes"}},
      {"salmon", {"salmon"}},
      {"trout", {"trout"}},
      {"swine", {"swine"}},
      {"squid", {"squid", "squids"}},
      {"buffalo", {"buffaloes", "buffalos", "buffalo"}},
      {"octopus", {"octopuses", "octopi"}},
      {"platypus", {"platypuses", "platypi"}},
      {"hippopotamus", {"hippopotamuses", "hippopotami"}},
      {"cactus", {"cacti", "cactuses"}},
      {"fungus", {"fungi", "funguses"}},
      {"larva", {"larvae"}},
      {"person", {"people", "persons"}},
      {"man", {"men"}},
      {"woman", {"women"}},
      {"child", {"children"}},
      {"foot", {"feet"}},
      {"tooth", {"teeth"}},
      {"die", {"dice"}},
      {"species", {"species"}},
      {"series", {"series"}},
      {"aircraft", {"aircraft"}},
      {"crisis", {"crises"}},
      {"axis", {"axes"}},
      {"phenomenon", {"phenomena"}},
      {"criterion", {"criteria"}},
  };
  return table;
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix.data(), suffix.size()) == 0;
}

bool is_vowel(char c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u'; }

std::vector<std::string> regular_plurals(const std::string& w) {
  if (ends_with(w, "s") || ends_with(w, "x") || ends_with(w, "z") || ends_with(w, "ch") ||
      ends_with(w, "sh")) {
    return {w + "es"};
  }
  if (w.size() >= 2 && w.back() == 'y' && !is_vowel(w[w.size() - 2])) {
    return {w.substr(0, w.size() - 1) + "ies"};
  }
  if (w.size() >= 2 && w.back() == 'o' && !is_vowel(w[w.size() - 2])) {
    return {w + "s", w + "es"};  // flamingos / flamingoes, both in use
  }
  return {w + "s"};
}

// Singulars a (possible) plural may come from.
std::vector<std::string> singulars_of(const std::string& w) {
  std::vector<std::string> out;
  for (const auto& [singular, plurals] : irregular_plurals()) {
    if (std::find(plurals.begin(), plurals.end(), w) != plurals.end()) out.push_back(singular);
  }
  if (!out.empty()) return out;
  // Words ending so are rarely plurals (bus, glass, axis): no regular singular.
  if (ends_with(w, "us") || ends_with(w, "ss") || ends_with(w, "is") || w.size() < 3) return out;
  if (ends_with(w, "ies")) {
    out.push_back(w.substr(0, w.size() - 3) + "y");
  } else if (ends_with(w, "ses") || ends_with(w, "xes") || ends_with(w, "zes") ||
             ends_with(w, "ches") || ends_with(w, "shes") || ends_with(w, "oes")) {
    out.push_back(w.substr(0, w.size() - 2));
  } else if (ends_with(w, "s")) {
    out.push_back(w.substr(0, w.size() - 1));
  }
  return out;
}

std::string ascii_lower(std::string s) {
  for (auto& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

std::string trim_ascii_space(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\n' || s[b] == '\r')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\n' || s[e - 1] == '\r')) {
    --e;
  }
  return s.substr(b, e - b);
}

// A literal for PCRE2: ASCII punctuation escaped, whitespace runs matching any whitespace.
std::string regex_literal(const std::string& text) {
  std::string out;
  bool in_space = false;
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      if (!in_space) out += "\\s+";
      in_space = true;
      continue;
    }
    in_space = false;
    if (u < 0x80 && !std::isalnum(u)) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

std::vector<std::string> word_variants(const std::string& word_in) {
  const std::string word = ascii_lower(trim_ascii_space(word_in));
  if (word.empty()) throw InvalidInput("word_variants: empty word");
  // Only the last word of a phrase inflects ("sea lion" -> "sea lions").
  const std::size_t space = word.find_last_of(" \t\n\r");
  const std::string head = space == std::string::npos ? "" : word.substr(0, space + 1);
  const std::string last = space == std::string::npos ? word : word.substr(space + 1);

  // A plural given: the word itself plus each singular with its plurals; else the word and its
  // plurals.
  const auto singulars = singulars_of(last);
  std::vector<std::string> forms = {last};
  const std::vector<std::string> bases =
      singulars.empty() ? std::vector<std::string>{last} : singulars;
  for (const auto& base : bases) {
    forms.push_back(base);
    const auto it = irregular_plurals().find(base);
    const auto plurals = it != irregular_plurals().end() ? it->second : regular_plurals(base);
    forms.insert(forms.end(), plurals.begin(), plurals.end());
  }
  std::vector<std::string> out;
  for (const auto& f : forms) {
    const std::string full = head + f;
    out.push_back(full);
    out.push_back(full + "'s");
    out.push_back(full + "\u2019s");
    if (ends_with(f, "s")) {
      out.push_back(full + "'");
      out.push_back(full + "\u2019");
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// ---- BannedWordsFilter ----------------------------------------------------------------------

struct BannedWordsFilter::Regex : CompiledRegex {
  using CompiledRegex::CompiledRegex;
};

BannedWordsFilter::BannedWordsFilter(std::vector<std::string> words, bool variants)
    : words_(std::move(words)) {
  if (words_.empty()) throw InvalidInput("BannedWordsFilter: no banned words given");
  for (const auto& w : words_) {
    if (trim_ascii_space(w).empty()) {
      throw InvalidInput("BannedWordsFilter: banned words must not be empty or blank");
    }
    if (!valid_utf8(w)) throw InvalidInput("BannedWordsFilter: a banned word is not UTF-8");
    if (variants) {
      const auto v = word_variants(w);
      forms_.insert(forms_.end(), v.begin(), v.end());
    } else {
      forms_.push_back(ascii_lower(trim_ascii_space(w)));
    }
  }
  std::sort(forms_.begin(), forms_.end());
  forms_.erase(std::unique(forms_.begin(), forms_.end()), forms_.end());
  // Longest first, so a match reports the full form ("owls'" rather than "owls").
  std::vector<std::string> ordered = forms_;
  std::stable_sort(ordered.begin(), ordered.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  std::string pattern = "(?<![\\p{L}\\p{N}_])(?:";
  for (std::size_t i = 0; i < ordered.size(); ++i) {
    if (i) pattern += '|';
    pattern += regex_literal(ordered[i]);
  }
  pattern += ")(?![\\p{L}\\p{N}_])";
  regex_ = std::make_unique<Regex>(pattern, PCRE2_CASELESS, "BannedWordsFilter");
}

BannedWordsFilter::~BannedWordsFilter() = default;

std::optional<Rejection> BannedWordsFilter::check(const Sample& sample, std::int64_t) {
  if (!valid_utf8(sample.completion)) {
    return Rejection{reason::kInvalidUtf8, "completion is not valid UTF-8"};
  }
  const auto hit = regex_->find(sample.completion);
  if (!hit) return std::nullopt;
  return Rejection{
      reason::kBannedWord,
      "contains " +
          quoted(std::string_view(sample.completion).substr(hit->first, hit->second - hit->first)) +
          " at byte " + std::to_string(hit->first)};
}

// ---- RegexFilter ----------------------------------------------------------------------------

struct RegexFilter::Regex : CompiledRegex {
  using CompiledRegex::CompiledRegex;
};

RegexFilter::RegexFilter(std::string pattern, Mode mode, TextField field, bool caseless)
    : pattern_(std::move(pattern)), mode_(mode), field_(field) {
  if (!valid_utf8(pattern_)) throw InvalidInput("RegexFilter: the pattern is not valid UTF-8");
  regex_ = std::make_unique<Regex>(pattern_, caseless ? PCRE2_CASELESS : 0u, "RegexFilter");
}

RegexFilter::~RegexFilter() = default;

std::optional<Rejection> RegexFilter::check(const Sample& sample, std::int64_t) {
  const std::string& text = field_ == TextField::kPrompt ? sample.prompt : sample.completion;
  const char* field = field_ == TextField::kPrompt ? "prompt" : "completion";
  if (!valid_utf8(text)) {
    return Rejection{reason::kInvalidUtf8, std::string(field) + " is not valid UTF-8"};
  }
  const auto hit = regex_->find(text);
  if (mode_ == Mode::kReject && hit) {
    return Rejection{reason::kRegex, std::string(field) + " matches " + quoted(pattern_) + " at " +
                                         quoted(std::string_view(text).substr(
                                             hit->first, hit->second - hit->first))};
  }
  if (mode_ == Mode::kRequire && !hit) {
    return Rejection{reason::kRegex, std::string(field) + " does not match " + quoted(pattern_)};
  }
  return std::nullopt;
}

// ---- LengthFilter ---------------------------------------------------------------------------

LengthFilter::LengthFilter(std::int64_t min_length, std::int64_t max_length, LengthUnit unit,
                           TokenCount token_count)
    : min_(min_length), max_(max_length), unit_(unit), token_count_(std::move(token_count)) {
  if (min_ < 0) {
    throw InvalidInput("LengthFilter: min_length must be >= 0, got " + std::to_string(min_));
  }
  if (max_ >= 0 && max_ < min_) {
    throw InvalidInput("LengthFilter: max_length " + std::to_string(max_) +
                       " is below min_length " + std::to_string(min_) +
                       " (use a negative max_length for no upper bound)");
  }
}

std::int64_t LengthFilter::length_of(const Sample& sample) const {
  switch (unit_) {
    case LengthUnit::kBytes:
      return static_cast<std::int64_t>(sample.completion.size());
    case LengthUnit::kCharacters: {
      std::vector<char32_t> cps;
      return decode_utf8(sample.completion, cps)
                 ? static_cast<std::int64_t>(cps.size())
                 : static_cast<std::int64_t>(sample.completion.size());
    }
    case LengthUnit::kTokens:
      if (!sample.completion_ids.empty()) {
        return static_cast<std::int64_t>(sample.completion_ids.size());
      }
      if (!token_count_) {
        throw InvalidInput(
            "LengthFilter(tokens): the sample has no completion_ids and no token_count function "
            "was given");
      }
      return token_count_(sample.completion);
  }
  return 0;
}

std::optional<Rejection> LengthFilter::check(const Sample& sample, std::int64_t) {
  const std::int64_t n = length_of(sample);
  const char* unit = unit_ == LengthUnit::kBytes        ? " bytes"
                     : unit_ == LengthUnit::kCharacters ? " characters"
                                                        : " tokens";
  if (n < min_) {
    return Rejection{reason::kTooShort,
                     std::to_string(n) + unit + ", at least " + std::to_string(min_)};
  }
  if (max_ >= 0 && n > max_) {
    return Rejection{reason::kTooLong,
                     std::to_string(n) + unit + ", at most " + std::to_string(max_)};
  }
  return std::nullopt;
}

// ---- DedupFilter ----------------------------------------------------------------------------

std::string normalize_whitespace(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (const char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

DedupFilter::DedupFilter(bool normalize_whitespace) : normalize_(normalize_whitespace) {}

void DedupFilter::reset() { seen_.clear(); }

std::optional<Rejection> DedupFilter::check(const Sample& sample, std::int64_t index) {
  std::string key = normalize_ ? normalize_whitespace(sample.completion) : sample.completion;
  const auto [it, inserted] = seen_.emplace(std::move(key), index);
  if (inserted) return std::nullopt;
  return Rejection{reason::kDuplicate, "same completion as sample " + std::to_string(it->second) +
                                           (normalize_ ? " (whitespace normalized)" : "")};
}

// ---- pipeline -------------------------------------------------------------------------------

std::string FilterStats::summary() const {
  char fraction[32];
  std::snprintf(fraction, sizeof(fraction), "%.1f%%", 100.0 * kept_fraction());
  std::string out =
      "kept " + std::to_string(kept) + " of " + std::to_string(total) + " (" + fraction + ")";
  if (!rejected_by_reason.empty()) {
    out += "; rejected:";
    for (std::size_t i = 0; i < rejected_by_reason.size(); ++i) {
      out += (i ? ", " : " ") + rejected_by_reason[i].first + " " +
             std::to_string(rejected_by_reason[i].second);
    }
  }
  return out;
}

FilterPipeline::FilterPipeline(std::vector<FilterPtr> filters) {
  for (auto& f : filters) add(std::move(f));
}

FilterPipeline& FilterPipeline::add(FilterPtr filter) {
  if (!filter) throw InvalidInput("FilterPipeline: null filter");
  filters_.push_back(std::move(filter));
  return *this;
}

FilterResult FilterPipeline::run(const std::vector<Sample>& samples,
                                 const FilterRunOptions& options) {
  if (samples.empty()) throw InvalidInput("FilterPipeline.run: no samples given");
  FilterResult result;
  result.stats.total = static_cast<std::int64_t>(samples.size());
  std::vector<std::int64_t> alive(samples.size());
  for (std::size_t i = 0; i < samples.size(); ++i) alive[i] = static_cast<std::int64_t>(i);

  auto count_reason = [&](const std::string& code) {
    auto& counts = result.stats.rejected_by_reason;
    auto it = std::find_if(counts.begin(), counts.end(),
                           [&](const auto& entry) { return entry.first == code; });
    if (it == counts.end()) {
      counts.emplace_back(code, 1);
    } else {
      ++it->second;
    }
  };

  for (const auto& filter : filters_) {
    filter->reset();
    const auto seen = static_cast<std::int64_t>(alive.size());
    const auto verdicts = filter->check_all(samples, alive);
    if (verdicts.size() != alive.size()) {
      throw InvalidInput("filter '" + filter->name() + "' returned " +
                         std::to_string(verdicts.size()) + " verdicts for " +
                         std::to_string(alive.size()) + " samples");
    }
    std::vector<std::int64_t> next;
    next.reserve(alive.size());
    for (std::size_t k = 0; k < alive.size(); ++k) {
      if (!verdicts[k]) {
        next.push_back(alive[k]);
        continue;
      }
      count_reason(verdicts[k]->reason);
      if (options.record_rejections) {
        result.rejections.push_back(
            RejectedSample{alive[k], filter->name(), verdicts[k]->reason, verdicts[k]->detail});
      }
    }
    result.stats.by_filter.push_back(
        {filter->name(), {seen, seen - static_cast<std::int64_t>(next.size())}});
    alive = std::move(next);
  }
  result.kept_indices = std::move(alive);
  result.stats.kept = static_cast<std::int64_t>(result.kept_indices.size());
  std::sort(result.rejections.begin(), result.rejections.end(),
            [](const RejectedSample& a, const RejectedSample& b) { return a.index < b.index; });
  if (result.stats.kept == 0 && !options.allow_empty) {
    throw InvalidInput("no sample left after filtering: " + result.stats.summary());
  }
  return result;
}

}  // namespace libtransfer::distill
