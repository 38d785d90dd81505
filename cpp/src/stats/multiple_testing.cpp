// Benjamini-Hochberg and Fisher's combination (see multiple_testing.h).
#include "libtransfer/stats/multiple_testing.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/validate.h"

namespace libtransfer::stats {
namespace {

// p-values as a float64 CPU vector, validated: no NaN, each in [0, 1].
torch::Tensor checked_p_values(const torch::Tensor& p, const char* name) {
  TORCH_CHECK_VALUE(p.defined(), name, " must be a tensor");
  torch::Tensor x = as_double(p, name, -1, /*allow_nonfinite=*/true).reshape({-1}).cpu();
  if (x.numel() == 0) return x;
  TORCH_CHECK_VALUE(!x.isnan().any().item<bool>(), name, " must not contain NaN");
  const double lo = x.min().item<double>();
  const double hi = x.max().item<double>();
  TORCH_CHECK_VALUE(lo >= 0.0 && hi <= 1.0, name, " must lie in [0, 1], got values from ", lo,
                    " to ", hi);
  return x;
}

FisherResult fisher_from_statistic(double statistic, int64_t count) {
  FisherResult out;
  out.statistic = statistic;
  out.df = 2 * count;
  if (std::isinf(statistic)) {
    out.log_p = -std::numeric_limits<double>::infinity();
    out.p_value = 0.0;
    return out;
  }
  out.log_p = chi2_logsf(statistic, static_cast<double>(out.df));
  out.p_value = std::exp(out.log_p);
  return out;
}

}  // namespace

BhResult benjamini_hochberg(const torch::Tensor& p, double q) {
  TORCH_CHECK_VALUE(q > 0.0 && q <= 1.0, "q must lie in (0, 1], got ", q);
  const torch::Tensor x = checked_p_values(p, "p");
  const int64_t m = x.numel();
  const double* v = x.data_ptr<double>();
  std::vector<int64_t> order(static_cast<std::size_t>(m));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [v](int64_t a, int64_t b) { return v[a] < v[b]; });

  auto adjusted = torch::empty({m}, torch::kDouble);
  auto rejected = torch::zeros({m}, torch::kBool);
  double* adj = adjusted.data_ptr<double>();
  bool* rej = rejected.data_ptr<bool>();
  // Step-up: the largest rank i (1-based) with p_(i) <= i q / m; everything up to it is rejected.
  int64_t last = 0;
  for (int64_t i = 1; i <= m; ++i) {
    if (v[order[i - 1]] <= static_cast<double>(i) * q / static_cast<double>(m)) last = i;
  }
  double running = 1.0;
  for (int64_t i = m; i >= 1; --i) {
    const int64_t at = order[i - 1];
    running = std::min(running, v[at] * static_cast<double>(m) / static_cast<double>(i));
    adj[at] = running;
    rej[at] = i <= last;
  }
  const auto device = p.device();
  return BhResult{rejected.reshape(p.sizes()).to(device), adjusted.reshape(p.sizes()).to(device)};
}

FisherResult fisher_combine(const torch::Tensor& p) {
  const torch::Tensor x = checked_p_values(p, "p");
  TORCH_CHECK_VALUE(x.numel() >= 1, "p must hold at least one p-value, got shape ",
                    shape_string(p));
  return fisher_from_statistic(-2.0 * x.log().sum().item<double>(), x.numel());
}

FisherResult fisher_combine_log(const torch::Tensor& log_p) {
  TORCH_CHECK_VALUE(log_p.defined(), "log_p must be a tensor");
  const torch::Tensor x = as_double(log_p, "log_p", -1, /*allow_nonfinite=*/true).reshape({-1});
  TORCH_CHECK_VALUE(x.numel() >= 1, "log_p must hold at least one value, got shape ",
                    shape_string(log_p));
  TORCH_CHECK_VALUE(!x.isnan().any().item<bool>(), "log_p must not contain NaN");
  TORCH_CHECK_VALUE(x.max().item<double>() <= 0.0, "log_p must be <= 0, got a maximum of ",
                    x.max().item<double>());
  return fisher_from_statistic(-2.0 * x.sum().item<double>(), x.numel());
}

}  // namespace libtransfer::stats
