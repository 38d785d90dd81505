// transfer-audit inspect FILE: what a safetensors file holds (tensors, dtypes, shapes, metadata)
// or, for a fingerprint file (written by `transfer-audit fingerprint -o` or Python's
// FingerprintResult.save), its summary and tests. Always exit 0 unless the file cannot be read.
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "fingerprint_report.h"
#include "libtransfer/fingerprint/accumulator.h"
#include "libtransfer/fingerprint/runner.h"
#include "libtransfer/io/safetensors.h"

namespace transfer_audit {
namespace {

namespace fingerprint = libtransfer::fingerprint;
namespace io = libtransfer::io;

struct InspectOptions {
  std::string path;
  std::string tokenizer;
  std::int64_t top = 20;
  std::int64_t permutations = fingerprint::kSummaryPermutations;
  double q = fingerprint::kSummaryFdr;
  std::int64_t max_tensors = 50;
};

int inspect_fingerprint(const InspectOptions& options, const GlobalOptions& global) {
  std::optional<io::Tokenizer> tokenizer;
  if (!options.tokenizer.empty()) tokenizer = load_tokenizer(options.tokenizer);
  const io::Tokenizer* tok = tokenizer ? &*tokenizer : nullptr;
  const auto run = fingerprint::load_fingerprint_run(options.path, tok);
  const auto summary =
      fingerprint::summarize_fingerprint(run, tok, options.top, options.permutations, options.q);
  if (global.json) {
    auto json = fingerprint_json(run, summary);
    json["kind"] = "fingerprint";
    json["path"] = options.path;
    print_json(json);
  } else {
    std::cout << options.path << ": fingerprint file\n"
              << fingerprint_text(run, summary, options.q) << std::endl;
  }
  return kExitClean;
}

int inspect_safetensors(const io::SafetensorsFile& file, const InspectOptions& options,
                        const GlobalOptions& global) {
  std::int64_t elements = 0;
  std::uint64_t bytes = 0;
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& info : file.tensors()) {
    elements += info.numel();
    bytes += info.nbytes();
    tensors.push_back({{"name", info.name},
                       {"dtype", io::dtype_name(info.dtype)},
                       {"shape", info.shape},
                       {"numel", info.numel()},
                       {"bytes", info.nbytes()}});
  }
  if (global.json) {
    print_json({{"kind", "safetensors"},
                {"path", options.path},
                {"tensors", tensors},
                {"metadata", file.metadata()},
                {"total_tensors", file.size()},
                {"total_elements", elements},
                {"total_bytes", bytes}});
    return kExitClean;
  }
  std::cout << options.path << ": safetensors, " << file.size() << " tensors, " << elements
            << " elements, " << bytes << " bytes\n";
  std::int64_t shown = 0;
  for (const auto& t : tensors) {
    if (shown++ == options.max_tensors) {
      std::cout << "  ... and " << file.size() - options.max_tensors << " more\n";
      break;
    }
    std::cout << "  " << t["name"].get<std::string>() << "  " << t["dtype"].get<std::string>()
              << " " << t["shape"].dump() << "\n";
  }
  if (!file.metadata().empty()) {
    std::cout << "metadata:\n";
    for (const auto& [key, value] : file.metadata()) {
      const std::string shown_value = value.size() > 120 ? value.substr(0, 117) + "..." : value;
      std::cout << "  " << key << ": " << shown_value << "\n";
    }
  }
  std::cout << std::flush;
  return kExitClean;
}

int run_inspect(const InspectOptions& options, const GlobalOptions& global) {
  const auto file = io::SafetensorsFile::open(options.path);
  const auto format = file.metadata().find("format");
  if (format != file.metadata().end() && format->second == fingerprint::kAccumulatorFormat) {
    return inspect_fingerprint(options, global);
  }
  return inspect_safetensors(file, options, global);
}

}  // namespace

Command add_inspect_command(CLI::App& app, const GlobalOptions& global) {
  auto options = std::make_shared<InspectOptions>();
  auto* sub = app.add_subcommand("inspect", "show a safetensors or fingerprint file");
  sub->footer(
      "Show what a safetensors file holds, or summarize and test a fingerprint file (written by "
      "`transfer-audit fingerprint -o` or Python's FingerprintResult.save; its controls are read "
      "from beside it). Exit 0, or 2 when the file cannot be read.");
  sub->add_option("path", options->path, "a .safetensors file")->required();
  sub->add_option("--tokenizer", options->tokenizer,
                  "fingerprints: the tokenizer folder to show tokens with (and to check the "
                  "file's vocabulary against)");
  sub->add_option("-k,--top", options->top, "fingerprints: tokens up and down to show")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--permutations", options->permutations, "fingerprints: sign-flip permutations")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--q", options->q, "fingerprints: Benjamini-Hochberg FDR")->capture_default_str();
  sub->add_option("--max-tensors", options->max_tensors, "tensors listed in the text output")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  return {sub, [options, &global] { return run_inspect(*options, global); }};
}

}  // namespace transfer_audit
