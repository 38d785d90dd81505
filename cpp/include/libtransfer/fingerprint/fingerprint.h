// The finalized logit fingerprint of a teacher against a reference (DESIGN.md section 3): means and
// standard errors of per-token log-ratios, the gradient fingerprint, KL divergences, the mass shift
// onto a token subset and the centered subset fingerprint, overall and per sequence.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <utility>

namespace libtransfer::fingerprint {

// What Accumulator::finalize() returns: plain data, every tensor float64 (ids int64) on the CPU.
// Costs O(V + #sequences x |S|) memory; built once from the accumulator's sums.
//
// Over the n scored positions c, with l_T = log_softmax(teacher / temperature), l_R likewise,
// delta_c = l_T - l_R (over the vocabulary), p = exp(l):
struct Fingerprint {
  std::int64_t vocab_size = 0;
  std::int64_t positions = 0;          // n, the scored positions that were accumulated
  std::int64_t sequences = 0;          // distinct sequence ids among them
  std::int64_t skipped_nonfinite = 0;  // scored rows dropped for a non-finite logit
  double temperature = 1.0;

  torch::Tensor mean_log_ratio;  // [V] mean of delta_c
  // [V] sample standard deviation of delta_c over positions / sqrt(n); NaN when n < 2. Positions
  // within a sequence are correlated, so this standard error is optimistic; the sequence-level
  // tests (over sequence_centered) are the calibrated ones.
  torch::Tensor stderr_log_ratio;
  torch::Tensor grad;                 // [V] mean of p_T - p_R (the "gradient fingerprint")
  double kl_teacher_reference = 0.0;  // mean over positions of KL(p_T || p_R), nats
  double kl_reference_teacher = 0.0;  // mean over positions of KL(p_R || p_T), nats

  torch::Tensor subset;    // [S] int64 token ids of the subset (sorted), empty without one
  torch::Tensor centered;  // [S] mean of F_c = delta_c[S] - mean(delta_c[S])
  // Mean and standard error of m_c = logsumexp_S l_T - logsumexp_S l_R (NaN without a subset;
  // the standard error is NaN when n < 2 and optimistic for the reason above).
  double mass_shift = 0.0;
  double mass_shift_stderr = 0.0;

  torch::Tensor sequence_ids;       // [n_seq] int64, sorted
  torch::Tensor sequence_counts;    // [n_seq] int64 scored positions per sequence
  torch::Tensor sequence_centered;  // [n_seq, S] per-sequence mean of F_c ([0, S] if not kept)

  // The k most shifted tokens of a field: "mean_log_ratio" (default), "grad" or "centered" (whose
  // ids are vocabulary ids from the subset). largest=false gives the most negative. k larger than
  // the field is clamped; ties keep the smaller id first. Returns (ids int64 [k], values [k]).
  std::pair<torch::Tensor, torch::Tensor> top_tokens(std::int64_t k,
                                                     const std::string& field = "mean_log_ratio",
                                                     bool largest = true) const;
};

}  // namespace libtransfer::fingerprint
