// The fingerprint driver and its files (see runner.h). The tokenization, the scored positions and
// the file layout follow python/biastransfer/fingerprint.py line for line, so that a run here and
// a run there give the same sums and read each other's files.
#include "libtransfer/fingerprint/runner.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "libtransfer/errors.h"

namespace libtransfer::fingerprint {
namespace {

// Metadata keys shared with FingerprintResult (python/biastransfer/fingerprint.py).
constexpr const char* kMetaTokenizerHash = "tokenizer_hash";
constexpr const char* kMetaRole = "role";
constexpr const char* kMetaControlFiles = "control_files";
constexpr const char* kMetaControlIndex = "control_index";
constexpr const char* kMetaNames = "names";
constexpr const char* kMetaConfig = "config";
constexpr const char* kMetaPrefixes = "prefixes";

// Keys written per file (by the accumulator or per role): never carried from one save to the next.
const std::set<std::string>& per_file_keys() {
  static const std::set<std::string> keys = {"format",      "format_version",  "vocab_size",
                                             "temperature", "positions",       "options",
                                             kMetaRole,     kMetaControlFiles, kMetaControlIndex};
  return keys;
}

std::string where(std::size_t index) { return "records[" + std::to_string(index) + "]"; }

// Sets every model to eval mode and restores the flags on exit (also on error).
class EvalModeGuard {
 public:
  explicit EvalModeGuard(const std::vector<models::Model*>& models) : models_(models) {
    for (auto* model : models_) {
      was_training_.push_back(model->is_training());
      model->set_training(false);
    }
  }
  ~EvalModeGuard() {
    for (std::size_t i = 0; i < models_.size(); ++i) models_[i]->set_training(was_training_[i]);
  }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  std::vector<models::Model*> models_;
  std::vector<bool> was_training_;
};

using Ids = std::vector<std::int32_t>;

// One batch, tokenized: per model the contexts (prefix + prompt); the completions are shared.
struct Batch {
  std::vector<std::vector<Ids>> contexts;  // [model][row]
  std::vector<Ids> completions;            // [row], after max_length truncation
};

Batch tokenize(const std::vector<io::Record>& records, std::size_t first, std::size_t count,
               const io::Tokenizer& tokenizer, const std::vector<const ScoredModel*>& scored,
               const std::vector<std::string>& roles,
               const std::optional<std::int64_t>& max_length) {
  Batch batch;
  std::vector<std::string> texts(count);
  for (std::size_t row = 0; row < count; ++row) texts[row] = records[first + row].completion;
  batch.completions = tokenizer.encode_batch(texts);
  for (const auto* model : scored) {
    for (std::size_t row = 0; row < count; ++row) {
      texts[row] = model->prefix + records[first + row].prompt;
    }
    batch.contexts.push_back(tokenizer.encode_batch(texts));
  }
  for (std::size_t row = 0; row < count; ++row) {
    const std::string at = where(first + row);
    if (batch.completions[row].empty()) {
      throw InvalidInput(at + ": the completion is empty; there is no token to score");
    }
    std::size_t longest = 0;
    for (std::size_t m = 0; m < scored.size(); ++m) {
      if (batch.contexts[m][row].empty()) {
        throw InvalidInput(at + ": the prompt with the " + roles[m] +
                           "'s prefix is empty, so the first completion token has no context; "
                           "give a prompt or a prefix (e.g. a BOS text)");
      }
      longest = std::max(longest, batch.contexts[m][row].size());
    }
    if (max_length.has_value()) {
      // Input = context + completion[:-1]; its length must stay within max_length.
      const std::int64_t room = *max_length + 1 - static_cast<std::int64_t>(longest);
      if (room < 1) {
        throw InvalidInput(at + ": a prompt with its prefix is " + std::to_string(longest) +
                           " tokens, leaving no room for the completion within max_length=" +
                           std::to_string(*max_length));
      }
      auto& completion = batch.completions[row];
      if (static_cast<std::int64_t>(completion.size()) > room) completion.resize(room);
    }
  }
  return batch;
}

// Right-padded input ids and attention mask [B, L] of context + completion[:-1], and L.
std::pair<torch::Tensor, torch::Tensor> inputs_of(const std::vector<Ids>& contexts,
                                                  const std::vector<Ids>& completions) {
  const auto rows = static_cast<std::int64_t>(contexts.size());
  std::int64_t length = 0;
  for (std::int64_t b = 0; b < rows; ++b) {
    length = std::max<std::int64_t>(length, contexts[b].size() + completions[b].size() - 1);
  }
  auto ids = torch::full({rows, length}, kPadId, torch::kInt64);
  auto mask = torch::zeros({rows, length}, torch::kInt64);
  auto id = ids.accessor<std::int64_t, 2>();
  auto on = mask.accessor<std::int64_t, 2>();
  for (std::int64_t b = 0; b < rows; ++b) {
    std::int64_t t = 0;
    for (const auto token : contexts[b]) id[b][t] = token, on[b][t++] = 1;
    for (std::size_t j = 0; j + 1 < completions[b].size(); ++j) {
      id[b][t] = completions[b][j], on[b][t++] = 1;
    }
  }
  return {ids, mask};
}

// Flat indices b * length + t of the positions whose next token is a completion token.
torch::Tensor scored_rows(const std::vector<Ids>& contexts, const std::vector<Ids>& completions,
                          std::int64_t length) {
  std::vector<std::int64_t> index;
  for (std::size_t b = 0; b < contexts.size(); ++b) {
    const auto start =
        static_cast<std::int64_t>(b) * length + static_cast<std::int64_t>(contexts[b].size()) - 1;
    for (std::size_t j = 0; j < completions[b].size(); ++j) {
      index.push_back(start + static_cast<std::int64_t>(j));
    }
  }
  return torch::tensor(index, torch::kInt64);
}

// The model's logits [B, L, V] on the batch, validated.
torch::Tensor logits_of(const ScoredModel& scored, const std::string& role,
                        const std::vector<Ids>& contexts, const std::vector<Ids>& completions) {
  auto [ids, mask] = inputs_of(contexts, completions);
  const auto device = scored.model->device();
  const auto logits = scored.model->forward(ids.to(device), mask.to(device));
  if (!logits.defined() || logits.dim() != 3 || logits.size(0) != ids.size(0) ||
      logits.size(1) != ids.size(1)) {
    std::ostringstream got;
    if (logits.defined())
      got << logits.sizes();
    else
      got << "undefined";
    throw InvalidInput(role + ": expected logits of shape [B, T, V] = [" +
                       std::to_string(ids.size(0)) + ", " + std::to_string(ids.size(1)) +
                       ", V], got " + got.str());
  }
  if (!logits.is_floating_point()) {
    throw WrongType(role + ": expected floating-point logits, got " +
                    std::string(c10::toString(logits.scalar_type())));
  }
  return logits;
}

void check_vocab(const std::string& role, std::int64_t vocab, std::int64_t reference_vocab,
                 std::int64_t tokenizer_size) {
  if (vocab != reference_vocab) {
    throw InvalidInput(role + ": vocabulary size " + std::to_string(vocab) +
                       " differs from the reference's " + std::to_string(reference_vocab) +
                       "; teacher, reference and controls must share a vocabulary");
  }
  if (vocab < tokenizer_size) {
    throw InvalidInput(role + ": the model's vocabulary size " + std::to_string(vocab) +
                       " is smaller than the tokenizer's " + std::to_string(tokenizer_size) +
                       "; is this the model's tokenizer?");
  }
}

// The subset's sorted unique ids (empty: none) and its label, as resolve_subset in Python.
std::pair<std::vector<std::int64_t>, std::string> resolve_subset(const RunOptions& options,
                                                                 const io::Tokenizer& tokenizer,
                                                                 std::int64_t vocab) {
  std::vector<std::int64_t> ids;
  std::string label;
  if (!options.subset_ids.empty()) {
    ids = options.subset_ids;
    label = "ids[" + std::to_string(ids.size()) + "]";
  } else if (options.subset == "all") {
    return {{}, "all"};
  } else if (options.subset == "numeric") {
    for (const auto id : tokenizer.numeric_token_ids(std::nullopt)) ids.push_back(id);
    label = "numeric";
  } else {
    throw InvalidInput("subset: expected 'numeric', 'all' or explicit ids, got '" + options.subset +
                       "'");
  }
  if (ids.empty()) throw InvalidInput("subset: " + label + " selects no token");
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  if (ids.front() < 0 || ids.back() >= vocab) {
    const auto bad = ids.front() < 0 ? ids.front() : ids.back();
    throw InvalidInput("subset: id " + std::to_string(bad) + " is outside the vocabulary 0.." +
                       std::to_string(vocab - 1));
  }
  return {ids, label};
}

nlohmann::json config_json(const RunConfig& config) {
  nlohmann::json json = {{"subset", config.subset},
                         {"temperature", config.temperature},
                         {"batch_size", config.batch_size},
                         {"max_length", nullptr},
                         {"seed", config.seed},
                         {"skip_nonfinite", config.skip_nonfinite},
                         {"records", config.records}};
  if (config.max_length.has_value()) json["max_length"] = *config.max_length;
  return json;
}

// The config of a file's "config" key; unknown keys are ignored, missing ones keep defaults.
RunConfig parse_config(const std::map<std::string, std::string>& metadata,
                       const std::string& path) {
  RunConfig config;
  const auto found = metadata.find(kMetaConfig);
  if (found == metadata.end()) return config;
  try {
    const auto json = nlohmann::json::parse(found->second);
    if (!json.is_object()) return config;
    if (json.contains("subset")) config.subset = json.at("subset").get<std::string>();
    if (json.contains("temperature")) config.temperature = json.at("temperature").get<double>();
    if (json.contains("batch_size")) config.batch_size = json.at("batch_size").get<std::int64_t>();
    if (json.contains("max_length") && !json.at("max_length").is_null()) {
      config.max_length = json.at("max_length").get<std::int64_t>();
    }
    if (json.contains("seed")) config.seed = json.at("seed").get<std::uint64_t>();
    if (json.contains("skip_nonfinite")) {
      config.skip_nonfinite = json.at("skip_nonfinite").get<bool>();
    }
    if (json.contains("records")) config.records = json.at("records").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidInput("'" + path + "': metadata 'config' is not valid: " + e.what());
  }
  return config;
}

std::string display(const io::Tokenizer* tokenizer, std::int64_t id) {
  if (tokenizer != nullptr && id >= 0 && id < tokenizer->vocab_size()) {
    return tokenizer->display_token(static_cast<std::int32_t>(id));
  }
  return "<id " + std::to_string(id) + ">";
}

std::vector<TokenValue> top_values(const Fingerprint& fp, const io::Tokenizer* tokenizer,
                                   std::int64_t k, const std::string& field, bool largest) {
  const auto [ids, values] = fp.top_tokens(k, field, largest);
  std::vector<TokenValue> out;
  for (std::int64_t i = 0; i < ids.numel(); ++i) {
    const auto id = ids[i].item<std::int64_t>();
    out.push_back({id, display(tokenizer, id), values[i].item<double>()});
  }
  return out;
}

}  // namespace

FingerprintRun run_fingerprint(const ScoredModel& teacher, const ScoredModel& reference,
                               const std::vector<ScoredModel>& controls,
                               const std::vector<io::Record>& records,
                               const io::Tokenizer& tokenizer, const RunOptions& options) {
  std::vector<const ScoredModel*> scored = {&teacher, &reference};
  std::vector<std::string> roles = {"teacher", "reference"};
  for (std::size_t i = 0; i < controls.size(); ++i) {
    scored.push_back(&controls[i]);
    roles.push_back("controls[" + std::to_string(i) + "]");
  }
  std::vector<models::Model*> raw;
  for (std::size_t m = 0; m < scored.size(); ++m) {
    if (!scored[m]->model) throw InvalidInput(roles[m] + ": no model given");
    if (scored[m]->model->input_kind() != models::InputKind::kTokens) {
      throw InvalidInput(roles[m] + ": expected a language model taking token ids, got " +
                         scored[m]->model->describe() + ", which takes features");
    }
    raw.push_back(scored[m]->model.get());
  }
  if (!(std::isfinite(options.temperature) && options.temperature > 0.0)) {
    throw InvalidInput("temperature: expected a finite positive number, got " +
                       std::to_string(options.temperature));
  }
  if (options.batch_size < 1) {
    throw InvalidInput("batch_size: expected at least 1, got " +
                       std::to_string(options.batch_size));
  }
  if (options.max_length.has_value() && *options.max_length < 1) {
    throw InvalidInput("max_length: expected at least 1, got " +
                       std::to_string(*options.max_length));
  }
  if (options.sequence_offset < 0) {
    throw InvalidInput("sequence_offset: expected at least 0, got " +
                       std::to_string(options.sequence_offset));
  }
  if (records.empty()) {
    throw InvalidInput("data: no records; a fingerprint needs at least one scored completion");
  }

  torch::NoGradGuard no_grad;
  EvalModeGuard eval(raw);
  const std::int64_t tokenizer_size = tokenizer.vocab_size();
  const auto total = static_cast<std::int64_t>(records.size());
  std::vector<Accumulator> accumulators;  // teacher, then controls: made at the first batch
  std::string subset_label;
  for (std::size_t first = 0; first < records.size();
       first += static_cast<std::size_t>(options.batch_size)) {
    const std::size_t count = std::min<std::size_t>(options.batch_size, records.size() - first);
    const Batch batch =
        tokenize(records, first, count, tokenizer, scored, roles, options.max_length);
    const auto reference_logits =
        logits_of(reference, roles[1], batch.contexts[1], batch.completions);
    const std::int64_t vocab = reference_logits.size(2);
    check_vocab(roles[1], vocab, vocab, tokenizer_size);
    if (accumulators.empty()) {
      AccumulatorOptions acc_options;
      acc_options.temperature = options.temperature;
      acc_options.skip_nonfinite = options.skip_nonfinite;
      acc_options.per_sequence = true;
      std::tie(acc_options.subset, subset_label) = resolve_subset(options, tokenizer, vocab);
      for (std::size_t m = 0; m < 1 + controls.size(); ++m) {
        accumulators.emplace_back(vocab, acc_options);
      }
    }
    // The reference's scored rows [N, V] and their sequence ids, gathered once per batch.
    const auto reference_rows =
        reference_logits.reshape({-1, vocab})
            .index_select(
                0, scored_rows(batch.contexts[1], batch.completions, reference_logits.size(1))
                       .to(reference_logits.device()));
    std::vector<std::int64_t> ids;
    for (std::size_t row = 0; row < count; ++row) {
      const auto id = options.sequence_offset + static_cast<std::int64_t>(first + row);
      ids.insert(ids.end(), batch.completions[row].size(), id);
    }
    const auto sequence_ids = torch::tensor(ids, torch::kInt64).to(reference_logits.device());
    for (std::size_t a = 0; a < accumulators.size(); ++a) {
      const std::size_t m = a == 0 ? 0 : a + 1;  // teacher, then controls (skip the reference)
      auto logits = logits_of(*scored[m], roles[m], batch.contexts[m], batch.completions);
      check_vocab(roles[m], logits.size(2), vocab, tokenizer_size);
      logits = logits.to(reference_logits.device());
      const auto rows =
          logits.reshape({-1, vocab})
              .index_select(0, scored_rows(batch.contexts[m], batch.completions, logits.size(1))
                                   .to(logits.device()));
      accumulators[a].update(rows, reference_rows, {}, sequence_ids);
    }
    if (options.progress) options.progress(static_cast<std::int64_t>(first + count), total);
  }

  RunConfig config;
  config.subset = subset_label;
  config.temperature = options.temperature;
  config.batch_size = options.batch_size;
  config.max_length = options.max_length;
  config.seed = options.seed;
  config.skip_nonfinite = options.skip_nonfinite;
  config.records = total;
  nlohmann::json names = {{"teacher", teacher.name}, {"reference", reference.name}};
  nlohmann::json prefixes = {{"teacher", teacher.prefix}, {"reference", reference.prefix}};
  names["controls"] = nlohmann::json::array();
  prefixes["controls"] = nlohmann::json::array();
  for (const auto& control : controls) {
    names["controls"].push_back(control.name);
    prefixes["controls"].push_back(control.prefix);
  }
  std::map<std::string, std::string> metadata = {{kMetaTokenizerHash, tokenizer.hash()},
                                                 {kMetaNames, names.dump()},
                                                 {kMetaPrefixes, prefixes.dump()},
                                                 {kMetaConfig, config_json(config).dump()}};
  Accumulator teacher_acc = std::move(accumulators.front());
  accumulators.erase(accumulators.begin());
  return FingerprintRun{std::move(teacher_acc), std::move(accumulators), config, metadata};
}

std::vector<std::string> save_fingerprint_run(const FingerprintRun& run, const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path teacher_path(path);
  const std::string suffix =
      teacher_path.extension().empty() ? ".safetensors" : teacher_path.extension().string();
  std::map<std::string, std::string> base;
  for (const auto& [key, value] : run.metadata) {
    if (per_file_keys().count(key) == 0) base[key] = value;
  }
  base[kMetaConfig] = config_json(run.config).dump();
  std::vector<std::string> written = {path};
  nlohmann::json control_files = nlohmann::json::array();
  for (std::size_t i = 0; i < run.controls.size(); ++i) {
    const std::string name = teacher_path.stem().string() + ".control" + std::to_string(i) + suffix;
    const fs::path control_path = teacher_path.parent_path() / name;
    auto metadata = base;
    metadata[kMetaRole] = "control";
    metadata[kMetaControlIndex] = std::to_string(i);
    run.controls[i].save(control_path.string(), metadata);
    control_files.push_back(name);
    written.push_back(control_path.string());
  }
  auto metadata = base;
  metadata[kMetaRole] = "teacher";
  metadata[kMetaControlFiles] = control_files.dump();
  run.teacher.save(path, metadata);
  return written;
}

namespace {

Accumulator load_checked(const std::string& path, std::map<std::string, std::string>* metadata,
                         const io::Tokenizer* tokenizer) {
  c10::optional<std::string> expected_hash;
  if (tokenizer != nullptr) expected_hash = tokenizer->hash();
  Accumulator acc = [&] {
    try {
      return Accumulator::load(path, metadata, {}, expected_hash);
    } catch (const c10::Error& e) {
      throw InvalidInput(e.msg());
    }
  }();
  if (tokenizer != nullptr && acc.vocab_size() < tokenizer->vocab_size()) {
    throw InvalidInput("'" + path + "': vocabulary size " + std::to_string(acc.vocab_size()) +
                       " is smaller than the tokenizer's " +
                       std::to_string(tokenizer->vocab_size()) + " (another vocabulary)");
  }
  return acc;
}

}  // namespace

FingerprintRun load_fingerprint_run(const std::string& path, const io::Tokenizer* tokenizer) {
  namespace fs = std::filesystem;
  std::map<std::string, std::string> metadata;
  Accumulator teacher = load_checked(path, &metadata, tokenizer);
  const auto role = metadata.find(kMetaRole);
  if (role != metadata.end() && role->second != "teacher") {
    throw InvalidInput("'" + path + "': holds a " + role->second +
                       " fingerprint, not a teacher's; load the teacher's file (it names its "
                       "controls)");
  }
  std::vector<Accumulator> controls;
  const auto files = metadata.find(kMetaControlFiles);
  if (files != metadata.end()) {
    nlohmann::json names;
    try {
      names = nlohmann::json::parse(files->second);
    } catch (const nlohmann::json::exception& e) {
      throw InvalidInput("'" + path + "': metadata 'control_files' is not valid JSON: " + e.what());
    }
    if (!names.is_array()) {
      throw InvalidInput("'" + path + "': metadata 'control_files' must be a JSON list, got " +
                         files->second);
    }
    for (const auto& name : names) {
      if (!name.is_string()) {
        throw InvalidInput("'" + path + "': metadata 'control_files' lists a non-string " +
                           name.dump());
      }
      const auto control_path = fs::path(path).parent_path() / name.get<std::string>();
      controls.push_back(load_checked(control_path.string(), nullptr, tokenizer));
      if (controls.back().vocab_size() != teacher.vocab_size()) {
        throw InvalidInput("'" + control_path.string() + "': vocabulary size " +
                           std::to_string(controls.back().vocab_size()) +
                           " differs from the teacher's " + std::to_string(teacher.vocab_size()));
      }
    }
  }
  RunConfig config = parse_config(metadata, path);
  std::map<std::string, std::string> carried;
  for (const auto& [key, value] : metadata) {
    if (per_file_keys().count(key) == 0) carried[key] = value;
  }
  return FingerprintRun{std::move(teacher), std::move(controls), config, carried};
}

FingerprintSummary summarize_fingerprint(const FingerprintRun& run, const io::Tokenizer* tokenizer,
                                         std::int64_t k, std::int64_t permutations, double q) {
  if (k < 1) throw InvalidInput("k: expected at least 1, got " + std::to_string(k));
  if (permutations < 1) {
    throw InvalidInput("permutations: expected at least 1, got " + std::to_string(permutations));
  }
  if (!(q > 0.0 && q <= 1.0)) {
    throw InvalidInput("q: expected a false discovery rate in (0, 1], got " + std::to_string(q));
  }
  FingerprintSummary summary;
  summary.teacher = run.teacher.finalize();
  const Fingerprint& fp = summary.teacher;
  summary.controls = static_cast<std::int64_t>(run.controls.size());
  const bool has_subset = fp.subset.defined() && fp.subset.numel() > 0;
  summary.subset_size = has_subset ? fp.subset.numel() : 0;
  const std::string field = has_subset ? "centered" : "mean_log_ratio";
  summary.top_up = top_values(fp, tokenizer, k, field, true);
  summary.top_down = top_values(fp, tokenizer, k, field, false);
  if (!has_subset || fp.sequences < 2) return summary;

  std::vector<torch::Tensor> controls_seq;
  std::vector<torch::Tensor> controls_centered;
  for (std::size_t i = 0; i < run.controls.size(); ++i) {
    const Fingerprint control = run.controls[i].finalize();
    if (!torch::equal(control.sequence_ids, fp.sequence_ids)) {
      throw InvalidInput("controls[" + std::to_string(i) + "]: its sequences (" +
                         std::to_string(control.sequence_ids.numel()) +
                         ") are not the teacher's (" + std::to_string(fp.sequence_ids.numel()) +
                         "); teacher and controls must score the same records");
    }
    controls_seq.push_back(control.sequence_centered);
    controls_centered.push_back(control.centered);
  }
  summary.global_test =
      global_test(fp.sequence_centered, controls_seq, "sumsq", permutations, run.config.seed);
  const auto test = per_token_test(fp.sequence_centered, controls_seq, q);
  const auto values = controls_centered.empty() ? fp.centered.to(torch::kFloat64)
                                                : trait_specific(fp.centered, controls_centered);
  const auto rejected = test.rejected.to(torch::kBool);
  for (std::int64_t j = 0; j < rejected.numel(); ++j) {
    if (!rejected[j].item<bool>()) continue;
    const auto id = fp.subset[j].item<std::int64_t>();
    summary.entangled.push_back({id, display(tokenizer, id), values[j].item<double>(),
                                 test.t[j].item<double>(), test.p[j].item<double>(),
                                 test.adjusted[j].item<double>()});
  }
  std::stable_sort(summary.entangled.begin(), summary.entangled.end(),
                   [](const EntangledToken& a, const EntangledToken& b) {
                     if (a.adjusted != b.adjusted) return a.adjusted < b.adjusted;
                     return std::abs(a.t) > std::abs(b.t);
                   });
  return summary;
}

}  // namespace libtransfer::fingerprint
