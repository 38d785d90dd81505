// Distillation data sets: prompt/completion records tokenized into examples with completion-only
// loss masks, padded or packed into distill::Batch, and the BatchSources the trainer draws from
// (token data, feature tensors, uniform noise). Every source is a pure function of (seed, step).
//
// Shuffling: epoch e = step / steps_per_epoch() visits the examples in the order of a
// permutation drawn from (seed, e) by a Fisher-Yates shuffle over std::mt19937_64 (whose output
// the C++ standard fixes), so the order is the same on every platform and batch(step) can be
// called in any order. Last partial batch: with drop_last = false (default) the last batch of
// an epoch holds the n % batch_size remaining examples; with drop_last = true it is skipped
// (those examples, different ones each epoch, are not seen that epoch).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/distill/batch.h"
#include "libtransfer/io/jsonl.h"
#include "libtransfer/io/tokenizer.h"

namespace libtransfer::distill {

// One tokenized example: the token ids of prompt + completion (+ EOS) and, per token, whether it
// belongs to the completion (the loss counts for predicting it). Costs 9 bytes per token.
struct TokenizedExample {
  std::vector<std::int64_t> tokens;
  std::vector<std::uint8_t> completion;  // same length as tokens; 1 for completion tokens (EOS too)
  std::int64_t prompt_length() const;    // leading tokens with completion == 0
};

// What happens to an example longer than TokenizeOptions::max_tokens.
enum class Truncation {
  kError,  // InvalidInput naming the example's index and lengths (default: nothing is lost
           // silently)
  kRight,  // keep the first max_tokens tokens (the end of the completion and EOS are cut);
           // InvalidInput if the prompt alone fills max_tokens (no completion token would remain)
  kLeft,   // keep the last max_tokens tokens (the start of the prompt is cut first)
  kDrop,   // skip the example (counted in TokenizeStats::dropped)
};

// Parses "error" | "right" | "left" | "drop" (InvalidInput listing the choices otherwise).
Truncation parse_truncation(const std::string& name);
std::string to_string(Truncation t);

struct TokenizeOptions {
  // Appended after the completion (counted as a completion token) when set.
  std::optional<std::int64_t> eos_id;
  // Longest example in tokens (prompt + completion + EOS); 0: no limit. A padded batch of
  // examples of L tokens has T = L - 1 positions (inputs are tokens[:-1], targets tokens[1:]).
  std::int64_t max_tokens = 0;
  Truncation truncation = Truncation::kError;
};

struct TokenizeStats {
  std::int64_t examples = 0;   // examples kept
  std::int64_t truncated = 0;  // kept but shortened
  std::int64_t dropped = 0;    // skipped (kDrop)
};

// One example from token ids (completion must not be empty). Returns nullopt when kDrop skips it.
// `index` only names the example in error messages.
std::optional<TokenizedExample> make_example(const std::vector<std::int64_t>& prompt_ids,
                                             const std::vector<std::int64_t>& completion_ids,
                                             const TokenizeOptions& options,
                                             std::int64_t index = 0);

// Tokenizes records with the tokenizer (prompt and completion encoded separately, so the
// boundary is exact; encode_batch's threads). InvalidInput for an empty completion, naming the
// record. `stats`, when given, receives the counts.
std::vector<TokenizedExample> tokenize_records(const io::Tokenizer& tokenizer,
                                               const std::vector<io::Record>& records,
                                               const TokenizeOptions& options = {},
                                               TokenizeStats* stats = nullptr, int num_threads = 0);

// A training batch from examples, right-padded to the longest (T = max L - 1): input
// tokens[:-1], targets tokens[1:], attention_mask 1 on real positions, loss_mask[b, t] = 1 iff
// target token t + 1 is a completion token. Padding: input and targets pad_id, masks 0.
// pad_to > 0 pads every batch to exactly T = pad_to (InvalidInput if an example is longer).
// Examples need at least 2 tokens. Tensors on the CPU.
Batch collate(const std::vector<const TokenizedExample*>& examples, std::int64_t pad_id,
              std::int64_t pad_to = 0);
Batch collate(const std::vector<TokenizedExample>& examples, std::int64_t pad_id,
              std::int64_t pad_to = 0);

// Packing: the examples' tokens concatenated in order into one stream, cut into blocks of
// `block_length` input positions. Block k has input stream[k L .. k L + L) and targets
// stream[k L + 1 .. k L + L + 1), so every token is an input exactly once and every token but
// the first is a target exactly once (no position is lost at block edges); the loss mask of a
// target is its completion flag, so a prompt token following a completion is never a target
// with loss. The last block is right-padded (pad_id, masks 0).
//
// Attention crosses example boundaries: the Model interface takes only a [B, T] padding mask,
// which cannot express a block-diagonal mask, and positions keep counting across examples. This
// is the usual trade (GPT-style pretraining does the same): a completion token may attend to
// earlier unrelated examples. Put an EOS between examples (TokenizeOptions::eos_id) so the model
// sees the boundary; use padding instead of packing when exact per-example conditioning matters.
struct PackedBlocks {
  torch::Tensor input;           // [N_blocks, L] int64
  torch::Tensor targets;         // [N_blocks, L] int64
  torch::Tensor attention_mask;  // [N_blocks, L] int64
  torch::Tensor loss_mask;       // [N_blocks, L] float32
  std::int64_t size() const { return input.defined() ? input.size(0) : 0; }
};
PackedBlocks pack_examples(const std::vector<TokenizedExample>& examples, std::int64_t block_length,
                           std::int64_t pad_id);

// Per-epoch order: a permutation of 0..n-1 that depends only on (seed, epoch).
std::vector<std::int64_t> epoch_permutation(std::int64_t n, std::uint64_t seed, std::int64_t epoch);

// Shuffling and batching shared by the finite data sets below.
struct ShuffleConfig {
  std::int64_t batch_size = 32;
  std::uint64_t seed = 0;
  bool shuffle = true;     // false: every epoch in the original order
  bool drop_last = false;  // see the header comment
};

// The indices of batch `step` among n examples (the function behind every finite source).
std::vector<std::int64_t> batch_indices(std::int64_t n, const ShuffleConfig& config,
                                        std::int64_t step);
// Batches per epoch: ceil(n / batch_size), or floor with drop_last.
std::int64_t steps_per_epoch(std::int64_t n, const ShuffleConfig& config);

// batch_indices with the current epoch's permutation cached (O(n) memory), so consecutive steps
// cost O(batch_size). The cache never changes results. Not thread-safe.
class EpochSampler {
 public:
  // InvalidInput for n < 1, batch_size < 1, or drop_last with n < batch_size (no batch at all).
  EpochSampler(std::int64_t n, ShuffleConfig config);
  std::vector<std::int64_t> indices(std::int64_t step);
  std::int64_t steps_per_epoch() const { return steps_per_epoch_; }
  std::int64_t size() const { return n_; }
  const ShuffleConfig& config() const { return config_; }

 private:
  std::int64_t n_;
  ShuffleConfig config_;
  std::int64_t steps_per_epoch_;
  std::int64_t cached_epoch_ = -1;
  std::vector<std::int64_t> order_;
};

struct TokenDatasetConfig {
  ShuffleConfig shuffle;
  std::int64_t pad_id = 0;
  // > 0: pack the examples into blocks of this many positions (pack_examples) instead of padding
  // each batch to its longest example.
  std::int64_t pack_length = 0;
  // > 0 and not packing: pad every batch to exactly this many positions (fixed shapes).
  std::int64_t pad_to = 0;
};

// Language-model batches from tokenized examples (padded per batch, or packed). Holds the
// examples (or the packed blocks); batch() costs one collate of batch_size examples.
class TokenDataset : public BatchSource {
 public:
  TokenDataset(std::vector<TokenizedExample> examples, TokenDatasetConfig config);
  Batch batch(std::int64_t step) override;
  std::int64_t steps_per_epoch() const override;
  // Examples, or blocks when packing.
  std::int64_t size() const;
  const TokenDatasetConfig& config() const { return config_; }

 private:
  std::vector<TokenizedExample> examples_;
  PackedBlocks blocks_;
  TokenDatasetConfig config_;
  EpochSampler sampler_;
};

// Feature-model batches: features [N, F] floating, labels [N] int64 (any device; batches stay
// there). Costs a reference to the two tensors plus an index_select per batch.
class TensorDataset : public BatchSource {
 public:
  TensorDataset(torch::Tensor features, torch::Tensor labels, ShuffleConfig config);
  Batch batch(std::int64_t step) override;
  std::int64_t steps_per_epoch() const override;
  std::int64_t size() const { return features_.size(0); }
  const ShuffleConfig& config() const { return sampler_.config(); }

 private:
  torch::Tensor features_;
  torch::Tensor labels_;
  EpochSampler sampler_;
};

struct NoiseConfig {
  std::int64_t batch_size = 32;
  std::int64_t features = 0;  // F
  double low = -1.0;          // the paper's auxiliary-logit recipe: uniform in [-1, 1]
  double high = 1.0;
  std::uint64_t seed = 0;
  // Nominal epoch length (noise is endless): the trainer's epoch counting only.
  std::int64_t steps_per_epoch = 1;
  torch::Dtype dtype = torch::kFloat32;
  torch::Device device = torch::kCPU;
};

// Uniform noise inputs [batch_size, F] in [low, high] (float64 draws in [low, high), rounded to
// the dtype, which can reach high) for auxiliary-logit KD; targets and masks
// undefined. Drawn on the CPU from a generator seeded by (seed, step), then moved to the device,
// so the values are the same on every device.
class NoiseSource : public BatchSource {
 public:
  explicit NoiseSource(NoiseConfig config);
  Batch batch(std::int64_t step) override;
  std::int64_t steps_per_epoch() const override { return config_.steps_per_epoch; }
  const NoiseConfig& config() const { return config_; }

 private:
  NoiseConfig config_;
};

// Mixes a seed with a stream index (epoch, step) into an independent 64-bit seed (splitmix64).
std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t stream);

}  // namespace libtransfer::distill
