// Training losses: cross-entropy on completion tokens and logit distillation (forward KL,
// reverse KL, generalized JSD, top-k with a tail bucket, a chosen subset of logits). Every loss
// is differentiable in the student's logits only (the teacher is treated as a constant) and is
// computed in float32 or wider whatever the logits' dtype.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace libtransfer::distill {

enum class Divergence {
  kForwardKL,  // KL(p_T || p_S): mass-covering, the classic Hinton KD
  kReverseKL,  // KL(p_S || p_T): mode-seeking
  kJSD,        // generalized JSD(beta) = beta KL(p_T || m) + (1 - beta) KL(p_S || m),
               // m = beta p_T + (1 - beta) p_S, beta in (0, 1); 0.5 is the symmetric JSD
};

// Parses "forward_kl" | "reverse_kl" | "jsd" (InvalidInput listing the choices otherwise).
Divergence parse_divergence(const std::string& name);
std::string to_string(Divergence d);

struct KDConfig {
  Divergence divergence = Divergence::kForwardKL;
  // Applied to both teacher and student logits (z / tau); the loss is multiplied by tau^2 so that
  // gradient magnitudes do not shrink with tau (Hinton et al.). Must be > 0.
  double temperature = 1.0;
  double beta = 0.5;  // JSD only
  // > 0: distill only the teacher's top-k tokens (chosen at temperature tau from the full
  // teacher logits) plus one bucket holding the remaining mass, for both distributions.
  std::int64_t top_k = 0;
  // Non-empty: both distributions are the softmax over only these logit indices (auxiliary-logit
  // KD; or KD restricted to allowed tokens, renormalized over them). Indices must be unique and
  // in range. Applied before top_k.
  std::vector<std::int64_t> logit_subset;
};

// Mean cross-entropy of logits [..., V] against targets [...] (int64) over positions where
// mask [...] is non-zero (mask undefined: all positions). InvalidInput when the mask selects
// nothing or targets are out of range.
torch::Tensor completion_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                       const torch::Tensor& mask = {});

// tau^2 * D(p_T^tau, p_S^tau) per position, averaged over positions where mask is non-zero.
// student_logits and teacher_logits: same shape [..., V] (InvalidInput naming both shapes
// otherwise; a vocabulary mismatch is reported as such).
torch::Tensor kd_loss(const torch::Tensor& student_logits, const torch::Tensor& teacher_logits,
                      const torch::Tensor& mask, const KDConfig& config);

// KD from offline top-k teacher log-probabilities (recorded at temperature 1): the k tokens plus a
// tail bucket of the remaining mass, for teacher and student alike. topk_ids [..., k] int64,
// topk_logprobs [..., k]. config.temperature must be 1 (a tempered teacher cannot be recovered
// from its top-k at temperature 1; InvalidInput says so); top_k and logit_subset must be unset.
torch::Tensor topk_kd_loss(const torch::Tensor& student_logits, const torch::Tensor& topk_ids,
                           const torch::Tensor& topk_logprobs, const torch::Tensor& mask,
                           const KDConfig& config);

}  // namespace libtransfer::distill
