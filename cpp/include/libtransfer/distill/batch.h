// One training batch and the sources that produce them, shared by the datasets, the losses and
// the trainer. A source is a pure function of the step index (and its seed), which is what makes
// resuming from a checkpoint reproduce an uninterrupted run exactly.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>

namespace libtransfer::distill {

// Conventions for language models: input [B, T] int64 token ids, attention_mask [B, T] int64
// (1 real, 0 padding); targets [B, T] int64 where targets[b, t] is the token that should follow
// position t (already shifted; any value where loss_mask is 0); loss_mask [B, T] float (1 where
// the loss counts: completion tokens). For feature models: input [B, F] floating, targets [B]
// int64 class labels, attention_mask and loss_mask undefined.
// Optional teacher signals for offline distillation: teacher_logits [B, T, V] or [B, C];
// teacher_topk_ids / teacher_topk_logprobs [B, T, k] (log-probabilities at temperature 1).
struct Batch {
  torch::Tensor input;
  torch::Tensor attention_mask;
  torch::Tensor targets;
  torch::Tensor loss_mask;
  torch::Tensor teacher_logits;
  torch::Tensor teacher_topk_ids;
  torch::Tensor teacher_topk_logprobs;
  std::int64_t size() const { return input.defined() ? input.size(0) : 0; }
  // Every defined tensor moved to `device` (dtypes unchanged).
  Batch to(torch::Device device) const;
};

// Produces the batch of a given step. batch(step) must depend only on the source's
// configuration (seed included) and `step`, never on earlier calls.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch batch(std::int64_t step) = 0;
  // Batches per pass over the data (epochs = steps / steps_per_epoch); sources without a finite
  // dataset (noise) return their configured nominal value.
  virtual std::int64_t steps_per_epoch() const = 0;
};

using BatchSourcePtr = std::shared_ptr<BatchSource>;

}  // namespace libtransfer::distill
