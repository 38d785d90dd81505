// Tail probabilities of the distributions our tests need (normal, Student t, chi-squared,
// Kolmogorov-Smirnov), with log-space variants that stay finite where the tail underflows.
//
// Torch-free scalar functions: Boost.Math for the bulk, continued fractions and series in log
// space for the far tails, the Marsaglia-Tsang-Wang matrix method for the exact KS distribution.
#pragma once

#include <cstdint>

namespace libtransfer::stats {

// Below this survival probability the log-space routines stop taking log(sf) and evaluate the
// tail directly (doubles keep full relative precision down to ~2e-308; a margin of 8 decades).
inline constexpr double kLogTailSwitch = 1e-300;

// P(Z >= x) for a standard normal Z. NaN -> NaN.
double normal_sf(double x);
// log P(Z >= x), finite for every finite x (asymptotic series beyond x = 30).
double normal_logsf(double x);

// P(T >= x) for Student's t with df > 0 degrees of freedom (InvalidInput otherwise).
double t_sf(double x, double df);
// log P(T >= x): the incomplete-beta series in log space where the tail underflows.
double t_logsf(double x, double df);

// P(X >= x) for chi-squared with df > 0 degrees of freedom (InvalidInput otherwise).
double chi2_sf(double x, double df);
// log P(X >= x): the upper incomplete gamma continued fraction in log space where sf underflows.
double chi2_logsf(double x, double df);

// P(K >= x) for Kolmogorov's limiting distribution K = lim sqrt(n) D_n (alternating series).
double kolmogorov_sf(double x);

// P(D_n^+ >= d): the one-sided KS statistic's exact tail (Smirnov's finite sum, in log space).
double smirnov_sf(double d, std::int64_t n);

// P(D_n >= d) for the two-sided one-sample KS statistic of n uniform draws. Exact (Marsaglia-
// Tsang-Wang) while its matrix stays small, 2 x smirnov_sf in the far tail (as scipy's kstwo),
// and Kolmogorov's limit with Stephens' finite-n correction for very large n (see ks.cpp).
double ks_sf(double d, std::int64_t n);

}  // namespace libtransfer::stats
