// Shared pieces of transfer-audit (see common.h).
#include "common.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/models/torchscript.h"

namespace transfer_audit {

namespace fs = std::filesystem;
using libtransfer::FileError;
using libtransfer::InvalidInput;

namespace {

// The metadata key save_model writes; a safetensors file with it holds a runnable built-in model.
constexpr const char* kArchitectureKey = "libtransfer.architecture";
// The shortest interval between two progress lines when stderr is not a terminal (seconds).
constexpr double kPlainProgressInterval = 1.0;

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

}  // namespace

Progress::Progress(std::string label, const GlobalOptions& global)
    : label_(std::move(label)), terminal_(::isatty(STDERR_FILENO) == 1) {
  enabled_ = !global.no_progress && (global.progress || terminal_);
}

Progress::~Progress() { finish(); }

void Progress::write(const std::string& text, bool force) {
  if (!enabled_) return;
  const double t = now_seconds();
  if (terminal_) {
    std::cerr << "\r\033[K" << label_ << ": " << text << std::flush;
    open_ = true;
  } else if (force || last_ < 0.0 || t - last_ >= kPlainProgressInterval) {
    std::cerr << label_ << ": " << text << "\n" << std::flush;
    last_ = t;
  }
}

void Progress::update(std::int64_t done, std::int64_t total, const std::string& unit) {
  write(std::to_string(done) + "/" + std::to_string(total) + " " + unit, done == total);
}

void Progress::note(const std::string& text) { write(text, true); }

void Progress::finish() {
  if (enabled_ && terminal_ && open_) std::cerr << "\n" << std::flush;
  open_ = false;
}

libtransfer::io::Tokenizer load_tokenizer(const std::string& path) {
  using libtransfer::io::Tokenizer;
  const fs::path where(path);
  if (fs::is_regular_file(where)) return Tokenizer::from_tokenizer_json(path);
  if (!fs::is_directory(where)) {
    throw FileError("--tokenizer: no such file or directory: " + path);
  }
  if (fs::is_regular_file(where / "tokenizer.json")) {
    return Tokenizer::from_tokenizer_json((where / "tokenizer.json").string());
  }
  for (const auto& [vocab, merges] :
       {std::pair<const char*, const char*>{"vocab.json", "merges.txt"},
        {"encoder.json", "vocab.bpe"}}) {
    if (fs::is_regular_file(where / vocab) && fs::is_regular_file(where / merges)) {
      return Tokenizer::from_files((where / vocab).string(), (where / merges).string());
    }
  }
  throw FileError("--tokenizer: " + path +
                  ": no tokenizer found; expected tokenizer.json, vocab.json + merges.txt, or "
                  "encoder.json + vocab.bpe");
}

bool is_torchscript_path(const std::string& path) {
  const std::string suffix = fs::path(path).extension().string();
  return suffix == ".pt" || suffix == ".pth" || suffix == ".ts" || suffix == ".jit";
}

LoadedModel load_model_file(const std::string& path, const std::string& argument) {
  namespace models = libtransfer::models;
  namespace detect = libtransfer::detect;
  const fs::path where(path);
  if (!fs::exists(where)) {
    throw FileError(argument + ": no such file or directory: " + path);
  }
  LoadedModel out;
  if (fs::is_directory(where)) {
    std::vector<std::string> shards;
    for (const auto& entry : fs::directory_iterator(where)) {
      if (entry.is_regular_file() && entry.path().extension() == ".safetensors") {
        shards.push_back(entry.path().string());
      }
    }
    if (shards.empty()) {
      throw InvalidInput(argument + ": the folder " + path + " holds no .safetensors file");
    }
    std::sort(shards.begin(), shards.end());
    out.weights = detect::state_from_safetensors(shards);
    out.why_no_model = argument + " is a folder of weights";
    return out;
  }
  if (is_torchscript_path(path)) {
    out.model = models::TorchScriptModel::load(path);
    out.weights = detect::state_from_tensors(models::state_dict(*out.model), {},
                                             "model " + argument + " (" + path + ")");
    return out;
  }
  out.weights = detect::state_from_safetensors({path});
  if (out.weights->metadata().count(kArchitectureKey) > 0) {
    out.model = models::load_model(path);
  } else {
    out.why_no_model = argument + " is a weights file without libtransfer model metadata";
  }
  return out;
}

libtransfer::models::ModelPtr load_token_model(const std::string& path,
                                               const std::string& argument) {
  namespace models = libtransfer::models;
  if (!fs::is_regular_file(path)) {
    throw FileError(argument + ": no such file: " + path);
  }
  models::ModelPtr model;
  if (is_torchscript_path(path)) {
    models::TorchScriptOptions options;
    options.input_kind = models::InputKind::kTokens;
    model = models::TorchScriptModel::load(path, options);
  } else {
    model = models::load_model(path);
  }
  if (model->input_kind() != models::InputKind::kTokens) {
    throw InvalidInput(argument + ": " + path +
                       " is not a language model (it takes features, not token ids)");
  }
  return model;
}

nlohmann::json json_number(double value) {
  if (!std::isfinite(value)) return nullptr;
  return value;
}

void print_json(const nlohmann::json& json) { std::cout << json.dump(2) << std::endl; }

}  // namespace transfer_audit
