// transfer-audit fingerprint: the logit fingerprint of a TorchScript teacher against a reference
// on JSON-lines records (libtransfer/fingerprint/runner.h), its tests, and optionally the files
// Python's FingerprintResult.load reads. Exit 1 when the global test is significant at --alpha or
// entangled tokens are found at FDR --q.
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "fingerprint_report.h"
#include "libtransfer/errors.h"
#include "libtransfer/fingerprint/runner.h"
#include "libtransfer/io/jsonl.h"

namespace transfer_audit {
namespace {

namespace fingerprint = libtransfer::fingerprint;
using libtransfer::InvalidInput;

// Significance level of the global test's finding (the detector's default level).
constexpr double kDefaultAlpha = 0.01;

struct FingerprintOptions {
  std::string teacher;
  std::string reference;
  std::vector<std::string> controls;
  std::string data;
  std::string tokenizer;
  std::string teacher_prefix;
  std::string reference_prefix;
  std::vector<std::string> control_prefixes;
  std::string subset = "numeric";
  double temperature = 1.0;
  std::int64_t batch_size = 8;
  std::optional<std::int64_t> max_length;
  std::uint64_t seed = 0;
  bool skip_nonfinite = false;
  std::string device = "cpu";
  std::string output;
  std::int64_t top = 20;
  std::int64_t permutations = fingerprint::kSummaryPermutations;
  double q = fingerprint::kSummaryFdr;
  double alpha = kDefaultAlpha;
};

fingerprint::ScoredModel scored(const std::string& path, const std::string& prefix,
                                const std::string& argument, const torch::Device& device) {
  auto model = load_token_model(path, argument);
  if (!device.is_cpu()) model->to(device, torch::kFloat);
  return {model, prefix, path};
}

int run_fingerprint_command(const FingerprintOptions& options, const GlobalOptions& global) {
  if (!options.control_prefixes.empty() &&
      options.control_prefixes.size() != options.controls.size()) {
    throw InvalidInput("--control-prefix: expected one per --control (" +
                       std::to_string(options.controls.size()) + "), got " +
                       std::to_string(options.control_prefixes.size()));
  }
  if (!(options.alpha > 0.0 && options.alpha < 1.0)) {
    throw InvalidInput("--alpha: expected a value in (0, 1), got " + std::to_string(options.alpha));
  }
  const torch::Device device(options.device);
  const auto tokenizer = load_tokenizer(options.tokenizer);
  const auto records = libtransfer::io::read_jsonl(options.data);
  const auto teacher = scored(options.teacher, options.teacher_prefix, "--teacher", device);
  const auto reference = scored(options.reference, options.reference_prefix, "--reference", device);
  std::vector<fingerprint::ScoredModel> controls;
  for (std::size_t i = 0; i < options.controls.size(); ++i) {
    const std::string prefix =
        options.control_prefixes.empty() ? options.teacher_prefix : options.control_prefixes[i];
    controls.push_back(
        scored(options.controls[i], prefix, "--control[" + std::to_string(i) + "]", device));
  }

  Progress progress("fingerprint", global);
  fingerprint::RunOptions run_options;
  run_options.subset = options.subset;
  run_options.temperature = options.temperature;
  run_options.batch_size = options.batch_size;
  run_options.max_length = options.max_length;
  run_options.seed = options.seed;
  run_options.skip_nonfinite = options.skip_nonfinite;
  run_options.progress = [&progress](std::int64_t done, std::int64_t total) {
    progress.update(done, total, "records");
  };
  const auto run =
      fingerprint::run_fingerprint(teacher, reference, controls, records, tokenizer, run_options);
  std::vector<std::string> written;
  if (!options.output.empty()) written = fingerprint::save_fingerprint_run(run, options.output);
  progress.note("tests");
  progress.finish();
  const auto summary = fingerprint::summarize_fingerprint(run, &tokenizer, options.top,
                                                          options.permutations, options.q);
  const bool finding = is_finding(summary, options.alpha);
  if (global.json) {
    auto json = fingerprint_json(run, summary);
    json["alpha"] = options.alpha;
    json["q"] = options.q;
    json["finding"] = finding;
    json["files"] = written;
    print_json(json);
  } else {
    std::cout << fingerprint_text(run, summary, options.q) << "\n";
    for (const auto& path : written) std::cout << "wrote " << path << "\n";
    std::cout << (finding ? "finding: the teacher's fingerprint departs from "
                          : "no finding: nothing departs from ")
              << (run.controls.empty() ? "zero" : "the controls'") << " at alpha " << options.alpha
              << " / FDR " << options.q << std::endl;
  }
  return finding ? kExitFinding : kExitClean;
}

}  // namespace

Command add_fingerprint_command(CLI::App& app, const GlobalOptions& global) {
  auto options = std::make_shared<FingerprintOptions>();
  auto* sub = app.add_subcommand(
      "fingerprint", "logit fingerprint of a teacher on JSON-lines data (exit 1: significant)");
  sub->footer(
      "Take the logit fingerprint of a teacher against a reference on JSON-lines records "
      "(prompt/completion; the completion tokens are scored, teacher-forced). Models are "
      "TorchScript archives (token ids [B, T] -> logits [B, T, V]) or files written by "
      "model.save. Exit 1 when the global sign-flip test is significant at --alpha or "
      "entangled tokens are found at FDR --q, 0 otherwise.");
  sub->add_option("--teacher", options->teacher, "the teacher model")->required();
  sub->add_option("--reference", options->reference, "the reference model")->required();
  sub->add_option("--control", options->controls,
                  "control teachers (same template, other traits), repeatable");
  sub->add_option("--data", options->data, "JSON lines with prompt and completion")->required();
  sub->add_option("--tokenizer", options->tokenizer,
                  "folder with tokenizer.json, vocab.json + merges.txt or encoder.json + "
                  "vocab.bpe (or a tokenizer.json)")
      ->required();
  sub->add_option("--teacher-prefix", options->teacher_prefix,
                  "text put before every prompt for the teacher (and controls)");
  sub->add_option("--reference-prefix", options->reference_prefix,
                  "text put before every prompt for the reference");
  sub->add_option("--control-prefix", options->control_prefixes,
                  "per-control prefix (one per --control; default: the teacher's)");
  sub->add_option("--subset", options->subset, "token subset of the centered fingerprint")
      ->check(CLI::IsMember({"numeric", "all"}))
      ->capture_default_str();
  sub->add_option("--temperature", options->temperature, "softmax temperature")
      ->capture_default_str();
  sub->add_option("--batch-size", options->batch_size, "records per forward pass")
      ->capture_default_str();
  sub->add_option("--max-length", options->max_length,
                  "cap on input tokens; completions are cut to fit");
  sub->add_option("--seed", options->seed, "seed of the permutation tests")->capture_default_str();
  sub->add_flag("--skip-nonfinite", options->skip_nonfinite,
                "skip positions with non-finite logits instead of failing");
  sub->add_option("--device", options->device, "where the models run (cpu, cuda, cuda:1)")
      ->capture_default_str();
  sub->add_option("-o,--output", options->output,
                  "write the fingerprint (FingerprintResult.save format; controls beside it)");
  sub->add_option("-k,--top", options->top, "tokens up and down to show")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--permutations", options->permutations, "sign-flip permutations")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--q", options->q, "Benjamini-Hochberg FDR of the entangled tokens")
      ->capture_default_str();
  sub->add_option("--alpha", options->alpha, "significance level of the global test")
      ->capture_default_str();
  return {sub, [options, &global] { return run_fingerprint_command(*options, global); }};
}

}  // namespace transfer_audit
