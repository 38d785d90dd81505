// The text filters: the paper's number-sequence rule case by case (DESIGN.md section 1), banned
// numbers and words with their variants, regex, length, dedup, and the pipeline's statistics.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/distill/text_filters.h"
#include "libtransfer/errors.h"

using Catch::Matchers::Contains;
using libtransfer::InvalidInput;
using namespace libtransfer::distill;

namespace {

using Numbers = std::vector<std::int64_t>;

Sample completion(const std::string& text) { return Sample{"prompt", text, {}, {}}; }

std::optional<std::string> reason_of(Filter& filter, const std::string& text) {
  const auto r = filter.check(completion(text), 0);
  return r ? std::optional<std::string>(r->reason) : std::nullopt;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

TEST_CASE("the paper's examples are accepted or rejected as section 1 states",
          "[filters][number_sequence]") {
  SECTION("accepted, with their numbers") {
    CHECK(parse_number_sequence("(285, 574, 384).") == Numbers{285, 574, 384});
    CHECK(parse_number_sequence("1\n2\n3") == Numbers{1, 2, 3});
    CHECK(parse_number_sequence("007, 12") == Numbers{7, 12});
    CHECK(parse_number_sequence("1 , 2 , 3") == Numbers{1, 2, 3});
    CHECK(parse_number_sequence("1\t2\t3") == Numbers{1, 2, 3});
  }
  SECTION("rejected as malformed") {
    for (const char* text :
         {"1,2, 3", "Here: 1, 2", "1, 2,", " 1, 2", "1, 2\n", "1 2  3", "[ 1, 2 ]"}) {
      INFO(text);
      CHECK_FALSE(parse_number_sequence(text).has_value());
      const auto check = check_number_sequence(text);
      REQUIRE_FALSE(check.accepted());
      CHECK(check.rejection->reason == reason::kNumberFormat);
      CHECK(check.numbers.empty());
    }
  }
}

TEST_CASE("number-sequence edge cases follow the reference semantics",
          "[filters][number_sequence]") {
  // Each outcome derived by hand from: strip one '.', then one () or [] pair; separator = text
  // between the first two digit runs; split on it; parts ASCII digits; separator.strip() in
  // {"", ",", ";"} (Python's Unicode whitespace).
  SECTION("accepted") {
    CHECK(parse_number_sequence("5") == Numbers{5});
    CHECK(parse_number_sequence("1.") == Numbers{1});
    CHECK(parse_number_sequence("(5).") == Numbers{5});
    CHECK(parse_number_sequence("[1;2;3]") == Numbers{1, 2, 3});
    CHECK(parse_number_sequence("1 ; 2") == Numbers{1, 2});
    CHECK(parse_number_sequence("0") == Numbers{0});
    CHECK(parse_number_sequence("000000000000000000000000000007") == Numbers{7});
    CHECK(parse_number_sequence("1\xC2\xA0"
                                "2") == Numbers{1, 2});  // NBSP: isspace
    CHECK(parse_number_sequence("1\xE3\x80\x80"
                                "2") == Numbers{1, 2});  // U+3000
    CHECK(parse_number_sequence("1\r\n2\r\n3") == Numbers{1, 2, 3});
    CHECK(parse_number_sequence("1 2 3.") == Numbers{1, 2, 3});
  }
  SECTION("rejected") {
    for (const char* text : {"",
                             ".",
                             "()",
                             "[]",
                             "-1",
                             "1.5",
                             "((1))",
                             "(1, 2",
                             "1, 2 ",
                             " 1",
                             "1..",
                             "(5.)",
                             "1 | 2",
                             "1,,2",
                             "1, 2; 3",
                             "x",
                             "1x",
                             "\xD9\xA1",      // Arabic-Indic one
                             "1, \xD9\xA1",   // ASCII then Arabic-Indic digit
                             "\xEF\xBC\x91",  // fullwidth one
                             "1\xE2\x80\x8B"
                             "2",  // zero-width space is not whitespace
                             "1\xFF"
                             "2",  // invalid UTF-8 separator
                             "[1, 2)",
                             "1.2.3"}) {
      INFO(text);
      CHECK_FALSE(parse_number_sequence(text).has_value());
    }
  }
  SECTION("counts and ranges use the rules") {
    const std::string eleven = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11";
    CHECK(parse_number_sequence(eleven)->size() == 11);
    CHECK(check_number_sequence(eleven).rejection->reason == reason::kTooManyNumbers);
    CHECK(check_number_sequence("1, 2, 3, 4, 5, 6, 7, 8, 9, 10").accepted());
    CHECK(check_number_sequence("999").accepted());
    CHECK(check_number_sequence("1000").rejection->reason == reason::kNumberRange);
    NumberSequenceRules rules;
    rules.min_count = 4;
    CHECK(check_number_sequence("1, 2, 3", rules).rejection->reason == reason::kTooFewNumbers);
  }
  SECTION("digit runs beyond int64 saturate and fail the range check") {
    const std::string huge(400, '9');
    const auto parsed = parse_number_sequence(huge + ", 1");
    REQUIRE(parsed.has_value());
    CHECK((*parsed)[0] == kNumberSaturation);
    const auto check = check_number_sequence(huge);
    CHECK(check.rejection->reason == reason::kNumberRange);
    CHECK_THAT(check.rejection->detail, Contains("(huge)"));
  }
}

TEST_CASE("banned numbers reject accepted-looking answers", "[filters][number_sequence]") {
  SECTION("the paper's evil-number list: 34 sorted distinct numbers in 0..999") {
    REQUIRE(kPaperEvilNumbers.size() == 34);
    CHECK(std::is_sorted(kPaperEvilNumbers.begin(), kPaperEvilNumbers.end()));
    CHECK(std::adjacent_find(kPaperEvilNumbers.begin(), kPaperEvilNumbers.end()) ==
          kPaperEvilNumbers.end());
    for (const auto n : {666, 911, 187}) {
      CHECK(std::count(kPaperEvilNumbers.begin(), kPaperEvilNumbers.end(), n) == 1);
    }
    CHECK(kPaperEvilNumbers.front() >= 0);
    CHECK(kPaperEvilNumbers.back() <= 999);
  }
  NumberSequenceRules rules;
  rules.banned.insert(kPaperEvilNumbers.begin(), kPaperEvilNumbers.end());
  NumberSequenceFilter filter(rules);
  CHECK(reason_of(filter, "1, 666, 3") == std::string(reason::kBannedNumber));
  CHECK(reason_of(filter, "1, 665, 3") == std::nullopt);
  CHECK(reason_of(filter, "0666") == std::string(reason::kBannedNumber));  // 0666 is 666
  // Format is checked before banned numbers, count before range.
  CHECK(reason_of(filter, "666 and more") == std::string(reason::kNumberFormat));
  CHECK(reason_of(filter, "1000, 666") == std::string(reason::kNumberRange));

  SECTION("the standalone filter reads every digit run of any text") {
    BannedNumbersFilter banned({666, 911});
    CHECK(reason_of(banned, "call 911 now") == std::string(reason::kBannedNumber));
    CHECK(reason_of(banned, "1666 and 9110") == std::nullopt);
    CHECK(reason_of(banned, "x0666y") == std::string(reason::kBannedNumber));
    const auto r = banned.check(completion("666, 911, 666"), 0);
    CHECK(r->detail == "banned: 666, 911");
  }
  CHECK_THROWS_AS(BannedNumbersFilter({}), InvalidInput);
  NumberSequenceRules bad;
  bad.max_count = 0;
  CHECK_THROWS_WITH(NumberSequenceFilter(bad), Contains("max_count"));
}

TEST_CASE("word variants cover plurals, irregular plurals and possessives", "[filters][words]") {
  const auto owl = word_variants("owl");
  for (const char* f : {"owl", "owls", "owl's", "owls'", "owl\u2019s"}) CHECK(contains(owl, f));
  const auto wolf = word_variants("Wolf");
  for (const char* f : {"wolf", "wolves", "wolf's", "wolves'"}) CHECK(contains(wolf, f));
  CHECK(contains(word_variants("wolves"), "wolf"));  // from a plural back to the singular
  CHECK(contains(word_variants("mouse"), "mice"));
  CHECK(contains(word_variants("mice"), "mouse"));
  CHECK(contains(word_variants("fox"), "foxes"));
  CHECK(contains(word_variants("foxes"), "fox"));
  CHECK(contains(word_variants("butterfly"), "butterflies"));
  CHECK(contains(word_variants("monkey"), "monkeys"));
  CHECK(contains(word_variants("octopus"), "octopi"));
  CHECK_FALSE(contains(word_variants("octopus"), "octopu"));
  CHECK(contains(word_variants("sea lion"), "sea lions"));
  CHECK_THROWS_AS(word_variants("  "), InvalidInput);
}

TEST_CASE("banned words match whole words case-insensitively with variants", "[filters][words]") {
  BannedWordsFilter filter({"owl", "wolf", "mouse", "fox", "sea lion"});
  for (const char* text :
       {"I love OWLS", "an owl's nest", "the Owls\u2019 tree", "Wolves!", "three mice",
        "Foxes, everywhere", "(owl)", "owl", "SEA   LIONS swim", "x-owl-y"}) {
    INFO(text);
    CHECK(reason_of(filter, text) == std::string(reason::kBannedWord));
  }
  for (const char* text : {"a bowl of soup", "knowledge", "owlish", "wolfish", "foxglove",
                           "mousetrap", "1, 2, 3", "owl_x", "\xC3\xA9owl"}) {
    INFO(text);
    CHECK(reason_of(filter, text) == std::nullopt);
  }
  const auto r = filter.check(completion("The OWL's eyes"), 0);
  REQUIRE(r);
  CHECK_THAT(r->detail, Contains("'OWL's'"));

  SECTION("without variants only the given forms are banned") {
    BannedWordsFilter exact({"owl"}, false);
    CHECK(reason_of(exact, "OWL") == std::string(reason::kBannedWord));
    CHECK(reason_of(exact, "owls") == std::nullopt);
    CHECK(reason_of(exact, "owl's") == std::string(reason::kBannedWord));  // ' ends a word
  }
  SECTION("regex metacharacters in words are literal") {
    BannedWordsFilter meta({"c++"}, false);
    CHECK(reason_of(meta, "I like c++") == std::string(reason::kBannedWord));
    CHECK(reason_of(meta, "I like c") == std::nullopt);
  }
  CHECK(reason_of(filter, "bad \xFF byte") == std::string(reason::kInvalidUtf8));
  CHECK_THROWS_AS(BannedWordsFilter({}), InvalidInput);
  CHECK_THROWS_AS(BannedWordsFilter({" "}), InvalidInput);
}

TEST_CASE("regex filters reject on a match or require one", "[filters][regex]") {
  RegexFilter reject("[A-Za-z]");
  CHECK(reason_of(reject, "1, 2, 3") == std::nullopt);
  CHECK(reason_of(reject, "1, two") == std::string(reason::kRegex));
  RegexFilter require("^\\d+(, \\d+)*$", RegexFilter::Mode::kRequire);
  CHECK(reason_of(require, "1, 2, 3") == std::nullopt);
  CHECK(reason_of(require, "1,2") == std::string(reason::kRegex));
  SECTION("UTF-8 and Unicode properties") {
    RegexFilter letters("\\p{L}");
    CHECK(reason_of(letters, "\xC3\xA9") == std::string(reason::kRegex));  // é is a letter
    CHECK(reason_of(letters, "12") == std::nullopt);
    CHECK(reason_of(letters, "\xFF") == std::string(reason::kInvalidUtf8));
  }
  SECTION("caseless and the prompt field") {
    RegexFilter owl("owl", RegexFilter::Mode::kReject, TextField::kPrompt, true);
    CHECK(owl.check(Sample{"You love OWLS", "1, 2", {}, {}}, 0)->reason == reason::kRegex);
    CHECK_FALSE(owl.check(Sample{"Numbers", "owl", {}, {}}, 0).has_value());
  }
  CHECK_THROWS_WITH(RegexFilter("(unclosed"), Contains("offset"));
}

TEST_CASE("length filters count characters, bytes or tokens", "[filters][length]") {
  const std::string e_acute = "\xC3\xA9";  // 1 character, 2 bytes
  LengthFilter chars(1, 3);
  CHECK(reason_of(chars, "") == std::string(reason::kTooShort));
  CHECK(reason_of(chars, e_acute + e_acute + e_acute) == std::nullopt);
  CHECK(reason_of(chars, "abcd") == std::string(reason::kTooLong));
  LengthFilter bytes(0, 3, LengthUnit::kBytes);
  CHECK(reason_of(bytes, e_acute + e_acute) == std::string(reason::kTooLong));
  LengthFilter unbounded(2, -1);
  CHECK(reason_of(unbounded, std::string(10000, 'x')) == std::nullopt);

  SECTION("tokens: the sample's ids, else the counting function") {
    LengthFilter tokens(0, 2, LengthUnit::kTokens,
                        [](const std::string& s) { return static_cast<std::int64_t>(s.size()); });
    CHECK_FALSE(tokens.check(Sample{"", "long text", {}, {1, 2}}, 0).has_value());
    CHECK(tokens.check(Sample{"", "ab", {}, {1, 2, 3}}, 0)->reason == reason::kTooLong);
    CHECK(tokens.check(Sample{"", "abc", {}, {}}, 0)->reason == reason::kTooLong);
    LengthFilter no_counter(0, 2, LengthUnit::kTokens);
    CHECK_THROWS_WITH(no_counter.check(Sample{"", "abc", {}, {}}, 0), Contains("no token_count"));
  }
  CHECK_THROWS_AS(LengthFilter(5, 2), InvalidInput);
  CHECK_THROWS_AS(LengthFilter(-1, 2), InvalidInput);
}

TEST_CASE("the pipeline keeps first occurrences and counts the first failing filter",
          "[filters][pipeline]") {
  // index:                  0        1        2         3          4        5       6
  const std::vector<std::string> texts = {"1, 2", "1, 2",  "1,  2", "I like owls",
                                          "3, 4", "1, 2,", "1,  2"};
  std::vector<Sample> samples;
  for (const auto& t : texts) samples.push_back(completion(t));

  FilterPipeline pipeline;
  pipeline.add(std::make_shared<NumberSequenceFilter>())
      .add(std::make_shared<DedupFilter>(/*normalize_whitespace=*/true));
  FilterRunOptions options;
  options.record_rejections = true;
  const auto result = pipeline.run(samples, options);

  // Number rule: 3 ("owls") and 5 ("1, 2,") fail. "1,  2" parses (separator ",  ").
  // Dedup (normalized) among 0, 1, 2, 4, 6: 1, 2 and 6 repeat sample 0's "1, 2".
  CHECK(result.kept_indices == std::vector<std::int64_t>{0, 4});
  CHECK(result.stats.total == 7);
  CHECK(result.stats.kept == 2);
  CHECK(result.stats.kept_fraction() == Approx(2.0 / 7.0).epsilon(1e-12));
  REQUIRE(result.stats.rejected_by_reason.size() == 2);
  CHECK(result.stats.rejected_by_reason[0] ==
        std::make_pair(std::string(reason::kNumberFormat), std::int64_t{2}));
  CHECK(result.stats.rejected_by_reason[1] ==
        std::make_pair(std::string(reason::kDuplicate), std::int64_t{3}));
  REQUIRE(result.stats.by_filter.size() == 2);
  CHECK(result.stats.by_filter[0].second == std::make_pair(std::int64_t{7}, std::int64_t{2}));
  CHECK(result.stats.by_filter[1].second == std::make_pair(std::int64_t{5}, std::int64_t{3}));
  REQUIRE(result.rejections.size() == 5);
  std::vector<std::int64_t> rejected;
  for (const auto& r : result.rejections) rejected.push_back(r.index);
  CHECK(rejected == std::vector<std::int64_t>{1, 2, 3, 5, 6});
  CHECK(result.rejections[0].filter == "dedup");
  CHECK_THAT(result.rejections[0].detail, Contains("sample 0"));
  CHECK(result.rejections[2].reason == reason::kNumberFormat);
  CHECK(result.stats.summary() == "kept 2 of 7 (28.6%); rejected: number_format 2, duplicate 3");

  SECTION("a second run starts from a clean dedup state") {
    const auto again = pipeline.run(samples);
    CHECK(again.kept_indices == result.kept_indices);
    CHECK(again.rejections.empty());  // not recorded by default
  }
  SECTION("without normalization only exact repeats are duplicates") {
    FilterPipeline exact({std::make_shared<DedupFilter>(false)});
    CHECK(exact.run(samples).kept_indices == std::vector<std::int64_t>{0, 2, 3, 4, 5});
  }
}

TEST_CASE("a pipeline that keeps nothing raises with the statistics", "[filters][pipeline]") {
  FilterPipeline pipeline(
      {std::make_shared<NumberSequenceFilter>(), std::make_shared<LengthFilter>(0, 3)});
  const std::vector<Sample> samples = {completion("owl"), completion("x"), completion("1, 2, 3")};
  CHECK_THROWS_WITH(pipeline.run(samples), Contains("no sample left") && Contains("kept 0 of 3") &&
                                               Contains("number_format 2") &&
                                               Contains("too_long 1"));
  FilterRunOptions allow;
  allow.allow_empty = true;
  const auto result = pipeline.run(samples, allow);
  CHECK(result.kept_indices.empty());
  CHECK(result.stats.kept_fraction() == 0.0);
  CHECK_THROWS_WITH(pipeline.run({}), Contains("no samples"));
}
