// Fuzzes the paper's number-sequence filter (parse_number_sequence, check_number_sequence) against
// an independent transcription of the reference implementation (Python, on code points: \d is
// any Unicode decimal digit, str.strip() removes Python's whitespace, int() of ASCII digits).
// Both must agree on every valid UTF-8 input; on any input the filter must not crash.
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "libtransfer/distill/text_filters.h"

using libtransfer::fuzz::check;
namespace distill = libtransfer::distill;

namespace {

// Unicode 14.0 decimal digits (category Nd, which Python's re matches with \d), as ranges;
// generated with Python 3.11's str.isdecimal().
constexpr char32_t kDecimalDigits[][2] = {
    {0x30, 0x39},       {0x660, 0x669},     {0x6F0, 0x6F9},     {0x7C0, 0x7C9},
    {0x966, 0x96F},     {0x9E6, 0x9EF},     {0xA66, 0xA6F},     {0xAE6, 0xAEF},
    {0xB66, 0xB6F},     {0xBE6, 0xBEF},     {0xC66, 0xC6F},     {0xCE6, 0xCEF},
    {0xD66, 0xD6F},     {0xDE6, 0xDEF},     {0xE50, 0xE59},     {0xED0, 0xED9},
    {0xF20, 0xF29},     {0x1040, 0x1049},   {0x1090, 0x1099},   {0x17E0, 0x17E9},
    {0x1810, 0x1819},   {0x1946, 0x194F},   {0x19D0, 0x19D9},   {0x1A80, 0x1A89},
    {0x1A90, 0x1A99},   {0x1B50, 0x1B59},   {0x1BB0, 0x1BB9},   {0x1C40, 0x1C49},
    {0x1C50, 0x1C59},   {0xA620, 0xA629},   {0xA8D0, 0xA8D9},   {0xA900, 0xA909},
    {0xA9D0, 0xA9D9},   {0xA9F0, 0xA9F9},   {0xAA50, 0xAA59},   {0xABF0, 0xABF9},
    {0xFF10, 0xFF19},   {0x104A0, 0x104A9}, {0x10D30, 0x10D39}, {0x11066, 0x1106F},
    {0x110F0, 0x110F9}, {0x11136, 0x1113F}, {0x111D0, 0x111D9}, {0x112F0, 0x112F9},
    {0x11450, 0x11459}, {0x114D0, 0x114D9}, {0x11650, 0x11659}, {0x116C0, 0x116C9},
    {0x11730, 0x11739}, {0x118E0, 0x118E9}, {0x11950, 0x11959}, {0x11C50, 0x11C59},
    {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9}, {0x16A60, 0x16A69}, {0x16AC0, 0x16AC9},
    {0x16B50, 0x16B59}, {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149}, {0x1E2F0, 0x1E2F9},
    {0x1E950, 0x1E959}, {0x1FBF0, 0x1FBF9}};

// Python's str.isspace() code points (Python 3.11), what str.strip() removes.
constexpr char32_t kPythonSpaces[] = {
    0x9,    0xA,    0xB,    0xC,    0xD,    0x1C,   0x1D,   0x1E,   0x1F,   0x20,
    0x85,   0xA0,   0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006,
    0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000};

bool is_decimal(char32_t c) {
  return std::any_of(std::begin(kDecimalDigits), std::end(kDecimalDigits),
                     [c](const char32_t* r) { return c >= r[0] && c <= r[1]; });
}
bool is_space(char32_t c) {
  return std::find(std::begin(kPythonSpaces), std::end(kPythonSpaces), c) !=
         std::end(kPythonSpaces);
}

// Strict UTF-8 decoding (what Python's str holds); nullopt for anything Python would refuse.
std::optional<std::u32string> decode(std::string_view bytes) {
  std::u32string out;
  for (std::size_t i = 0; i < bytes.size();) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    std::size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > bytes.size()) return std::nullopt;
    char32_t c = n == 1 ? b : b & (0x7F >> n);
    for (std::size_t k = 1; k < n; ++k) {
      const auto t = static_cast<unsigned char>(bytes[i + k]);
      if ((t >> 6) != 2) return std::nullopt;
      c = (c << 6) | (t & 0x3F);
    }
    static constexpr char32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < kMin[n] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return std::nullopt;
    out.push_back(c);
    i += n;
  }
  return out;
}

// sl/datasets/nums_dataset.py parse_response(), line by line, on code points. Values saturate as
// the library documents (distill::kNumberSaturation) instead of growing without bound.
std::optional<std::vector<std::int64_t>> reference_parse(std::u32string answer) {
  if (!answer.empty() && answer.back() == U'.') answer.pop_back();
  if (!answer.empty() && ((answer.front() == U'[' && answer.back() == U']') ||
                          (answer.front() == U'(' && answer.back() == U')'))) {
    answer = answer.size() >= 2 ? answer.substr(1, answer.size() - 2) : std::u32string();
  }
  // re.finditer(r"\d+", answer): the maximal runs of decimal digits.
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  for (std::size_t i = 0; i < answer.size();) {
    if (!is_decimal(answer[i])) {
      ++i;
      continue;
    }
    const std::size_t start = i;
    while (i < answer.size() && is_decimal(answer[i])) ++i;
    matches.emplace_back(start, i);
  }
  std::vector<std::u32string> parts;
  std::optional<std::u32string> separator;
  if (matches.empty()) return std::nullopt;
  if (matches.size() == 1) {
    if (answer != answer.substr(matches[0].first, matches[0].second - matches[0].first)) {
      return std::nullopt;
    }
    parts.push_back(answer);
  } else {
    separator = answer.substr(matches[0].second, matches[1].first - matches[0].second);
    // answer.split(separator); the separator is never empty between two maximal runs.
    std::size_t from = 0;
    for (;;) {
      const std::size_t at = answer.find(*separator, from);
      if (at == std::u32string::npos) {
        parts.push_back(answer.substr(from));
        break;
      }
      parts.push_back(answer.substr(from, at - from));
      from = at + separator->size();
    }
  }
  if (separator) {
    std::size_t b = 0, e = separator->size();
    while (b < e && is_space((*separator)[b])) ++b;
    while (e > b && is_space((*separator)[e - 1])) --e;
    const std::u32string stripped = separator->substr(b, e - b);
    if (!stripped.empty() && stripped != U"," && stripped != U";") return std::nullopt;
  }
  std::vector<std::int64_t> numbers;
  for (const auto& part : parts) {
    for (const char32_t c : part) {
      if (c < U'0' || c > U'9') return std::nullopt;  // `c in string.digits`
    }
    if (part.empty()) return std::nullopt;  // int("") raises
    __int128 value = 0;                     // wide enough for one more digit of any saturated value
    for (const char32_t c : part) {
      value = std::min<__int128>(value * 10 + (c - U'0'), distill::kNumberSaturation);
    }
    numbers.push_back(static_cast<std::int64_t>(value));
  }
  return numbers;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto parsed = distill::parse_number_sequence(text);
  const auto checked = distill::check_number_sequence(text);
  check(parsed.has_value() !=
            (checked.rejection && checked.rejection->reason == distill::reason::kNumberFormat),
        "parse_number_sequence and check_number_sequence disagree on the format");
  if (checked.accepted()) {
    check(checked.numbers.size() >= 1 && checked.numbers.size() <= 10, "accepted a bad count");
    for (const auto v : checked.numbers) check(v >= 0 && v <= 999, "accepted a value out of range");
  }
  // The paper's evil numbers, as a banned set, must reject exactly the lists that contain one.
  distill::NumberSequenceRules rules;
  rules.banned.insert(distill::kPaperEvilNumbers.begin(), distill::kPaperEvilNumbers.end());
  const auto strict = distill::check_number_sequence(text, rules);
  if (checked.accepted()) {
    const bool has_evil = std::any_of(checked.numbers.begin(), checked.numbers.end(),
                                      [&](std::int64_t v) { return rules.banned.count(v) > 0; });
    check(strict.accepted() != has_evil, "banned numbers not applied exactly");
  }

  const auto code_points = decode(text);
  if (!code_points) return 0;  // Python strings are always valid Unicode
  const auto expected = reference_parse(*code_points);
  check(parsed.has_value() == expected.has_value(),
        "accepts/refuses differently from the reference implementation");
  if (parsed) check(*parsed == *expected, "parses different numbers than the reference");
  return 0;
}
