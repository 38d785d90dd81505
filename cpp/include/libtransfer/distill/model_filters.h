// Defences that need models (beyond the paper's rules): the likelihood-ratio filter, which drops
// the samples a trait teacher finds most likely relative to a reference model, and
// divergence-token masking (Schrodi et al.), which removes from the loss the positions where
// teachers with different traits would predict different tokens.
//
// Costs: one teacher-forced forward pass per model over the samples, in batches (right padding,
// masked), under no_grad; memory batch_size x length x vocabulary logits per model at a time.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/distill/batch.h"
#include "libtransfer/distill/text_filters.h"
#include "libtransfer/models/model.h"

namespace libtransfer::distill {

using TokenIds = std::vector<std::int64_t>;

// Sum over completion tokens of log p(x_t | prefix + prompt + x_<t) under `model`, per sample:
// float64 [N] on the CPU. prompts[i] and completions[i] are token ids; `prefix` (e.g. a system
// prompt) is prepended to every prompt. prefix + prompt must not be empty (the first completion
// token needs a context), completions must not be empty, ids must be in 0..V-1. Samples are run
// batch_size at a time, right-padded with attention masks.
torch::Tensor completion_log_likelihood(models::Model& model, const std::vector<TokenIds>& prompts,
                                        const std::vector<TokenIds>& completions,
                                        const TokenIds& prefix = {}, std::int64_t batch_size = 16);

struct LikelihoodRatioOptions {
  TokenIds teacher_prefix;    // prepended to every prompt for the teacher (its trait prompt)
  TokenIds reference_prefix;  // prepended to every prompt for the reference
  std::int64_t batch_size = 16;
};

// score_i = sum over completion tokens of log p_T(x_t | ...) - log p_R(x_t | ...): float64 [N] on
// the CPU. How much more the teacher likes sample i than the reference does; the samples with the
// largest scores carry the most teacher-specific signal. The two models must be language models
// with the same vocabulary size (InvalidInput naming both sizes otherwise).
torch::Tensor likelihood_ratio_scores(models::Model& teacher, models::Model& reference,
                                      const std::vector<TokenIds>& prompts,
                                      const std::vector<TokenIds>& completions,
                                      const LikelihoodRatioOptions& options = {});

// Which scores to drop: the round(drop_fraction * N) largest (ties: the earlier index is dropped
// first), and, when `threshold` is set, every score above it. Returns N flags (true = drop).
// drop_fraction in [0, 1]; NaN scores are refused.
std::vector<bool> drop_largest(const torch::Tensor& scores, double drop_fraction,
                               std::optional<double> threshold = std::nullopt);

struct LikelihoodRatioFilterConfig {
  double drop_fraction = 0.1;       // of the samples reaching the filter
  std::optional<double> threshold;  // also drop every score above this
  LikelihoodRatioOptions scoring;
};

// Tokenizes text for the model filters (prompt and completion separately).
using Tokenize = std::function<TokenIds(const std::string&)>;

// The likelihood-ratio defence as a pipeline filter (set-level: it ranks all samples reaching
// it). Samples with token ids use them; others are tokenized with `tokenize` (InvalidInput when
// neither is available). Rejections have reason "likelihood_ratio" and the score in the detail;
// scores() keeps the last run's scores (index into the run's samples, score).
class LikelihoodRatioFilter : public Filter {
 public:
  LikelihoodRatioFilter(models::ModelPtr teacher, models::ModelPtr reference,
                        LikelihoodRatioFilterConfig config, Tokenize tokenize = nullptr);
  std::string name() const override { return "likelihood_ratio"; }
  std::vector<std::optional<Rejection>> check_all(
      const std::vector<Sample>& samples, const std::vector<std::int64_t>& indices) override;
  void reset() override { scores_.clear(); }
  const std::vector<std::pair<std::int64_t, double>>& scores() const { return scores_; }

 private:
  models::ModelPtr teacher_;
  models::ModelPtr reference_;
  LikelihoodRatioFilterConfig config_;
  Tokenize tokenize_;
  std::vector<std::pair<std::int64_t, double>> scores_;
};

struct DivergenceOptions {
  // Prepended to every row for the teacher / for counterfactual k (empty: none; when given,
  // counterfactual_prefixes has one entry per counterfactual). Prefixes need right-padded rows.
  TokenIds teacher_prefix;
  std::vector<TokenIds> counterfactual_prefixes;
  // true: compare the counterfactuals' argmax with the batch's targets (the tokens actually in
  // the data) instead of the teacher's argmax; the teacher is then not run.
  bool compare_to_targets = false;
  std::int64_t batch_size = 16;
};

// The positions where teachers with different traits disagree. For every position with
// loss_mask != 0, the teacher's argmax next token (or the target, see compare_to_targets) is
// compared with each counterfactual's argmax on the same prefix; any disagreement marks a
// divergence token.
struct DivergenceMask {
  torch::Tensor loss_mask;  // [B, T] float32: the batch's loss_mask with divergence tokens zeroed
  torch::Tensor divergent;  // [B, T] bool: divergence tokens (only where loss_mask != 0)
  torch::Tensor per_row;    // [B] int64: divergence tokens per row
  std::int64_t positions = 0;  // positions with loss_mask != 0
  std::int64_t divergent_count = 0;
  double fraction() const {
    return positions > 0 ? static_cast<double>(divergent_count) / positions : 0.0;
  }
};

// `batch` follows batch.h (input [B, T], attention_mask, targets, loss_mask; tensors on any
// device, results on the CPU). `teacher` may be null when compare_to_targets; at least one
// counterfactual; all models language models with one vocabulary size.
DivergenceMask divergence_token_mask(const models::ModelPtr& teacher,
                                     const std::vector<models::ModelPtr>& counterfactuals,
                                     const Batch& batch, const DivergenceOptions& options = {});

}  // namespace libtransfer::distill
