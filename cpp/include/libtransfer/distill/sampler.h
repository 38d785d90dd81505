// Sampling completions from a language model: temperature, top-k, top-p (nucleus), min-p and
// threshold sampling (Zur et al.'s mitigation: drop tokens under a probability), stop tokens,
// batched with left padding, using the model's KV cache when it has one.
//
// Randomness is counter-based: the uniform number that picks token t of prompt i is a hash of
// (seed, i, t), so a prompt's completion depends only on (seed, i, prompt, model), never on
// batch_size or on the other prompts (up to the floating-point rounding of batched forwards,
// which can flip a draw only when it falls within ~1e-7 of a boundary).
//
// Costs per generated position: one forward of the new token (with a KV cache) or of the whole
// prefix (without), and one sort of the vocabulary per row on the model's device.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::distill {

// How to sample. The filters act in this order, each on the distribution left by the previous
// one (renormalized): softmax(logits / temperature) -> threshold -> top_k -> top_p -> min_p.
// The most probable token always survives. temperature 0 means greedy decoding (argmax; the
// filters are then irrelevant).
struct SamplerConfig {
  double temperature = 1.0;  // >= 0
  std::int64_t top_k = 0;    // keep the k most probable tokens; 0 = off
  double top_p = 1.0;        // keep the smallest prefix of the sorted tokens with mass >= top_p
  double min_p = 0.0;        // keep tokens with p >= min_p * p_max; 0 = off
  double threshold = 0.0;    // drop tokens with p < threshold (after temperature); 0 = off
  std::vector<std::int64_t> stop_tokens;  // a row ends after sampling one (included in output)
  std::int64_t max_new_tokens = 32;
  std::int64_t pad_id = 0;       // fills the left padding and the rows that have ended
  std::int64_t batch_size = 32;  // prompts per forward
  std::uint64_t seed = 0;
  bool use_cache = true;  // use forward_cached when the model supports it

  // InvalidInput naming the field: temperature >= 0 and finite, top_k >= 0, 0 < top_p <= 1,
  // 0 <= min_p < 1, 0 <= threshold < 1, max_new_tokens >= 0, batch_size >= 1, pad_id >= 0.
  void validate() const;
};

// Why a completion ended.
enum class StopReason {
  kStopToken,  // sampled one of stop_tokens (the last token of the completion)
  kMaxTokens,  // reached max_new_tokens
};

std::string stop_reason_name(StopReason reason);

// The completions of a sample call, one entry per prompt in prompt order. logprobs[i][t] is
// log p(tokens[i][t] | prompt, tokens[i][:t]) under the unmodified model (temperature 1, no
// filter): what a likelihood-ratio filter needs. Costs O(total tokens).
struct SampleResult {
  std::vector<std::vector<std::int64_t>> tokens;
  std::vector<StopReason> stop_reasons;
  std::vector<std::vector<double>> logprobs;
};

// Completions (without the prompt; the stop token included when one ended the row) with stop
// reasons and log-probabilities. The model must take tokens; every prompt must be non-empty with
// ids in [0, output_size). Runs under no_grad in evaluation mode (the mode is restored after).
SampleResult sample_with_details(models::Model& model,
                                 const std::vector<std::vector<std::int64_t>>& prompts,
                                 const SamplerConfig& config);

// Only the completions' tokens.
std::vector<std::vector<std::int64_t>> sample(models::Model& model,
                                              const std::vector<std::vector<std::int64_t>>& prompts,
                                              const SamplerConfig& config);

// The filtered next-token distribution of each row of logits [B, V] (float64 [B, V], rows sum
// to 1; greedy: one-hot argmax): exactly what the sampler draws from. For tests and analyses.
torch::Tensor filtered_probabilities(const torch::Tensor& logits, const SamplerConfig& config);

// The uniform number in [0, 1) used for token `step` of prompt `index` (53 random bits of a
// splitmix64 hash of seed, index and step).
double sampler_uniform(std::uint64_t seed, std::uint64_t index, std::uint64_t step);

}  // namespace libtransfer::distill
