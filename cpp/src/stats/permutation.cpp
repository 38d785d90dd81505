// Sign-flip and generic permutation p-values (see permutation.h).
#include "libtransfer/stats/permutation.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "libtransfer/stats/validate.h"

namespace libtransfer::stats {
namespace {

// Doubles per batch of sign patterns or flipped means (32 MiB): bounds the extra memory.
constexpr int64_t kBatchElements = int64_t{1} << 22;

// Exact enumeration of 2^n sign patterns needs n below this (the codes are int64 bit masks).
constexpr int64_t kMaxExactRows = 62;

// The statistic of each row of flipped means M [b, d]; ss [d] = column sums of squares (fixed
// under sign flips), n rows.
torch::Tensor statistic_of(const torch::Tensor& M, const torch::Tensor& ss, int64_t n,
                           SignFlipStatistic statistic) {
  if (statistic == SignFlipStatistic::kSumSq) return (M * M).sum(1);
  const double dn = static_cast<double>(n);
  // Sample variance of the flipped column: (sum x^2 - n mean^2) / (n - 1).
  const torch::Tensor var = ((ss - dn * M * M) / (dn - 1.0)).clamp_min(0.0);
  const torch::Tensor flat = var <= (ss / dn) * kZeroVarianceRelativeTolerance;
  const torch::Tensor t = (M * std::sqrt(dn) / var.sqrt()).masked_fill(flat, 0.0);
  return t.abs().amax(1);
}

// Counts the rows of signs [b, n] whose statistic reaches the threshold.
int64_t count_at_least(const torch::Tensor& signs, const torch::Tensor& x, const torch::Tensor& ss,
                       SignFlipStatistic statistic, double threshold) {
  const int64_t n = x.size(0);
  const torch::Tensor M = torch::mm(signs.to(x.device()), x) / static_cast<double>(n);
  return (statistic_of(M, ss, n, statistic) >= threshold).sum().item<int64_t>();
}

}  // namespace

SignFlipStatistic parse_sign_flip_statistic(const std::string& name) {
  if (name == "sumsq") return SignFlipStatistic::kSumSq;
  if (name == "maxt") return SignFlipStatistic::kMaxT;
  TORCH_CHECK_VALUE(false, "statistic must be \"sumsq\" or \"maxt\", got \"", name, "\"");
  return SignFlipStatistic::kSumSq;
}

PermutationResult sign_flip_test(const torch::Tensor& diffs, SignFlipStatistic statistic,
                                 int64_t permutations, uint64_t seed) {
  const torch::Tensor x = as_double(diffs, "diffs", 2);
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  TORCH_CHECK_VALUE(n >= 1 && d >= 1, "diffs must have at least one row and one column, got shape ",
                    shape_string(diffs));
  TORCH_CHECK_VALUE(statistic != SignFlipStatistic::kMaxT || n >= 2,
                    "the maxt statistic needs at least 2 rows in diffs, got shape ",
                    shape_string(diffs));
  TORCH_CHECK_VALUE(permutations >= 1, "permutations must be >= 1, got ", permutations);

  const torch::Tensor ss = (x * x).sum(0);
  const auto cpu_double = torch::TensorOptions().dtype(torch::kDouble);
  // The observed statistic through the same code path as the flipped ones (identity signs).
  const torch::Tensor ones = torch::ones({1, n}, cpu_double);
  const double observed =
      statistic_of(torch::mm(ones.to(x.device()), x) / static_cast<double>(n), ss, n, statistic)
          .item<double>();
  const double threshold = observed - kTieRelativeTolerance * std::fabs(observed);
  const int64_t batch = std::max<int64_t>(1, kBatchElements / std::max(n, d));

  PermutationResult out;
  out.statistic = observed;
  const bool exact = n < kMaxExactRows && (int64_t{1} << n) - 1 <= permutations;
  if (exact) {
    const int64_t total = int64_t{1} << n;
    const torch::Tensor bits = torch::arange(n, torch::kLong);
    int64_t count = 0;
    for (int64_t start = 0; start < total; start += batch) {
      const int64_t b = std::min(batch, total - start);
      const torch::Tensor codes = torch::arange(start, start + b, torch::kLong).unsqueeze(1);
      // Bit i of the code set -> row i flipped.
      const torch::Tensor signs =
          1.0 - 2.0 * codes.bitwise_right_shift(bits).bitwise_and(1).to(torch::kDouble);
      count += count_at_least(signs, x, ss, statistic, threshold);
    }
    out.permutations = total;
    out.exact = true;
    out.p_value = static_cast<double>(count) / static_cast<double>(total);
    return out;
  }
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  int64_t count = 0;
  for (int64_t done = 0; done < permutations; done += batch) {
    const int64_t b = std::min(batch, permutations - done);
    const torch::Tensor signs =
        torch::randint(2, {b, n}, generator, cpu_double).mul_(2.0).sub_(1.0);
    count += count_at_least(signs, x, ss, statistic, threshold);
  }
  out.permutations = permutations;
  out.p_value = static_cast<double>(1 + count) / static_cast<double>(permutations + 1);
  return out;
}

double permutation_p_value(double observed, const torch::Tensor& null_samples, bool greater) {
  TORCH_CHECK_VALUE(!std::isnan(observed), "observed must not be NaN");
  const torch::Tensor null = as_double(null_samples, "null_samples", 1, true);
  TORCH_CHECK_VALUE(null.numel() >= 1, "null_samples must hold at least one value");
  TORCH_CHECK_VALUE(!null.isnan().any().item<bool>(), "null_samples must not contain NaN");
  const double slack = kTieRelativeTolerance * std::fabs(observed);
  const int64_t count = greater ? (null >= observed - slack).sum().item<int64_t>()
                                : (null <= observed + slack).sum().item<int64_t>();
  return static_cast<double>(1 + count) / static_cast<double>(null.numel() + 1);
}

}  // namespace libtransfer::stats
