// The one-sample Kolmogorov-Smirnov test against U(0, 1) and the exact tail of its statistic.
#include "libtransfer/stats/ks.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/validate.h"

namespace libtransfer::stats {
namespace {

// Where ks_sf switches method, on n d^2 (scipy's kstwo cut-offs): at and beyond these the
// two-sided tail is 2 P(D+ >= d) to double precision (the two one-sided events barely overlap).
constexpr double kSmirnovFromSmallN = 4.0;  // n <= kSmallN
constexpr double kSmirnovFromLargeN = 2.2;  // n > kSmallN
constexpr std::int64_t kSmallN = 140;

// The Marsaglia-Tsang-Wang matrix has dimension 2k - 1 with k = floor(n d) + 1; beyond this k
// (n above ~10^4 in the bulk of the distribution) the Kolmogorov limit with Stephens' correction
// is used instead (absolute error below ~1e-3 there).
constexpr std::int64_t kKsExactMaxK = 150;

// Above this n, Smirnov's O(n) sum is skipped too and the tail is always Kolmogorov's limit with
// Stephens' correction (its error is far below the KS statistic's own sampling noise there).
constexpr std::int64_t kKsFiniteMaxN = 100000;

// P(D_n < d) by Marsaglia, Tsang & Wang (2003), "Evaluating Kolmogorov's distribution":
// n!/n^n times the (k, k) entry of H^n, with H the (2k-1) x (2k-1) matrix below. The power is
// taken by squaring with a running log scale, so nothing overflows.
double mtw_cdf(double d, std::int64_t n) {
  const double nd = static_cast<double>(n) * d;
  const auto k = static_cast<std::int64_t>(std::floor(nd)) + 1;
  const std::int64_t m = 2 * k - 1;
  const double h = static_cast<double>(k) - nd;
  auto H = torch::zeros({m, m}, torch::kDouble);
  auto a = H.accessor<double, 2>();
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < m; ++j) a[i][j] = (i - j + 1 >= 0) ? 1.0 : 0.0;
  }
  for (std::int64_t i = 0; i < m; ++i) {
    a[i][0] -= std::pow(h, static_cast<double>(i + 1));
    a[m - 1][i] -= std::pow(h, static_cast<double>(m - i));
  }
  if (2.0 * h - 1.0 > 0.0) a[m - 1][0] += std::pow(2.0 * h - 1.0, static_cast<double>(m));
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < m; ++j) {
      if (i - j + 1 > 0)
        a[i][j] *= std::exp(-std::lgamma(static_cast<double>(i - j + 2)));  // / (i-j+1)!
    }
  }
  // result = H^n by binary powering, each factor kept with max |entry| = 1 and a log scale.
  auto normalize = [](torch::Tensor& M, double& log_scale) {
    const double top = M.abs().max().item<double>();
    if (top > 0.0) {
      M.div_(top);
      log_scale += std::log(top);
    }
  };
  torch::Tensor result;
  double result_log = 0.0;
  torch::Tensor base = H;
  double base_log = 0.0;
  for (std::int64_t e = n; e > 0; e >>= 1) {
    if (e & 1) {
      if (result.defined()) {
        result = torch::mm(result, base);
        result_log += base_log;
      } else {
        result = base.clone();
        result_log = base_log;
      }
      normalize(result, result_log);
    }
    if (e > 1) {
      base = torch::mm(base, base);
      base_log *= 2.0;
      normalize(base, base_log);
    }
  }
  const double entry = result[k - 1][k - 1].item<double>();
  if (!(entry > 0.0)) return 0.0;
  const double dn = static_cast<double>(n);
  const double log_cdf = std::log(entry) + result_log + std::lgamma(dn + 1.0) - dn * std::log(dn);
  return std::clamp(std::exp(log_cdf), 0.0, 1.0);
}

}  // namespace

double ks_sf(double d, std::int64_t n) {
  if (n < 1) throw InvalidInput("ks_sf: n must be >= 1, got " + std::to_string(n));
  if (std::isnan(d)) return std::nan("");
  const double dn = static_cast<double>(n);
  if (d <= 0.5 / dn) return 1.0;  // D_n >= 1/(2n) always
  if (d >= 1.0) return 0.0;
  const double root = std::sqrt(dn);
  const double limit = kolmogorov_sf(d * (root + 0.12 + 0.11 / root));
  if (n > kKsFiniteMaxN) return limit;
  const double nd2 = dn * d * d;
  const double smirnov_from = n <= kSmallN ? kSmirnovFromSmallN : kSmirnovFromLargeN;
  if (nd2 >= smirnov_from) return std::min(1.0, 2.0 * smirnov_sf(d, n));
  if (static_cast<std::int64_t>(std::floor(dn * d)) + 1 <= kKsExactMaxK) {
    return std::clamp(1.0 - mtw_cdf(d, n), 0.0, 1.0);
  }
  return limit;
}

KsResult ks_uniform(const torch::Tensor& p) {
  const torch::Tensor x = as_double(p, "p", -1).reshape({-1}).cpu();
  const int64_t n = x.numel();
  TORCH_CHECK_VALUE(n >= 1, "p must hold at least one value, got shape ", shape_string(p));
  TORCH_CHECK_VALUE(x.min().item<double>() >= 0.0 && x.max().item<double>() <= 1.0,
                    "p must lie in [0, 1], got values from ", x.min().item<double>(), " to ",
                    x.max().item<double>());
  std::vector<double> v(x.data_ptr<double>(), x.data_ptr<double>() + n);
  std::sort(v.begin(), v.end());
  double d = 0.0;
  const double dn = static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) {
    d = std::max({d, (i + 1) / dn - v[i], v[i] - i / dn});
  }
  return KsResult{d, ks_sf(d, n)};
}

}  // namespace libtransfer::stats
