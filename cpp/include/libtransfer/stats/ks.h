// The one-sample Kolmogorov-Smirnov test against U(0, 1): are these p-values uniform? Used by
// the calibration tests of every pillar.
//
// One sort (O(n log n)) for the statistic; the tail ks_sf costs at most a few matrix powers of a
// matrix of dimension <= 2 kKsExactMaxK - 1 (milliseconds).
#pragma once

#include <torch/types.h>

namespace libtransfer::stats {

// D = sup |F_n(x) - x| and P(D_n >= D) (two-sided, see ks_sf in distributions.h).
struct KsResult {
  double statistic = 0.0;
  double p_value = 1.0;
};

// p: n >= 1 values in [0, 1] (NaN or outside -> ValueError), any shape.
KsResult ks_uniform(const torch::Tensor& p);

}  // namespace libtransfer::stats
