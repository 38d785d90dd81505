// Adam and AdamW for the trainer, written out so that the whole optimizer state (moments and the
// step count) can be saved into a checkpoint and restored bit for bit.
//
// The update is PyTorch's (torch.optim.Adam / AdamW, single-tensor path) operation for operation,
// so a run here and the same run with torch.optim agree to rounding:
//   t += 1; g = grad (+ weight_decay * p for plain Adam's L2 penalty)
//   p *= 1 - lr * weight_decay                        (AdamW's decoupled decay)
//   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Costs two tensors of state per parameter (the parameter's size and dtype) and a few
// element-wise passes per step.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::distill {

// Hyper-parameters. Defaults are torch.optim.AdamW's except weight_decay (0: the paper's Adam).
struct AdamWConfig {
  double lr = 1e-3;  // base learning rate; the schedule scales it per step
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  // true: AdamW (decay applied to the weights, scaled by lr); false: Adam with an L2 penalty
  // added to the gradient (torch.optim.Adam's weight_decay). Identical when weight_decay is 0.
  bool decoupled_weight_decay = true;
};

// Throws InvalidInput naming the field for lr < 0, betas outside [0, 1), eps <= 0 or
// weight_decay < 0.
void validate(const AdamWConfig& config);

// Adam(W) over a fixed list of named parameters (updated in place under no_grad).
class AdamW {
 public:
  AdamW(models::NamedTensors parameters, AdamWConfig config);

  // One update at learning rate `lr` (the schedule's value for this step) from the parameters'
  // .grad; parameters without a gradient are skipped (their moments stay as they are, as in torch).
  void step(double lr);
  // Drops every gradient (sets .grad to an undefined tensor, like zero_grad(set_to_none=True)).
  void zero_grad();

  // Completed updates (Adam's t).
  std::int64_t step_count() const { return step_count_; }
  const AdamWConfig& config() const { return config_; }
  const models::NamedTensors& parameters() const { return parameters_; }

  // The moments as named tensors "<param>.exp_avg" and "<param>.exp_avg_sq" (not copies).
  // Moments of parameters that never had a gradient are zeros.
  models::NamedTensors state() const;
  // Restores moments saved by state() and the step count. InvalidInput naming the tensor for a
  // missing tensor or a shape that differs from the parameter's.
  void load_state(const models::NamedTensors& state, std::int64_t step_count);

 private:
  models::NamedTensors parameters_;
  AdamWConfig config_;
  std::vector<torch::Tensor> exp_avg_;
  std::vector<torch::Tensor> exp_avg_sq_;
  std::int64_t step_count_ = 0;
};

}  // namespace libtransfer::distill
