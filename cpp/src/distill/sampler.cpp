// The sampler: config checks, the filtered distribution, counter-based draws, and the batched
// decoding loop (KV cache or full recomputation).
#include "libtransfer/distill/sampler.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

std::string number(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// splitmix64's finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mix.
std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Renormalizes the kept mass of each row: probs * keep / sum.
torch::Tensor renormalized(const torch::Tensor& probs, const torch::Tensor& keep) {
  const auto kept = probs * keep;
  return kept / kept.sum(-1, /*keepdim=*/true);
}

// The filtered distribution in descending order of the tempered probabilities (stable: ties in
// index order): (probabilities [B, V] float64 summing to 1 with zeros after the kept prefix,
// token ids [B, V], kept count [B]).
struct Sorted {
  torch::Tensor probs;
  torch::Tensor ids;
  torch::Tensor kept;
};

Sorted filter_sorted(const torch::Tensor& logits, const SamplerConfig& config) {
  const auto scaled = logits.to(torch::kDouble) / config.temperature;
  const auto probs = torch::softmax(scaled, -1);
  auto [sorted, ids] = torch::sort(probs, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const auto V = sorted.size(-1);
  auto keep = torch::ones_like(sorted, torch::kBool);
  // The first (most probable) token always survives, so every step keeps a non-empty prefix.
  auto first_kept = [](torch::Tensor mask) {
    mask.select(-1, 0).fill_(true);
    return mask;
  };
  auto current = sorted;
  if (config.threshold > 0.0) {
    keep = first_kept(keep & current.ge(config.threshold));
    current = renormalized(sorted, keep);
  }
  if (config.top_k > 0 && config.top_k < V) {
    const auto rank = torch::arange(V, sorted.options().dtype(torch::kLong)).unsqueeze(0);
    keep = first_kept(keep & rank.lt(config.top_k));
    current = renormalized(sorted, keep);
  }
  if (config.top_p < 1.0) {
    const auto before = current.cumsum(-1) - current;  // mass of the more probable tokens
    keep = first_kept(keep & before.lt(config.top_p));
    current = renormalized(sorted, keep);
  }
  if (config.min_p > 0.0) {
    keep = first_kept(keep & current.ge(current.select(-1, 0).unsqueeze(-1) * config.min_p));
    current = renormalized(sorted, keep);
  }
  return {renormalized(sorted, keep), ids, keep.sum(-1)};
}

// One token per row of logits [B, V]: greedy argmax, or the inverse CDF of the filtered sorted
// distribution at the row's uniform number.
torch::Tensor choose(const torch::Tensor& logits, const SamplerConfig& config,
                     const std::vector<double>& uniforms) {
  if (config.temperature == 0.0) return logits.argmax(-1);
  const auto sorted = filter_sorted(logits, config);
  const auto u = torch::tensor(uniforms, torch::TensorOptions().dtype(torch::kDouble))
                     .to(logits.device())
                     .unsqueeze(-1);
  // The first index whose cumulative mass exceeds u; rounding can leave the total a hair under
  // u, so the choice is clamped to the kept prefix.
  auto position = sorted.probs.cumsum(-1).le(u).sum(-1);
  position = torch::minimum(position, sorted.kept - 1).unsqueeze(-1);
  return sorted.ids.gather(-1, position).squeeze(-1);
}

// Puts the model in evaluation mode for the sampler's lifetime.
class EvalMode {
 public:
  explicit EvalMode(models::Model& model) : model_(model), was_training_(model.is_training()) {
    if (was_training_) model_.set_training(false);
  }
  ~EvalMode() {
    if (was_training_) model_.set_training(true);
  }

 private:
  models::Model& model_;
  bool was_training_;
};

void check_prompts(const std::vector<std::vector<std::int64_t>>& prompts, std::int64_t vocab) {
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) {
      throw InvalidInput("sample: prompts[" + std::to_string(i) +
                         "] is empty; every prompt needs at least one token");
    }
    for (const auto id : prompts[i]) {
      if (id < 0 || id >= vocab) {
        throw InvalidInput("sample: prompts[" + std::to_string(i) + "] holds token id " +
                           std::to_string(id) + ", expected ids in [0, " + std::to_string(vocab) +
                           ")");
      }
    }
  }
}

// Samples the prompts [begin, end) into `out`.
void sample_chunk(models::Model& model, const std::vector<std::vector<std::int64_t>>& prompts,
                  size_t begin, size_t end, const SamplerConfig& config, SampleResult& out) {
  const auto rows = static_cast<std::int64_t>(end - begin);
  size_t longest = 0;
  for (size_t i = begin; i < end; ++i) longest = std::max(longest, prompts[i].size());
  const auto L = static_cast<std::int64_t>(longest);
  // Left padding: row r's prompt occupies the last prompts[r].size() columns.
  auto ids = torch::full({rows, L}, config.pad_id, torch::kLong);
  auto mask = torch::zeros({rows, L}, torch::kLong);
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto& prompt = prompts[begin + static_cast<size_t>(r)];
    const auto n = static_cast<std::int64_t>(prompt.size());
    ids[r].narrow(0, L - n, n).copy_(torch::tensor(prompt, torch::kLong));
    mask[r].narrow(0, L - n, n).fill_(1);
  }
  const auto device = model.device();
  ids = ids.to(device);
  mask = mask.to(device);
  const bool cached = config.use_cache && model.supports_kv_cache();
  models::KVCache cache;
  auto logits = cached ? model.forward_cached(ids, mask, cache) : model.forward(ids, mask);
  logits = logits.select(1, logits.size(1) - 1);

  const std::set<std::int64_t> stops(config.stop_tokens.begin(), config.stop_tokens.end());
  std::vector<bool> finished(static_cast<size_t>(rows), false);
  for (std::int64_t step = 0; step < config.max_new_tokens; ++step) {
    std::vector<double> uniforms(static_cast<size_t>(rows));
    for (std::int64_t r = 0; r < rows; ++r) {
      uniforms[static_cast<size_t>(r)] = sampler_uniform(
          config.seed, begin + static_cast<size_t>(r), static_cast<std::uint64_t>(step));
    }
    const auto tokens = choose(logits, config, uniforms);
    const auto logprobs =
        torch::log_softmax(logits.to(torch::kDouble), -1).gather(-1, tokens.unsqueeze(-1));
    const auto tokens_cpu = tokens.to(torch::kCPU);
    const auto logprobs_cpu = logprobs.to(torch::kCPU).reshape({-1});
    const auto* token_data = tokens_cpu.data_ptr<std::int64_t>();
    const auto* logprob_data = logprobs_cpu.data_ptr<double>();
    std::vector<std::int64_t> next(static_cast<size_t>(rows), config.pad_id);
    std::vector<std::int64_t> next_mask(static_cast<size_t>(rows), 0);
    bool any_active = false;
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto row = static_cast<size_t>(r);
      if (finished[row]) continue;
      const size_t index = begin + row;
      out.tokens[index].push_back(token_data[r]);
      out.logprobs[index].push_back(logprob_data[r]);
      if (stops.count(token_data[r]) > 0) {
        finished[row] = true;
        out.stop_reasons[index] = StopReason::kStopToken;
        continue;
      }
      next[row] = token_data[r];
      next_mask[row] = 1;
      any_active = true;
    }
    if (!any_active || step + 1 == config.max_new_tokens) break;
    // Ended rows are fed padding (masked), so they never influence the others.
    const auto next_ids = torch::tensor(next, torch::kLong).to(device).unsqueeze(1);
    const auto next_m = torch::tensor(next_mask, torch::kLong).to(device).unsqueeze(1);
    if (cached) {
      logits = model.forward_cached(next_ids, next_m, cache).select(1, 0);
    } else {
      ids = torch::cat({ids, next_ids}, 1);
      mask = torch::cat({mask, next_m}, 1);
      const auto full = model.forward(ids, mask);
      logits = full.select(1, full.size(1) - 1);
    }
  }
}

}  // namespace

void SamplerConfig::validate() const {
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    throw InvalidInput("SamplerConfig.temperature: expected a finite value >= 0, got " +
                       number(temperature));
  }
  if (top_k < 0) {
    throw InvalidInput("SamplerConfig.top_k: expected >= 0 (0 = off), got " +
                       std::to_string(top_k));
  }
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    throw InvalidInput("SamplerConfig.top_p: expected 0 < top_p <= 1, got " + number(top_p));
  }
  if (!(min_p >= 0.0 && min_p < 1.0)) {
    throw InvalidInput("SamplerConfig.min_p: expected 0 <= min_p < 1, got " + number(min_p));
  }
  if (!(threshold >= 0.0 && threshold < 1.0)) {
    throw InvalidInput("SamplerConfig.threshold: expected 0 <= threshold < 1, got " +
                       number(threshold));
  }
  if (max_new_tokens < 0) {
    throw InvalidInput("SamplerConfig.max_new_tokens: expected >= 0, got " +
                       std::to_string(max_new_tokens));
  }
  if (batch_size < 1) {
    throw InvalidInput("SamplerConfig.batch_size: expected >= 1, got " +
                       std::to_string(batch_size));
  }
  if (pad_id < 0) {
    throw InvalidInput("SamplerConfig.pad_id: expected a token id >= 0, got " +
                       std::to_string(pad_id));
  }
}

std::string stop_reason_name(StopReason reason) {
  return reason == StopReason::kStopToken ? "stop_token" : "max_tokens";
}

double sampler_uniform(std::uint64_t seed, std::uint64_t index, std::uint64_t step) {
  const std::uint64_t bits = splitmix64(splitmix64(splitmix64(seed) ^ index) ^ step);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

torch::Tensor filtered_probabilities(const torch::Tensor& logits, const SamplerConfig& config) {
  config.validate();
  if (!logits.defined() || logits.dim() != 2 || !at::isFloatingType(logits.scalar_type())) {
    throw InvalidInput("filtered_probabilities: logits must be floating [B, V], got " +
                       (logits.defined() ? std::string(c10::toString(logits.scalar_type())) +
                                               " of shape " + c10::str(logits.sizes())
                                         : std::string("an undefined tensor")));
  }
  torch::NoGradGuard no_grad;
  if (config.temperature == 0.0) {
    return torch::zeros_like(logits, torch::kDouble)
        .scatter_(-1, logits.argmax(-1, /*keepdim=*/true), 1.0);
  }
  const auto sorted = filter_sorted(logits, config);
  return torch::zeros_like(sorted.probs).scatter_(-1, sorted.ids, sorted.probs);
}

SampleResult sample_with_details(models::Model& model,
                                 const std::vector<std::vector<std::int64_t>>& prompts,
                                 const SamplerConfig& config) {
  config.validate();
  if (model.input_kind() != models::InputKind::kTokens) {
    throw InvalidInput("sample: " + model.describe() +
                       " takes features, the sampler needs a language model (token ids)");
  }
  const auto vocab = model.output_size();
  check_prompts(prompts, vocab);
  if (config.pad_id >= vocab) {
    throw InvalidInput("SamplerConfig.pad_id: expected an id in [0, " + std::to_string(vocab) +
                       "), got " + std::to_string(config.pad_id));
  }
  SampleResult out;
  out.tokens.resize(prompts.size());
  out.logprobs.resize(prompts.size());
  out.stop_reasons.assign(prompts.size(), StopReason::kMaxTokens);
  if (config.max_new_tokens == 0) return out;
  torch::NoGradGuard no_grad;
  EvalMode eval(model);
  const auto batch = static_cast<size_t>(config.batch_size);
  for (size_t begin = 0; begin < prompts.size(); begin += batch) {
    sample_chunk(model, prompts, begin, std::min(prompts.size(), begin + batch), config, out);
  }
  return out;
}

std::vector<std::vector<std::int64_t>> sample(models::Model& model,
                                              const std::vector<std::vector<std::int64_t>>& prompts,
                                              const SamplerConfig& config) {
  return sample_with_details(model, prompts, config).tokens;
}

}  // namespace libtransfer::distill
