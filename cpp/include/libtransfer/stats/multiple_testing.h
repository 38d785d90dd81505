// Corrections and combinations of many p-values: Benjamini-Hochberg (false discovery rate) and
// Fisher's method (one p-value from several independent ones, computed in log space).
//
// Each is one sort or one sum over the p-values: O(m log m) and O(m); results are float64.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace libtransfer::stats {

// The default false discovery rate of the per-token tests (DESIGN.md section 3).
inline constexpr double kDefaultFdr = 0.05;

// Benjamini-Hochberg's step-up procedure over m p-values.
// rejected: bool, same shape as p; adjusted: float64 BH-adjusted p-values, monotone, <= 1.
struct BhResult {
  torch::Tensor rejected;
  torch::Tensor adjusted;
};

// Rejects the k smallest p-values, k = max{i : p_(i) <= i q / m}. adjusted_(i) =
// min(1, min_{j >= i} m p_(j) / j), so rejected == (adjusted <= q) up to rounding at equality.
// p in [0, 1] (NaN or outside -> ValueError), any shape; q in (0, 1].
BhResult benjamini_hochberg(const torch::Tensor& p, double q = kDefaultFdr);

// Fisher's combination of L independent p-values: X = -2 sum log p ~ chi2(2L) under H0.
// log_p is exact in log space, so it stays finite where p_value underflows to 0.
struct FisherResult {
  double statistic = 0.0;  // X
  double p_value = 1.0;    // P(chi2_{2L} >= X)
  double log_p = 0.0;      // log of p_value, finite for tiny p
  int64_t df = 0;          // 2L
};

// p: L >= 1 values in [0, 1] (p = 0 gives X = inf, p_value = 0, log_p = -inf).
FisherResult fisher_combine(const torch::Tensor& p);
// The same from log p-values (each <= 0), for inputs that are already tiny.
FisherResult fisher_combine_log(const torch::Tensor& log_p);

}  // namespace libtransfer::stats
