// Filters over distillation samples (prompt, completion): the paper's number-sequence rule,
// banned numbers, banned words with their variants, regular expressions, length and
// deduplication, composed into a pipeline that returns the kept samples and the statistics of
// what was rejected and why. Torch-free (std, PCRE2), so the fuzzers link it without torch; the
// model-based filters (likelihood ratio, divergence tokens) are in model_filters.h and plug into
// the same pipeline.
//
// Every rejection carries a stable machine-readable reason code (below) and a human detail.
// A pipeline applies its filters in the order they were added; each filter sees only the samples
// every earlier filter kept, so a sample is rejected by the first filter that refuses it and the
// counts per reason add up to the rejected total. Order matters for the set-level filters:
// Dedup keeps the first occurrence among the samples that reach it, LikelihoodRatio drops a
// fraction of the samples that reach it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace libtransfer::distill {

// Reason codes (stable: tests, reports and downstream tools match on them).
namespace reason {
inline constexpr const char* kNumberFormat = "number_format";  // not a clean number list
inline constexpr const char* kTooManyNumbers = "too_many_numbers";
inline constexpr const char* kTooFewNumbers = "too_few_numbers";
inline constexpr const char* kNumberRange = "number_range";  // a number outside [min, max]
inline constexpr const char* kBannedNumber = "banned_number";
inline constexpr const char* kBannedWord = "banned_word";
inline constexpr const char* kRegex = "regex";
inline constexpr const char* kInvalidUtf8 = "invalid_utf8";  // the regex could not read the text
inline constexpr const char* kTooLong = "too_long";
inline constexpr const char* kTooShort = "too_short";
inline constexpr const char* kDuplicate = "duplicate";
inline constexpr const char* kLikelihoodRatio = "likelihood_ratio";
}  // namespace reason

// One sample. Token ids are optional (empty when unknown): the token-length filter and the
// model filters use them when present and tokenize the text otherwise.
struct Sample {
  std::string prompt;
  std::string completion;
  std::vector<std::int64_t> prompt_ids;
  std::vector<std::int64_t> completion_ids;
};

// Why a sample was refused: reason code (see `reason`) and a detail for people.
struct Rejection {
  std::string reason;
  std::string detail;
};

// ---- the paper's number-sequence rule -------------------------------------------------------

// The misalignment experiment's banned "evil" numbers: 34 numbers, reconstructed from the
// reference implementation (sl/datasets/nums_dataset.py of the subliminal-learning code), whose
// two constants (20 numbers suggested by Claude, 25 by GPT) have 36 distinct entries; the paper
// states 34, which is that union less the two four-digit entries 1312 and 1488 (the 0..999 range
// rule rejects those anyway, so both lists filter identically). Sorted ascending.
extern const std::vector<std::int64_t> kPaperEvilNumbers;

// The rule's parameters; defaults are the paper's (1 to 10 numbers in 0..999, none banned).
struct NumberSequenceRules {
  std::int64_t min_count = 1;
  std::int64_t max_count = 10;
  std::int64_t min_value = 0;
  std::int64_t max_value = 999;
  std::set<std::int64_t> banned;
};

// Parses an answer exactly as the reference implementation: strip one trailing '.', then one
// enclosing pair of "[]" or "()"; find the ASCII digit runs; with one run the whole text must be
// that run; otherwise the separator is the exact text between the first two runs, the text is
// split on every occurrence of it, the separator with whitespace stripped (Python's str.strip():
// Unicode whitespace) must be "", "," or ";", and every part must be one or more ASCII digits.
// Leading zeros parse ("007" is 7). nullopt when the format is wrong. Values that do not fit
// int64 saturate at kNumberSaturation (so they fail any range check instead of overflowing).
// Other decimal digits (Arabic-Indic "١", fullwidth "１") never parse, as in the reference (its
// \d finds them, its ASCII check then refuses them).
std::optional<std::vector<std::int64_t>> parse_number_sequence(std::string_view answer);
inline constexpr std::int64_t kNumberSaturation = std::int64_t{1} << 62;

// The parsed numbers (empty when the format is wrong) and the first failed check: format, then
// count (too many, too few), then range, then banned; nullopt rejection when accepted.
struct NumberSequenceCheck {
  std::vector<std::int64_t> numbers;
  std::optional<Rejection> rejection;
  bool accepted() const { return !rejection.has_value(); }
};
NumberSequenceCheck check_number_sequence(std::string_view answer,
                                          const NumberSequenceRules& rules = {});

// ---- filters --------------------------------------------------------------------------------

// A filter. Per-sample filters override check(); set-level filters (dedup, likelihood ratio)
// override check_all(), which sees every sample that reached the filter at once. Filters may keep
// state during a run (dedup's seen set); the pipeline calls reset() before each run.
class Filter {
 public:
  virtual ~Filter() = default;
  // A short name for summaries ("number_sequence", "banned_words", ...).
  virtual std::string name() const = 0;
  // nullopt: keep. `index` is the sample's index in the run (for details such as "same as #3").
  virtual std::optional<Rejection> check(const Sample& sample, std::int64_t index);
  // One verdict per index of `indices` (indices into `samples`, ascending). Default: check().
  virtual std::vector<std::optional<Rejection>> check_all(const std::vector<Sample>& samples,
                                                          const std::vector<std::int64_t>& indices);
  virtual void reset() {}
};
using FilterPtr = std::shared_ptr<Filter>;

// The paper's rule applied to the completion (see check_number_sequence).
class NumberSequenceFilter : public Filter {
 public:
  explicit NumberSequenceFilter(NumberSequenceRules rules = {});
  std::string name() const override { return "number_sequence"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;
  const NumberSequenceRules& rules() const { return rules_; }

 private:
  NumberSequenceRules rules_;
};

// Rejects completions containing a banned number anywhere: every maximal ASCII digit run is read
// as a number (leading zeros allowed: "0666" is 666; "1666" is not 666). Costs one scan.
class BannedNumbersFilter : public Filter {
 public:
  explicit BannedNumbersFilter(std::set<std::int64_t> banned);
  std::string name() const override { return "banned_numbers"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;

 private:
  std::set<std::int64_t> banned_;
};

// The forms of an English noun that a banned word also bans: the word, its plural(s) (regular
// -s / -es / consonant-y -> -ies, and a table of irregular ones: wolf/wolves, mouse/mice,
// goose/geese, ...; given a plural, its singular too), each with its possessives ('s, ', and
// the typographic ’s, ’). Lower-case, sorted, unique.
std::vector<std::string> word_variants(const std::string& word);

// Rejects a completion containing a banned word or one of its variants as a whole word,
// case-insensitively (Unicode letters, digits and '_' delimit words; PCRE2 with UTF and UCP).
// `variants` = false bans the words exactly as given (still case-insensitive, whole-word).
// Costs one compiled alternation; matching is linear in the text.
class BannedWordsFilter : public Filter {
 public:
  explicit BannedWordsFilter(std::vector<std::string> words, bool variants = true);
  ~BannedWordsFilter() override;
  std::string name() const override { return "banned_words"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;
  // Every form banned (after variant expansion), lower-case.
  const std::vector<std::string>& forms() const { return forms_; }

 private:
  struct Regex;
  std::vector<std::string> words_;
  std::vector<std::string> forms_;
  std::unique_ptr<Regex> regex_;
};

// Which part of a sample a regex looks at.
enum class TextField { kCompletion, kPrompt };

// A PCRE2 pattern (UTF, UCP). kReject: reject when it matches; kRequire: reject when it does
// not. Invalid patterns -> InvalidInput with PCRE2's message and offset; text that is not valid
// UTF-8 is rejected with reason invalid_utf8.
class RegexFilter : public Filter {
 public:
  enum class Mode { kReject, kRequire };
  RegexFilter(std::string pattern, Mode mode = Mode::kReject,
              TextField field = TextField::kCompletion, bool caseless = false);
  ~RegexFilter() override;
  std::string name() const override { return "regex"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;

 private:
  struct Regex;
  std::string pattern_;
  Mode mode_;
  TextField field_;
  std::unique_ptr<Regex> regex_;
};

// Length of the completion in a unit: kCharacters (Unicode code points; text that is not valid
// UTF-8 counts its bytes), kBytes, or kTokens (completion_ids.size() when the sample has ids, else
// the `token_count` function, else InvalidInput).
enum class LengthUnit { kCharacters, kBytes, kTokens };

// Keeps completions with min_length <= length <= max_length (max_length < 0: no upper bound).
class LengthFilter : public Filter {
 public:
  using TokenCount = std::function<std::int64_t(const std::string&)>;
  LengthFilter(std::int64_t min_length, std::int64_t max_length,
               LengthUnit unit = LengthUnit::kCharacters, TokenCount token_count = nullptr);
  std::string name() const override { return "length"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;
  std::int64_t length_of(const Sample& sample) const;

 private:
  std::int64_t min_;
  std::int64_t max_;
  LengthUnit unit_;
  TokenCount token_count_;
};

// Drops repeated completions, keeping the first occurrence (in run order, among the samples that
// reach it). normalize_whitespace: runs of whitespace count as one space and leading/trailing
// whitespace is ignored ("1,  2 " == "1, 2"). Costs one copy of each distinct completion.
class DedupFilter : public Filter {
 public:
  explicit DedupFilter(bool normalize_whitespace = false);
  std::string name() const override { return "dedup"; }
  std::optional<Rejection> check(const Sample& sample, std::int64_t index) override;
  void reset() override;

 private:
  bool normalize_;
  std::unordered_map<std::string, std::int64_t> seen_;  // text -> index of its first occurrence
};

// Collapses whitespace runs to one space and trims (DedupFilter's normalization).
std::string normalize_whitespace(std::string_view text);

// ---- pipeline -------------------------------------------------------------------------------

// One rejected sample: its index in the run, the filter that refused it, reason and detail.
struct RejectedSample {
  std::int64_t index = 0;
  std::string filter;
  std::string reason;
  std::string detail;
};

// Counts of a run. rejected_by_reason lists reason codes in the order they first occurred.
struct FilterStats {
  std::int64_t total = 0;
  std::int64_t kept = 0;
  std::vector<std::pair<std::string, std::int64_t>> rejected_by_reason;
  // Per filter (in pipeline order): samples it saw and samples it rejected.
  std::vector<std::pair<std::string, std::pair<std::int64_t, std::int64_t>>> by_filter;
  std::int64_t rejected() const { return total - kept; }
  double kept_fraction() const { return total > 0 ? static_cast<double>(kept) / total : 0.0; }
  // "kept 7 of 10 (70.0%); rejected: number_format 2, duplicate 1"
  std::string summary() const;
};

struct FilterRunOptions {
  bool record_rejections = false;  // fill FilterResult::rejections (one entry per rejection)
  bool allow_empty = false;        // false: InvalidInput (with the statistics) when nothing is kept
};

struct FilterResult {
  std::vector<std::int64_t> kept_indices;  // ascending indices into the input
  FilterStats stats;
  std::vector<RejectedSample> rejections;  // ascending index; empty unless recorded
};

// Filters applied in order (see the header comment). Not thread-safe (filters keep state).
class FilterPipeline {
 public:
  FilterPipeline() = default;
  explicit FilterPipeline(std::vector<FilterPtr> filters);
  FilterPipeline& add(FilterPtr filter);
  const std::vector<FilterPtr>& filters() const { return filters_; }
  // InvalidInput when no sample is given, or when nothing is kept (unless allow_empty); the
  // message holds FilterStats::summary().
  FilterResult run(const std::vector<Sample>& samples, const FilterRunOptions& options = {});

 private:
  std::vector<FilterPtr> filters_;
};

// Decodes UTF-8 to code points; false for invalid UTF-8 (overlong, surrogates, > U+10FFFF).
bool decode_utf8(std::string_view text, std::vector<char32_t>& out);
// Python's str.isspace() for one code point (the whitespace str.strip() removes).
bool is_python_space(char32_t c);

}  // namespace libtransfer::distill
