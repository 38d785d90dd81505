// One-sample t tests column by column (see t_test.h).
#include "libtransfer/stats/t_test.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/permutation.h"
#include "libtransfer/stats/validate.h"

namespace libtransfer::stats {

TTestResult one_sample_t(const torch::Tensor& diffs) {
  const torch::Tensor x = as_double(diffs, "diffs", 2);
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  TORCH_CHECK_VALUE(n >= 2, "diffs needs at least 2 rows for a t test, got shape ",
                    shape_string(diffs));
  const torch::Tensor mean = x.mean(0);
  // Two-pass sample variance (n - 1 in the denominator).
  const torch::Tensor var = (x - mean).pow(2).sum(0) / static_cast<double>(n - 1);
  const torch::Tensor mean_square = (x * x).mean(0);
  const torch::Tensor flat = var <= mean_square * kZeroVarianceRelativeTolerance;
  const torch::Tensor t =
      (mean / (var / static_cast<double>(n)).sqrt()).masked_fill(flat, 0.0).cpu().contiguous();
  auto p = torch::empty({d}, torch::kDouble);
  auto log_p = torch::empty({d}, torch::kDouble);
  const double* tv = t.data_ptr<double>();
  double* pv = p.data_ptr<double>();
  double* lv = log_p.data_ptr<double>();
  const double df = static_cast<double>(n - 1);
  for (int64_t j = 0; j < d; ++j) {
    // Two-sided: 2 P(T >= |t|), at most 1.
    lv[j] = std::min(0.0, std::log(2.0) + t_logsf(std::fabs(tv[j]), df));
    pv[j] = std::exp(lv[j]);
  }
  return TTestResult{t, p, log_p};
}

}  // namespace libtransfer::stats
