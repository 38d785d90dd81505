// Shared pieces of transfer-audit's subcommands: exit codes, the subcommand table, the progress
// line, loading tokenizers and models from paths, and JSON helpers.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "libtransfer/detect/state_source.h"
#include "libtransfer/io/tokenizer.h"
#include "libtransfer/models/model.h"

namespace transfer_audit {

// Exit codes (documented in --help and docs/cpp.md).
inline constexpr int kExitClean = 0;    // ran, nothing found
inline constexpr int kExitFinding = 1;  // ran, found something (see each subcommand)
inline constexpr int kExitError = 2;    // usage or input error (one line on stderr)

// Options every subcommand shares.
struct GlobalOptions {
  bool json = false;         // JSON on stdout instead of readable text
  bool progress = false;     // force the progress line on (default: when stderr is a terminal)
  bool no_progress = false;  // never show it
};

// A subcommand: its CLI11 parser and what runs when it was chosen (returns the exit code).
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

Command add_detect_command(CLI::App& app, const GlobalOptions& global);
Command add_fingerprint_command(CLI::App& app, const GlobalOptions& global);
Command add_filter_command(CLI::App& app, const GlobalOptions& global);
Command add_inspect_command(CLI::App& app, const GlobalOptions& global);

// One line on stderr, rewritten in place ("\r") on a terminal and at most once a second
// otherwise; finish() ends it. Silent when disabled.
class Progress {
 public:
  Progress(std::string label, const GlobalOptions& global);
  ~Progress();
  void update(std::int64_t done, std::int64_t total, const std::string& unit);
  void note(const std::string& text);  // a free-form step ("weights test")
  void finish();

 private:
  void write(const std::string& text, bool force);

  std::string label_;
  bool enabled_ = false;
  bool terminal_ = false;
  bool open_ = false;
  double last_ = -1.0;
};

// A tokenizer from a folder (tokenizer.json, else vocab.json + merges.txt, else encoder.json +
// vocab.bpe, as Python's Tokenizer.from_pretrained_dir) or a tokenizer.json file. FileError when
// none is found.
libtransfer::io::Tokenizer load_tokenizer(const std::string& path);

// Whether a path names a TorchScript archive by its suffix (.pt, .pth, .ts, .jit).
bool is_torchscript_path(const std::string& path);

// A model file as the detector sees it: its weights (always) and a runnable model when the file
// has one (TorchScript, or safetensors written by save_model); why_no_model says otherwise.
struct LoadedModel {
  libtransfer::detect::StateSourcePtr weights;
  libtransfer::models::ModelPtr model;
  std::string why_no_model;
};

// Loads a safetensors file, a folder of safetensors shards or a TorchScript archive.
// `argument` names it in messages ("a", "controls[0]"). FileError for a missing path.
LoadedModel load_model_file(const std::string& path, const std::string& argument);

// A TorchScript language model (token ids -> [B, T, V] logits). InvalidInput if it takes features.
libtransfer::models::ModelPtr load_token_model(const std::string& path,
                                               const std::string& argument);

// A double for JSON: non-finite values become null.
nlohmann::json json_number(double value);

// Prints JSON (indent 2) and a newline to stdout.
void print_json(const nlohmann::json& json);

}  // namespace transfer_audit
