#include "libtransfer/distill/dataset.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <utility>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

torch::Tensor index_tensor(const std::vector<std::int64_t>& indices, torch::Device device) {
  return torch::tensor(indices, torch::kLong)
      .reshape({static_cast<std::int64_t>(indices.size())})
      .to(device);
}

// Uniform integer in [0, bound] from raw 64-bit draws, by rejection (unbiased, and unlike
// std::uniform_int_distribution the same on every standard library).
std::uint64_t uniform_up_to(std::mt19937_64& rng, std::uint64_t bound) {
  const std::uint64_t range = bound + 1;
  if (range == 0) return rng();  // bound = 2^64 - 1
  const std::uint64_t limit =
      std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % range;
  std::uint64_t r = rng();
  while (r >= limit) r = rng();
  return r % range;
}

void check_config(const ShuffleConfig& config, const char* who) {
  if (config.batch_size < 1) {
    throw InvalidInput(std::string(who) + ": batch_size must be >= 1, got " +
                       std::to_string(config.batch_size));
  }
}

}  // namespace

std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t stream) {
  // splitmix64 of the seed, combined with the stream and mixed again: nearby (seed, stream)
  // pairs give unrelated generator states.
  auto splitmix = [](std::uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  };
  return splitmix(splitmix(seed) ^ (stream * 0xD1B54A32D192ED03ULL + 0x8CB92BA72F3D8DD7ULL));
}

// ---- tokenization ---------------------------------------------------------------------------

std::int64_t TokenizedExample::prompt_length() const {
  std::int64_t n = 0;
  while (n < static_cast<std::int64_t>(completion.size()) && completion[n] == 0) ++n;
  return n;
}

Truncation parse_truncation(const std::string& name) {
  if (name == "error") return Truncation::kError;
  if (name == "right") return Truncation::kRight;
  if (name == "left") return Truncation::kLeft;
  if (name == "drop") return Truncation::kDrop;
  throw InvalidInput("truncation: expected one of error, right, left, drop; got '" + name + "'");
}

std::string to_string(Truncation t) {
  switch (t) {
    case Truncation::kError:
      return "error";
    case Truncation::kRight:
      return "right";
    case Truncation::kLeft:
      return "left";
    case Truncation::kDrop:
      return "drop";
  }
  return "unknown";
}

std::optional<TokenizedExample> make_example(const std::vector<std::int64_t>& prompt_ids,
                                             const std::vector<std::int64_t>& completion_ids,
                                             const TokenizeOptions& options, std::int64_t index) {
  if (options.max_tokens != 0 && options.max_tokens < 2) {
    throw InvalidInput("max_tokens must be 0 (no limit) or >= 2, got " +
                       std::to_string(options.max_tokens));
  }
  if (completion_ids.empty()) {
    throw InvalidInput("example " + std::to_string(index) +
                       ": empty completion (no token to train on)");
  }
  TokenizedExample ex;
  ex.tokens.reserve(prompt_ids.size() + completion_ids.size() + 1);
  ex.tokens.insert(ex.tokens.end(), prompt_ids.begin(), prompt_ids.end());
  ex.tokens.insert(ex.tokens.end(), completion_ids.begin(), completion_ids.end());
  if (options.eos_id) ex.tokens.push_back(*options.eos_id);
  ex.completion.assign(ex.tokens.size(), 1);
  std::fill(ex.completion.begin(), ex.completion.begin() + prompt_ids.size(), 0);
  for (const auto id : ex.tokens) {
    if (id < 0) {
      throw InvalidInput("example " + std::to_string(index) + ": token ids must be >= 0, got " +
                         std::to_string(id));
    }
  }
  const auto length = static_cast<std::int64_t>(ex.tokens.size());
  if (length < 2) {
    throw InvalidInput("example " + std::to_string(index) +
                       ": needs at least 2 tokens (an input and a target), got " +
                       std::to_string(length));
  }
  const std::int64_t max = options.max_tokens;
  if (max == 0 || length <= max) return ex;
  const std::string what = "example " + std::to_string(index) + " has " + std::to_string(length) +
                           " tokens (prompt " + std::to_string(prompt_ids.size()) +
                           "), more than max_tokens = " + std::to_string(max);
  switch (options.truncation) {
    case Truncation::kError:
      throw InvalidInput(what + " (truncation 'error'; choose right, left or drop)");
    case Truncation::kDrop:
      return std::nullopt;
    case Truncation::kRight:
      if (static_cast<std::int64_t>(prompt_ids.size()) >= max) {
        throw InvalidInput(what + ": truncation 'right' would leave no completion token");
      }
      ex.tokens.resize(max);
      ex.completion.resize(max);
      return ex;
    case Truncation::kLeft:
      ex.tokens.erase(ex.tokens.begin(), ex.tokens.end() - max);
      ex.completion.erase(ex.completion.begin(), ex.completion.end() - max);
      return ex;
  }
  return ex;
}

std::vector<TokenizedExample> tokenize_records(const io::Tokenizer& tokenizer,
                                               const std::vector<io::Record>& records,
                                               const TokenizeOptions& options, TokenizeStats* stats,
                                               int num_threads) {
  std::vector<std::string> prompts, completions;
  prompts.reserve(records.size());
  completions.reserve(records.size());
  for (const auto& r : records) {
    prompts.push_back(r.prompt);
    completions.push_back(r.completion);
  }
  const auto prompt_ids = tokenizer.encode_batch(prompts, num_threads);
  const auto completion_ids = tokenizer.encode_batch(completions, num_threads);
  TokenizeStats counts;
  std::vector<TokenizedExample> out;
  out.reserve(records.size());
  for (std::size_t i = 0; i < records.size(); ++i) {
    const std::vector<std::int64_t> p(prompt_ids[i].begin(), prompt_ids[i].end());
    const std::vector<std::int64_t> c(completion_ids[i].begin(), completion_ids[i].end());
    if (c.empty()) {
      throw InvalidInput("record " + std::to_string(i) + ": empty completion (prompt '" +
                         records[i].prompt.substr(0, 60) + "')");
    }
    auto ex = make_example(p, c, options, static_cast<std::int64_t>(i));
    if (!ex) {
      ++counts.dropped;
      continue;
    }
    const std::size_t full = p.size() + c.size() + (options.eos_id ? 1 : 0);
    if (ex->tokens.size() < full) ++counts.truncated;
    out.push_back(std::move(*ex));
  }
  counts.examples = static_cast<std::int64_t>(out.size());
  if (stats) *stats = counts;
  return out;
}

// ---- padding and packing --------------------------------------------------------------------

Batch collate(const std::vector<const TokenizedExample*>& examples, std::int64_t pad_id,
              std::int64_t pad_to) {
  if (examples.empty()) throw InvalidInput("collate: no examples");
  if (pad_id < 0) throw InvalidInput("collate: pad_id must be >= 0, got " + std::to_string(pad_id));
  if (pad_to < 0) throw InvalidInput("collate: pad_to must be >= 0, got " + std::to_string(pad_to));
  std::int64_t longest = 0;
  for (std::size_t b = 0; b < examples.size(); ++b) {
    const auto& ex = *examples[b];
    if (ex.tokens.size() != ex.completion.size() || ex.tokens.size() < 2) {
      throw InvalidInput("collate: example " + std::to_string(b) + " has " +
                         std::to_string(ex.tokens.size()) + " tokens and " +
                         std::to_string(ex.completion.size()) +
                         " completion flags (need equal counts, at least 2)");
    }
    longest = std::max(longest, static_cast<std::int64_t>(ex.tokens.size()) - 1);
  }
  if (pad_to > 0 && longest > pad_to) {
    throw InvalidInput("collate: an example needs " + std::to_string(longest) +
                       " positions, more than pad_to = " + std::to_string(pad_to));
  }
  const std::int64_t B = static_cast<std::int64_t>(examples.size());
  const std::int64_t T = pad_to > 0 ? pad_to : longest;
  auto input = torch::full({B, T}, pad_id, torch::kLong);
  auto targets = torch::full({B, T}, pad_id, torch::kLong);
  auto attention = torch::zeros({B, T}, torch::kLong);
  auto loss = torch::zeros({B, T}, torch::kFloat);
  auto in_a = input.accessor<std::int64_t, 2>();
  auto tg_a = targets.accessor<std::int64_t, 2>();
  auto at_a = attention.accessor<std::int64_t, 2>();
  auto ls_a = loss.accessor<float, 2>();
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& ex = *examples[b];
    const auto n = static_cast<std::int64_t>(ex.tokens.size()) - 1;
    for (std::int64_t t = 0; t < n; ++t) {
      in_a[b][t] = ex.tokens[t];
      tg_a[b][t] = ex.tokens[t + 1];
      at_a[b][t] = 1;
      ls_a[b][t] = ex.completion[t + 1] ? 1.0f : 0.0f;
    }
  }
  Batch batch;
  batch.input = input;
  batch.targets = targets;
  batch.attention_mask = attention;
  batch.loss_mask = loss;
  return batch;
}

Batch collate(const std::vector<TokenizedExample>& examples, std::int64_t pad_id,
              std::int64_t pad_to) {
  std::vector<const TokenizedExample*> ptrs;
  ptrs.reserve(examples.size());
  for (const auto& ex : examples) ptrs.push_back(&ex);
  return collate(ptrs, pad_id, pad_to);
}

PackedBlocks pack_examples(const std::vector<TokenizedExample>& examples, std::int64_t block_length,
                           std::int64_t pad_id) {
  if (examples.empty()) throw InvalidInput("pack_examples: no examples");
  if (block_length < 1) {
    throw InvalidInput("pack_examples: block_length must be >= 1, got " +
                       std::to_string(block_length));
  }
  if (pad_id < 0) {
    throw InvalidInput("pack_examples: pad_id must be >= 0, got " + std::to_string(pad_id));
  }
  std::vector<std::int64_t> stream;
  std::vector<std::uint8_t> flags;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    const auto& ex = examples[i];
    if (ex.tokens.size() != ex.completion.size() || ex.tokens.empty()) {
      throw InvalidInput("pack_examples: example " + std::to_string(i) + " has " +
                         std::to_string(ex.tokens.size()) + " tokens and " +
                         std::to_string(ex.completion.size()) + " completion flags");
    }
    stream.insert(stream.end(), ex.tokens.begin(), ex.tokens.end());
    flags.insert(flags.end(), ex.completion.begin(), ex.completion.end());
  }
  const auto S = static_cast<std::int64_t>(stream.size());
  const std::int64_t L = block_length;
  const std::int64_t N = (S + L - 1) / L;
  PackedBlocks out;
  out.input = torch::full({N, L}, pad_id, torch::kLong);
  out.targets = torch::full({N, L}, pad_id, torch::kLong);
  out.attention_mask = torch::zeros({N, L}, torch::kLong);
  out.loss_mask = torch::zeros({N, L}, torch::kFloat);
  auto in_a = out.input.accessor<std::int64_t, 2>();
  auto tg_a = out.targets.accessor<std::int64_t, 2>();
  auto at_a = out.attention_mask.accessor<std::int64_t, 2>();
  auto ls_a = out.loss_mask.accessor<float, 2>();
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t k = s / L, t = s % L;
    in_a[k][t] = stream[s];
    at_a[k][t] = 1;
    if (s + 1 < S) {
      tg_a[k][t] = stream[s + 1];
      ls_a[k][t] = flags[s + 1] ? 1.0f : 0.0f;
    }
  }
  return out;
}

// ---- shuffling ------------------------------------------------------------------------------

std::vector<std::int64_t> epoch_permutation(std::int64_t n, std::uint64_t seed,
                                            std::int64_t epoch) {
  if (n < 0) throw InvalidInput("epoch_permutation: n must be >= 0, got " + std::to_string(n));
  if (epoch < 0) {
    throw InvalidInput("epoch_permutation: epoch must be >= 0, got " + std::to_string(epoch));
  }
  std::vector<std::int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), std::int64_t{0});
  std::mt19937_64 rng(mix_seed(seed, static_cast<std::uint64_t>(epoch)));
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(uniform_up_to(rng, static_cast<std::uint64_t>(i)));
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

std::int64_t steps_per_epoch(std::int64_t n, const ShuffleConfig& config) {
  check_config(config, "steps_per_epoch");
  if (n < 0) throw InvalidInput("steps_per_epoch: n must be >= 0, got " + std::to_string(n));
  return config.drop_last ? n / config.batch_size : (n + config.batch_size - 1) / config.batch_size;
}

EpochSampler::EpochSampler(std::int64_t n, ShuffleConfig config)
    : n_(n), config_(config), steps_per_epoch_(0) {
  check_config(config_, "data set");
  if (n_ < 1) throw InvalidInput("data set: needs at least 1 example, got " + std::to_string(n_));
  steps_per_epoch_ = distill::steps_per_epoch(n_, config_);
  if (steps_per_epoch_ == 0) {
    throw InvalidInput("data set: drop_last with batch_size " + std::to_string(config_.batch_size) +
                       " larger than the " + std::to_string(n_) +
                       " examples leaves no batch at all");
  }
}

std::vector<std::int64_t> EpochSampler::indices(std::int64_t step) {
  if (step < 0) throw InvalidInput("batch: step must be >= 0, got " + std::to_string(step));
  const std::int64_t epoch = step / steps_per_epoch_;
  const std::int64_t within = step % steps_per_epoch_;
  if (epoch != cached_epoch_) {
    if (config_.shuffle) {
      order_ = epoch_permutation(n_, config_.seed, epoch);
    } else if (order_.size() != static_cast<std::size_t>(n_)) {
      order_.resize(n_);
      std::iota(order_.begin(), order_.end(), std::int64_t{0});
    }
    cached_epoch_ = epoch;
  }
  const std::int64_t begin = within * config_.batch_size;
  const std::int64_t end = std::min(n_, begin + config_.batch_size);
  return std::vector<std::int64_t>(order_.begin() + begin, order_.begin() + end);
}

std::vector<std::int64_t> batch_indices(std::int64_t n, const ShuffleConfig& config,
                                        std::int64_t step) {
  EpochSampler sampler(n, config);
  return sampler.indices(step);
}

// ---- sources --------------------------------------------------------------------------------

namespace {

PackedBlocks maybe_pack(const std::vector<TokenizedExample>& examples,
                        const TokenDatasetConfig& config) {
  if (config.pack_length < 0) {
    throw InvalidInput("TokenDataset: pack_length must be >= 0, got " +
                       std::to_string(config.pack_length));
  }
  if (config.pad_to < 0) {
    throw InvalidInput("TokenDataset: pad_to must be >= 0, got " + std::to_string(config.pad_to));
  }
  if (examples.empty()) throw InvalidInput("TokenDataset: no examples");
  if (config.pack_length == 0) return {};
  return pack_examples(examples, config.pack_length, config.pad_id);
}

}  // namespace

TokenDataset::TokenDataset(std::vector<TokenizedExample> examples, TokenDatasetConfig config)
    : examples_(std::move(examples)),
      blocks_(maybe_pack(examples_, config)),
      config_(config),
      sampler_(
          config.pack_length > 0 ? blocks_.size() : static_cast<std::int64_t>(examples_.size()),
          config.shuffle) {
  if (config_.pad_id < 0) {
    throw InvalidInput("TokenDataset: pad_id must be >= 0, got " + std::to_string(config_.pad_id));
  }
  if (config_.pack_length > 0) {
    examples_.clear();  // the blocks hold every token
    examples_.shrink_to_fit();
    return;
  }
  // Fail at set-up, not mid-run, on an example collate would refuse.
  for (std::size_t i = 0; i < examples_.size(); ++i) {
    const auto& ex = examples_[i];
    if (ex.tokens.size() != ex.completion.size() || ex.tokens.size() < 2) {
      throw InvalidInput("TokenDataset: example " + std::to_string(i) + " has " +
                         std::to_string(ex.tokens.size()) + " tokens and " +
                         std::to_string(ex.completion.size()) +
                         " completion flags (need equal counts, at least 2)");
    }
    if (config_.pad_to > 0 && static_cast<std::int64_t>(ex.tokens.size()) - 1 > config_.pad_to) {
      throw InvalidInput("TokenDataset: example " + std::to_string(i) + " needs " +
                         std::to_string(ex.tokens.size() - 1) +
                         " positions, more than pad_to = " + std::to_string(config_.pad_to));
    }
  }
}

std::int64_t TokenDataset::size() const { return sampler_.size(); }

std::int64_t TokenDataset::steps_per_epoch() const { return sampler_.steps_per_epoch(); }

Batch TokenDataset::batch(std::int64_t step) {
  const auto indices = sampler_.indices(step);
  if (config_.pack_length > 0) {
    const auto idx = index_tensor(indices, torch::kCPU);
    Batch b;
    b.input = blocks_.input.index_select(0, idx);
    b.targets = blocks_.targets.index_select(0, idx);
    b.attention_mask = blocks_.attention_mask.index_select(0, idx);
    b.loss_mask = blocks_.loss_mask.index_select(0, idx);
    return b;
  }
  std::vector<const TokenizedExample*> chosen;
  chosen.reserve(indices.size());
  for (const auto i : indices) chosen.push_back(&examples_[i]);
  return collate(chosen, config_.pad_id, config_.pad_to);
}

namespace {

std::int64_t checked_rows(const torch::Tensor& features, const torch::Tensor& labels) {
  const auto described = [](const torch::Tensor& t) {
    return t.defined() ? shape_of(t) + " " + std::string(c10::toString(t.scalar_type()))
                       : std::string("undefined");
  };
  // A wrong dtype is a TypeError, a wrong shape a ValueError.
  if (!features.defined() || !features.is_floating_point()) {
    throw WrongType("TensorDataset: features must be a 2-D floating tensor [N, F], got " +
                    described(features));
  }
  if (features.dim() != 2) {
    throw InvalidInput("TensorDataset: features must be a 2-D floating tensor [N, F], got " +
                       described(features));
  }
  if (!labels.defined() || labels.scalar_type() != torch::kLong) {
    throw WrongType("TensorDataset: labels must be a 1-D int64 tensor [N], got " +
                    described(labels));
  }
  if (labels.dim() != 1) {
    throw InvalidInput("TensorDataset: labels must be a 1-D int64 tensor [N], got " +
                       described(labels));
  }
  if (features.size(0) != labels.size(0)) {
    throw InvalidInput("TensorDataset: features " + shape_of(features) + " and labels " +
                       shape_of(labels) + " differ in N");
  }
  if (features.device() != labels.device()) {
    throw InvalidInput("TensorDataset: features and labels must be on one device, got " +
                       features.device().str() + " and " + labels.device().str());
  }
  if (features.size(0) == 0) {
    throw InvalidInput("TensorDataset: features and labels hold no rows (N = 0), need at least 1");
  }
  return features.size(0);
}

}  // namespace

TensorDataset::TensorDataset(torch::Tensor features, torch::Tensor labels, ShuffleConfig config)
    : features_(std::move(features)),
      labels_(std::move(labels)),
      sampler_(checked_rows(features_, labels_), config) {}

std::int64_t TensorDataset::steps_per_epoch() const { return sampler_.steps_per_epoch(); }

Batch TensorDataset::batch(std::int64_t step) {
  const auto idx = index_tensor(sampler_.indices(step), features_.device());
  Batch b;
  b.input = features_.index_select(0, idx);
  b.targets = labels_.index_select(0, idx);
  return b;
}

NoiseSource::NoiseSource(NoiseConfig config) : config_(config) {
  if (config_.batch_size < 1 || config_.features < 1) {
    throw InvalidInput("NoiseSource: batch_size and features must be >= 1, got " +
                       std::to_string(config_.batch_size) + " and " +
                       std::to_string(config_.features));
  }
  if (!(config_.low < config_.high) || !std::isfinite(config_.low) ||
      !std::isfinite(config_.high)) {
    throw InvalidInput("NoiseSource: need finite low < high, got low = " +
                       std::to_string(config_.low) + ", high = " + std::to_string(config_.high));
  }
  if (config_.steps_per_epoch < 1) {
    throw InvalidInput("NoiseSource: steps_per_epoch must be >= 1, got " +
                       std::to_string(config_.steps_per_epoch));
  }
  if (!c10::isFloatingType(config_.dtype)) {
    throw WrongType("NoiseSource: dtype must be floating, got " +
                    std::string(c10::toString(config_.dtype)));
  }
}

Batch NoiseSource::batch(std::int64_t step) {
  if (step < 0) throw InvalidInput("NoiseSource: step must be >= 0, got " + std::to_string(step));
  auto gen =
      at::detail::createCPUGenerator(mix_seed(config_.seed, static_cast<std::uint64_t>(step)));
  // Drawn in float64 and rounded, so every dtype sees the same underlying values.
  auto noise = torch::empty({config_.batch_size, config_.features}, torch::kFloat64);
  noise.uniform_(config_.low, config_.high, gen);
  Batch b;
  b.input = noise.to(config_.device, config_.dtype);
  return b;
}

}  // namespace libtransfer::distill
