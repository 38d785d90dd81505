// One-sample Student t tests, column by column: is the mean of each column of diffs [n, d] zero?
// The per-token test of fingerprints (one_sample_t on per-sequence differences, then BH).
//
// Two passes over diffs (mean, variance) on its device, then d Student-t tails on the CPU.
#pragma once

#include <torch/types.h>

namespace libtransfer::stats {

// t [d], two-sided p [d] and log p [d] (finite where p underflows); float64 on the CPU.
struct TTestResult {
  torch::Tensor t;
  torch::Tensor p;
  torch::Tensor log_p;
};

// t_j = mean_j / (sd_j / sqrt(n)), df = n - 1, p_j = 2 P(T >= |t_j|). n >= 2. A column whose
// variance is below kZeroVarianceRelativeTolerance of its mean square gets t = 0, p = 1 (no
// spread to test against; the same rule as the sign-flip test's maxt statistic).
TTestResult one_sample_t(const torch::Tensor& diffs);

}  // namespace libtransfer::stats
