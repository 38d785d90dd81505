// Permutation tests: the sign-flip test of symmetry around zero (rows are the independent units,
// e.g. sequences) and the generic permutation p-value of an observed statistic against a null.
//
// sign_flip_test costs O(B n d) flops as batched matmuls (signs [b, n] @ diffs [n, d]) with
// O(b (n + d)) extra memory per batch of b sign patterns; exact enumeration when 2^n <= B + 1.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>

namespace libtransfer::stats {

// Default number of random sign patterns / permutations: p-values resolve down to 1e-4.
inline constexpr int64_t kDefaultPermutations = 9999;

// Relative tolerance under which a permuted statistic counts as a tie with the observed one
// (so rounding differences between mathematically equal statistics never lower a p-value).
inline constexpr double kTieRelativeTolerance = 1e-12;

// A column whose sample variance is below this fraction of its mean square has no usable spread:
// its t statistic is defined as 0 (rounding of the one-pass variance is ~1e-16 of the mean square).
inline constexpr double kZeroVarianceRelativeTolerance = 1e-12;

// The statistic of the sign-flip test. kSumSq: ||mean over rows||^2 (power against a shift
// spread over many columns). kMaxT: max_j |t_j| of one-sample t statistics (a few large shifts).
enum class SignFlipStatistic { kSumSq, kMaxT };

// "sumsq" or "maxt" (ValueError otherwise).
SignFlipStatistic parse_sign_flip_statistic(const std::string& name);

// The outcome of a permutation test. permutations is B for the random test, 2^n when exact.
struct PermutationResult {
  double statistic = 0.0;
  double p_value = 1.0;
  int64_t permutations = 0;
  bool exact = false;
};

// H0: the rows of diffs [n, d] are independent and each is symmetric around 0. Random test:
// p = (1 + #{Q* >= Q}) / (B + 1) over B random sign patterns (seeded CPU generator). When
// 2^n <= B + 1 every sign pattern is enumerated: p = #{Q* >= Q} / 2^n (identity included).
// kMaxT needs n >= 2. Works on any device (signs are drawn on the CPU, so results do not
// depend on the device).
PermutationResult sign_flip_test(const torch::Tensor& diffs,
                                 SignFlipStatistic statistic = SignFlipStatistic::kSumSq,
                                 int64_t permutations = kDefaultPermutations, uint64_t seed = 0);

// (1 + #{null >= observed}) / (B + 1) (greater) or with <= (not greater); null: [B], B >= 1.
double permutation_p_value(double observed, const torch::Tensor& null_samples, bool greater = true);

}  // namespace libtransfer::stats
