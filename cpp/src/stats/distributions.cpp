// Tail probabilities (see distributions.h). Boost.Math where doubles suffice, log-space series
// and continued fractions where the tail underflows.
#include "libtransfer/stats/distributions.h"

#include <torch/torch.h>

#include <algorithm>
#include <boost/math/distributions/chi_squared.hpp>
#include <boost/math/distributions/normal.hpp>
#include <boost/math/distributions/students_t.hpp>
#include <boost/math/special_functions/beta.hpp>
#include <boost/math/special_functions/gamma.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "libtransfer/errors.h"

namespace libtransfer::stats {
namespace {

namespace bm = boost::math;

// Return NaN instead of throwing from inside Boost; arguments are validated before the call.
using Policy = bm::policies::policy<bm::policies::domain_error<bm::policies::errno_on_error>,
                                    bm::policies::overflow_error<bm::policies::errno_on_error>,
                                    bm::policies::evaluation_error<bm::policies::errno_on_error>>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Convergence of the series and continued fractions below: relative change of one term.
constexpr double kSeriesEpsilon = 1e-16;
constexpr int kMaxIterations = 100000;

// Beyond this x the normal tail uses its asymptotic series; the first omitted term is
// 945 / x^10 < 2e-12 relative there, and boost's erfc is still exact below it.
constexpr double kNormalAsymptoticFrom = 30.0;

void check_df(double df, const char* function) {
  if (!(df > 0.0) || std::isinf(df)) {
    throw InvalidInput(std::string(function) + ": degrees of freedom must be finite and > 0, got " +
                       std::to_string(df));
  }
}

// log Q(a, y), Q the regularized upper incomplete gamma function, from the continued fraction
// (Numerical Recipes' gcf, modified Lentz); converges fast for y > a + 1.
double log_upper_gamma_cf(double a, double y) {
  constexpr double kTiny = 1e-300;
  double b = y + 1.0 - a;
  double c = 1.0 / kTiny;
  double d = 1.0 / b;
  double h = d;
  for (int i = 1; i < kMaxIterations; ++i) {
    const double an = -i * (i - a);
    b += 2.0;
    d = an * d + b;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = b + an / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1.0 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1.0) < kSeriesEpsilon) break;
  }
  return -y + a * std::log(y) - std::lgamma(a) + std::log(h);
}

}  // namespace

double normal_sf(double x) {
  if (std::isnan(x)) return kNaN;
  if (std::isinf(x)) return x > 0 ? 0.0 : 1.0;
  return bm::cdf(bm::complement(bm::normal_distribution<double, Policy>(), x));
}

double normal_logsf(double x) {
  if (std::isnan(x)) return kNaN;
  if (x < kNormalAsymptoticFrom) return std::log(normal_sf(x));
  if (std::isinf(x)) return -kInf;
  // Mills ratio: sf = phi(x)/x (1 - 1/x^2 + 3/x^4 - 15/x^6 + 105/x^8 - ...).
  const double z = 1.0 / (x * x);
  const double series = 1.0 - z * (1.0 - 3.0 * z * (1.0 - 5.0 * z * (1.0 - 7.0 * z)));
  return -0.5 * x * x - 0.5 * std::log(2.0 * M_PI) - std::log(x) + std::log(series);
}

double t_sf(double x, double df) {
  check_df(df, "t_sf");
  if (std::isnan(x)) return kNaN;
  if (std::isinf(x)) return x > 0 ? 0.0 : 1.0;
  return bm::cdf(bm::complement(bm::students_t_distribution<double, Policy>(df), x));
}

double t_logsf(double x, double df) {
  const double sf = t_sf(x, df);
  if (std::isnan(sf) || sf >= kLogTailSwitch) return std::log(sf);
  if (std::isinf(x)) return -kInf;
  // sf = I_z(a, b) / 2 with z = df / (df + x^2), a = df/2, b = 1/2, and
  // I_z(a, b) = z^a (1 - z)^b / (a B(a, b)) * 2F1(a + b, 1; a + 1; z) (a series in z, here tiny).
  const double a = 0.5 * df;
  const double b = 0.5;
  // log z and log(1 - z) without forming x^2 (which overflows for |x| > 1e154).
  const double log_x2 = 2.0 * std::log(std::fabs(x));
  const double log1p_ratio = std::log1p(df * std::exp(-log_x2));  // log(1 + df / x^2)
  const double log_z = std::log(df) - log_x2 - log1p_ratio;
  const double log_1mz = -log1p_ratio;
  const double z = std::exp(log_z);
  double term = 1.0;
  double sum = 1.0;
  for (int n = 0; n < kMaxIterations; ++n) {
    term *= (a + b + n) / (a + 1.0 + n) * z;
    sum += term;
    if (term < kSeriesEpsilon * sum) break;
  }
  const double log_beta = std::lgamma(a) + std::lgamma(b) - std::lgamma(a + b);
  return a * log_z + b * log_1mz - std::log(a) - log_beta + std::log(sum) - std::log(2.0);
}

double chi2_sf(double x, double df) {
  check_df(df, "chi2_sf");
  if (std::isnan(x)) return kNaN;
  if (x <= 0.0) return 1.0;
  if (std::isinf(x)) return 0.0;
  return bm::cdf(bm::complement(bm::chi_squared_distribution<double, Policy>(df), x));
}

double chi2_logsf(double x, double df) {
  const double sf = chi2_sf(x, df);
  if (std::isnan(sf) || sf >= kLogTailSwitch) return std::log(sf);
  if (std::isinf(x)) return -kInf;
  // sf underflows only far beyond the mean, where y > a + 1 and the continued fraction converges.
  return log_upper_gamma_cf(0.5 * df, 0.5 * x);
}

double kolmogorov_sf(double x) {
  if (std::isnan(x)) return kNaN;
  if (x <= 0.0) return 1.0;
  if (std::isinf(x)) return 0.0;
  if (x < 1.0) {
    // cdf = sqrt(2 pi) / x sum_k exp(-(2k - 1)^2 pi^2 / (8 x^2)): converges fast for small x.
    double cdf = 0.0;
    for (int k = 1; k < 100; ++k) {
      const double term = std::exp(-(2.0 * k - 1) * (2.0 * k - 1) * M_PI * M_PI / (8.0 * x * x));
      cdf += term;
      if (term < kSeriesEpsilon * cdf) break;
    }
    return 1.0 - std::sqrt(2.0 * M_PI) / x * cdf;
  }
  // sf = 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2).
  double sf = 0.0;
  for (int k = 1; k < 100; ++k) {
    const double term = std::exp(-2.0 * k * k * x * x);
    sf += (k % 2 == 1 ? 2.0 : -2.0) * term;
    if (term < kSeriesEpsilon * std::fabs(sf)) break;
  }
  return std::clamp(sf, 0.0, 1.0);
}

double smirnov_sf(double d, std::int64_t n) {
  if (n < 1) throw InvalidInput("smirnov_sf: n must be >= 1, got " + std::to_string(n));
  if (std::isnan(d)) return kNaN;
  if (d <= 0.0) return 1.0;
  if (d >= 1.0) return 0.0;
  // P(D+ >= d) = d sum_{j=0}^{floor(n(1-d))} C(n,j) (1 - d - j/n)^(n-j) (d + j/n)^(j-1),
  // every term positive: summed as exp(log term - max).
  const double nd = static_cast<double>(n);
  const auto last = static_cast<std::int64_t>(std::floor(nd * (1.0 - d)));
  std::vector<double> logs;
  logs.reserve(static_cast<std::size_t>(last + 1));
  const double log_n_factorial = std::lgamma(nd + 1.0);
  for (std::int64_t j = 0; j <= last; ++j) {
    const double jd = static_cast<double>(j);
    const double low = 1.0 - d - jd / nd;
    if (low <= 0.0 && j < n) continue;  // (1 - d - j/n)^(n-j) = 0
    const double log_binom = log_n_factorial - std::lgamma(jd + 1.0) - std::lgamma(nd - jd + 1.0);
    const double log_low = j < n ? (nd - jd) * std::log(low) : 0.0;
    logs.push_back(log_binom + log_low + (jd - 1.0) * std::log(d + jd / nd));
  }
  if (logs.empty()) return 0.0;
  const double top = *std::max_element(logs.begin(), logs.end());
  double sum = 0.0;
  for (const double v : logs) sum += std::exp(v - top);
  return std::clamp(std::exp(std::log(d) + top + std::log(sum)), 0.0, 1.0);
}

}  // namespace libtransfer::stats
