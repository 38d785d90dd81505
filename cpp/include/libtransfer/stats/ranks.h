// Ranks and correlations: average ranks with ties (scipy's rankdata "average"), Pearson and
// Spearman correlation of two vectors.
//
// O(d log d) for the ranks (one sort), O(d) for the correlations; float64 throughout.
#pragma once

#include <torch/types.h>

namespace libtransfer::stats {

// Ranks 1..d of a [d] (float64 [d] on the CPU); tied values share the mean of their ranks.
torch::Tensor rankdata(const torch::Tensor& a);

// Pearson correlation = cosine of the centered vectors. NaN when either vector is constant.
double pearson(const torch::Tensor& a, const torch::Tensor& b);

// Spearman's rho: Pearson correlation of average ranks. NaN when either vector is constant.
double spearman(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace libtransfer::stats
