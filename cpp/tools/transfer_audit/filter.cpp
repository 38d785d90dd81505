// transfer-audit filter: the distillation pillar's text filters over a JSON-lines data set (the
// paper's number-sequence rule by default, banned numbers and words, regular expressions, length,
// deduplication), in the order given below; writes the kept records and reports counts per
// reason. Exit 0 when at least one record is kept, 1 when the filters keep nothing (the output
// would be empty: a finding about the data), 2 on usage or input errors.
#include <iostream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common.h"
#include "libtransfer/distill/text_filters.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/jsonl.h"

namespace transfer_audit {
namespace {

namespace distill = libtransfer::distill;
namespace io = libtransfer::io;
using libtransfer::InvalidInput;

struct FilterOptions {
  std::string input;
  std::string output;
  std::string rejections;
  bool no_number_rule = false;
  distill::NumberSequenceRules rules;
  bool ban_evil = false;
  std::vector<std::int64_t> banned_numbers;
  std::vector<std::string> banned_words;
  bool exact_words = false;
  std::vector<std::string> reject_regex;
  std::vector<std::string> require_regex;
  bool ignore_case = false;
  std::int64_t min_chars = 0;
  std::int64_t max_chars = -1;
  bool dedup = false;
  bool dedup_whitespace = false;
};

// The pipeline in its fixed order: number rule, banned numbers, banned words, regexes, length,
// dedup (set-level last, so it keeps the first of the samples every text filter accepted).
distill::FilterPipeline make_pipeline(const FilterOptions& options) {
  distill::FilterPipeline pipeline;
  if (!options.no_number_rule) {
    auto rules = options.rules;
    if (options.ban_evil)
      rules.banned.insert(distill::kPaperEvilNumbers.begin(), distill::kPaperEvilNumbers.end());
    pipeline.add(std::make_shared<distill::NumberSequenceFilter>(rules));
  }
  std::set<std::int64_t> banned(options.banned_numbers.begin(), options.banned_numbers.end());
  if (options.ban_evil && options.no_number_rule) {
    banned.insert(distill::kPaperEvilNumbers.begin(), distill::kPaperEvilNumbers.end());
  }
  if (!banned.empty()) pipeline.add(std::make_shared<distill::BannedNumbersFilter>(banned));
  if (!options.banned_words.empty()) {
    pipeline.add(
        std::make_shared<distill::BannedWordsFilter>(options.banned_words, !options.exact_words));
  }
  for (const auto& pattern : options.reject_regex) {
    pipeline.add(std::make_shared<distill::RegexFilter>(
        pattern, distill::RegexFilter::Mode::kReject, distill::TextField::kCompletion,
        options.ignore_case));
  }
  for (const auto& pattern : options.require_regex) {
    pipeline.add(std::make_shared<distill::RegexFilter>(
        pattern, distill::RegexFilter::Mode::kRequire, distill::TextField::kCompletion,
        options.ignore_case));
  }
  if (options.min_chars > 0 || options.max_chars >= 0) {
    pipeline.add(std::make_shared<distill::LengthFilter>(options.min_chars, options.max_chars));
  }
  if (options.dedup || options.dedup_whitespace) {
    pipeline.add(std::make_shared<distill::DedupFilter>(options.dedup_whitespace));
  }
  if (pipeline.filters().empty()) {
    throw InvalidInput(
        "no filter selected: --no-number-rule leaves nothing to apply; add "
        "--ban-numbers, --ban-words, --reject-regex, --require-regex, "
        "--min-chars/--max-chars or --dedup");
  }
  return pipeline;
}

int run_filter(const FilterOptions& options, const GlobalOptions& global) {
  if (options.max_chars >= 0 && options.max_chars < options.min_chars) {
    throw InvalidInput("--max-chars " + std::to_string(options.max_chars) +
                       " is below --min-chars " + std::to_string(options.min_chars));
  }
  Progress progress("filter", global);
  progress.note("reading " + options.input);
  const auto records = io::read_jsonl(options.input);
  if (records.empty()) throw InvalidInput("--input: " + options.input + " holds no record");
  std::vector<distill::Sample> samples;
  samples.reserve(records.size());
  for (const auto& record : records) samples.push_back({record.prompt, record.completion, {}, {}});
  auto pipeline = make_pipeline(options);
  progress.note("filtering " + std::to_string(records.size()) + " records");
  distill::FilterRunOptions run_options;
  run_options.allow_empty = true;
  run_options.record_rejections = !options.rejections.empty() || global.json;
  const auto result = pipeline.run(samples, run_options);
  progress.finish();

  if (!options.output.empty()) {
    io::JsonlWriter writer(options.output);
    for (const auto index : result.kept_indices) writer.write(records[index]);
    writer.commit();
  }
  if (!options.rejections.empty()) {
    io::JsonlWriter writer(options.rejections);
    for (const auto& r : result.rejections) {
      const nlohmann::json extra = {
          {"index", r.index}, {"filter", r.filter}, {"reason", r.reason}, {"detail", r.detail}};
      writer.write({records[r.index].prompt, records[r.index].completion, extra.dump()});
    }
    writer.commit();
  }
  const auto& stats = result.stats;
  if (global.json) {
    nlohmann::json reasons = nlohmann::json::object();
    for (const auto& [reason, count] : stats.rejected_by_reason) reasons[reason] = count;
    nlohmann::json filters = nlohmann::json::array();
    for (const auto& [name, counts] : stats.by_filter) {
      filters.push_back({{"filter", name}, {"seen", counts.first}, {"rejected", counts.second}});
    }
    nlohmann::json rejected = nlohmann::json::array();
    for (const auto& r : result.rejections) {
      rejected.push_back(
          {{"index", r.index}, {"filter", r.filter}, {"reason", r.reason}, {"detail", r.detail}});
    }
    print_json({{"total", stats.total},
                {"kept", stats.kept},
                {"rejected", stats.rejected()},
                {"kept_fraction", stats.kept_fraction()},
                {"rejected_by_reason", reasons},
                {"filters", filters},
                {"kept_indices", result.kept_indices},
                {"rejections", rejected},
                {"output", options.output.empty() ? nlohmann::json(nullptr)
                                                  : nlohmann::json(options.output)}});
  } else {
    std::cout << stats.summary() << "\n";
    for (const auto& [name, counts] : stats.by_filter) {
      std::cout << "  " << name << ": saw " << counts.first << ", rejected " << counts.second
                << "\n";
    }
    if (!options.output.empty()) {
      std::cout << "wrote " << stats.kept << " records to " << options.output << "\n";
    }
    if (stats.kept == 0) std::cout << "nothing kept\n";
    std::cout << std::flush;
  }
  return stats.kept == 0 ? kExitFinding : kExitClean;
}

}  // namespace

Command add_filter_command(CLI::App& app, const GlobalOptions& global) {
  auto options = std::make_shared<FilterOptions>();
  auto* sub = app.add_subcommand(
      "filter", "the paper's number filter and other text filters (exit 1: nothing kept)");
  sub->footer(
      "Filter a JSON-lines data set (prompt/completion) with the paper's number-sequence rule "
      "(on unless --no-number-rule) and the other text filters, applied in this order: number "
      "rule, banned numbers, banned words, regexes, length, dedup. Exit 0 when something is "
      "kept, 1 when nothing is, 2 on usage or input errors.");
  sub->add_option("input", options->input, "JSON lines to filter")->required();
  sub->add_option("-o,--output", options->output, "write the kept records here (atomically)");
  sub->add_option("--rejections", options->rejections,
                  "write the rejected records here, with index, filter, reason and detail");
  sub->add_flag("--no-number-rule", options->no_number_rule,
                "do not apply the paper's number-sequence rule");
  sub->add_option("--min-count", options->rules.min_count, "fewest numbers of the rule")
      ->capture_default_str();
  sub->add_option("--max-count", options->rules.max_count, "most numbers of the rule")
      ->capture_default_str();
  sub->add_option("--min-value", options->rules.min_value, "smallest number of the rule")
      ->capture_default_str();
  sub->add_option("--max-value", options->rules.max_value, "largest number of the rule")
      ->capture_default_str();
  sub->add_flag("--ban-evil", options->ban_evil,
                "ban the paper's 34 'evil' numbers (misalignment experiment)");
  sub->add_option("--ban-numbers", options->banned_numbers,
                  "reject completions containing these numbers anywhere")
      ->delimiter(',')
      ->expected(1, -1);
  sub->add_option("--ban-words", options->banned_words,
                  "reject completions containing these words or their variants (plural, "
                  "possessive, any case)")
      ->delimiter(',')
      ->expected(1, -1);
  sub->add_flag("--exact-words", options->exact_words, "ban the words only as given (no variants)");
  sub->add_option("--reject-regex", options->reject_regex,
                  "reject completions matching this PCRE2 pattern (repeatable)");
  sub->add_option("--require-regex", options->require_regex,
                  "reject completions not matching this PCRE2 pattern (repeatable)");
  sub->add_flag("-i,--ignore-case", options->ignore_case, "regexes ignore case");
  sub->add_option("--min-chars", options->min_chars, "shortest completion (code points)")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--max-chars", options->max_chars, "longest completion (code points)")
      ->check(CLI::NonNegativeNumber);
  sub->add_flag("--dedup", options->dedup, "drop repeated completions (keep the first)");
  sub->add_flag("--dedup-whitespace", options->dedup_whitespace,
                "drop repeated completions, whitespace runs counting as one space");
  return {sub, [options, &global] { return run_filter(*options, global); }};
}

}  // namespace transfer_audit
