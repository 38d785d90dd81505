// Fingerprints from top-k log-probabilities with tail mass: what hosted APIs return instead of
// full logits. Exact log-ratios where a token is in both top-k lists, bounds where it is in one.
//
// Memory O(V) (five float64/int64 arrays of the vocabulary size); an update costs O(N k log k)
// on the CPU ([N, k] inputs on other devices are copied to the CPU: they are small).
#pragma once

#include <torch/types.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <unordered_set>
#include <vector>

namespace libtransfer::fingerprint {

// Tail masses below this are raised to it before taking their log: top-k probabilities that
// round to a total of 1 would otherwise give log(0) = -inf bounds (float32 logprobs carry
// ~1e-7 relative error, so a smaller tail is not resolvable anyway).
inline constexpr double kMinTailMass = 1e-12;

// The finalized top-k fingerprint (float64 / int64 tensors on the CPU).
// Bias: a token seen in one list only gets delta computed with the other model's log-prob
// replaced by its upper bound b = min(k-th log-prob, log tail). For a teacher-only token the
// bounded delta lT - b_R is <= the true delta; for a reference-only token b_T - lR is >= the true
// delta. Both shrink |delta| toward 0 (the true shifts are at least as large), so
// mean_log_ratio understates shifts of tokens that often fall outside one model's top-k;
// mean_log_ratio_exact (exact entries only) is unbiased per entry but selected on visibility.
struct TopKFingerprint {
  int64_t vocab_size = 0;
  int64_t k = 0;
  int64_t positions = 0;
  int64_t sequences = 0;
  torch::Tensor mean_log_ratio;        // [V] over exact + bounded entries; NaN if never seen
  torch::Tensor mean_log_ratio_exact;  // [V] over exact entries only; NaN if none
  torch::Tensor counts_exact;          // [V] int64: positions where the token was in both lists
  torch::Tensor counts_bounded;        // [V] int64: positions where it was in one list only
  double mean_tail_teacher = 0.0;      // mean over positions of 1 - sum exp(top-k logprobs)
  double mean_tail_reference = 0.0;
};

// Streams top-k log-probs of a teacher and a reference scored on the same positions.
// Not thread-safe; merge() combines accumulators fed from different shards.
class TopKAccumulator {
 public:
  TopKAccumulator(int64_t vocab_size, int64_t k);

  // ids int64 (any integer dtype) and logprobs (floating) of shape [N, k] or [B, T, k]; each
  // row's ids distinct and in [0, V), logprobs finite and <= 0. mask: bool or 0/1 of shape [N]
  // or [B, T]. sequence_ids: int64 [N] (2-D input) or [B] (3-D); default: each row of a 2-D
  // input and each batch row of a 3-D input is a new sequence numbered after the previous ones.
  // Every row is validated before anything is accumulated (a failed update changes nothing).
  void update(const torch::Tensor& teacher_ids, const torch::Tensor& teacher_logprobs,
              const torch::Tensor& reference_ids, const torch::Tensor& reference_logprobs,
              const c10::optional<torch::Tensor>& mask = c10::nullopt,
              const c10::optional<torch::Tensor>& sequence_ids = c10::nullopt);

  // Adds other's sums (same vocab_size and k, ValueError otherwise); sequences merge by id.
  void merge(const TopKAccumulator& other);

  // The means; ValueError when no position was scored.
  TopKFingerprint finalize() const;

  int64_t vocab_size() const { return vocab_size_; }
  int64_t k() const { return k_; }
  int64_t positions() const { return positions_; }
  int64_t sequences() const { return static_cast<int64_t>(sequence_set_.size()); }

 private:
  int64_t vocab_size_;
  int64_t k_;
  int64_t positions_ = 0;
  int64_t next_sequence_ = 0;
  double sum_tail_teacher_ = 0.0;
  double sum_tail_reference_ = 0.0;
  std::vector<double> sum_delta_;
  std::vector<double> sum_delta_exact_;
  std::vector<int64_t> counts_exact_;
  std::vector<int64_t> counts_bounded_;
  std::unordered_set<int64_t> sequence_set_;
};

}  // namespace libtransfer::fingerprint
