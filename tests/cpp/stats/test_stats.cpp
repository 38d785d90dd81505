// Tests of libtransfer::stats against closed forms and brute force written here.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/ks.h"
#include "libtransfer/stats/multiple_testing.h"
#include "libtransfer/stats/permutation.h"
#include "libtransfer/stats/ranks.h"
#include "libtransfer/stats/t_test.h"

namespace st = libtransfer::stats;

TEST_CASE("chi-squared tails match the closed forms of even degrees of freedom", "[stats]") {
  for (const double x : {0.1, 1.0, 5.0, 40.0}) {
    CHECK(st::chi2_sf(x, 2.0) == Approx(std::exp(-x / 2)).epsilon(1e-13));
    CHECK(st::chi2_sf(x, 4.0) == Approx((1 + x / 2) * std::exp(-x / 2)).epsilon(1e-13));
  }
  // Far beyond double range: log Q(1, y) = -y and log Q(2, y) = log(1 + y) - y exactly.
  CHECK(st::chi2_logsf(4000.0, 2.0) == Approx(-2000.0).epsilon(1e-14));
  CHECK(st::chi2_logsf(4000.0, 4.0) == Approx(std::log(2001.0) - 2000.0).epsilon(1e-14));
  CHECK(st::chi2_sf(-1.0, 3.0) == 1.0);
  CHECK_THROWS_AS(st::chi2_sf(1.0, 0.0), libtransfer::InvalidInput);
}

TEST_CASE("Student t and normal tails match closed forms, in log space too", "[stats]") {
  // df = 1 is the Cauchy distribution: P(T >= x) = 1/2 - atan(x) / pi.
  for (const double x : {-3.0, 0.0, 0.5, 10.0}) {
    CHECK(st::t_sf(x, 1.0) == Approx(0.5 - std::atan(x) / M_PI).epsilon(1e-13));
  }
  // Cauchy far tail: P(T >= x) ~ 1 / (pi x).
  CHECK(st::t_logsf(1e300, 1.0) == Approx(-std::log(M_PI * 1e300)).epsilon(1e-12));
  CHECK(st::normal_sf(0.0) == Approx(0.5).epsilon(1e-15));
  CHECK(st::normal_logsf(10.0) ==
        Approx(std::log(0.5 * std::erfc(10.0 / std::sqrt(2.0)))).epsilon(1e-13));
  // The asymptotic branch joins the exact one continuously at x = 30.
  CHECK(st::normal_logsf(30.0 - 1e-9) == Approx(st::normal_logsf(30.0)).epsilon(1e-9));
  CHECK(std::isfinite(st::normal_logsf(1e6)));
}

TEST_CASE("Kolmogorov-Smirnov tails match the closed form for one draw and the limit", "[stats]") {
  // n = 1: D = max(u, 1 - u), so P(D >= d) = 2 (1 - d) for d in [1/2, 1].
  for (const double d : {0.5, 0.6, 0.9})
    CHECK(st::ks_sf(d, 1) == Approx(2 * (1 - d)).epsilon(1e-12));
  // For large n, sqrt(n) D_n approaches Kolmogorov's distribution.
  CHECK(st::ks_sf(1.0 / std::sqrt(4000.0), 4000) == Approx(st::kolmogorov_sf(1.0)).epsilon(2e-2));
  // Known value: P(K >= 1.3581) = 0.05 (the classical 5% critical value).
  CHECK(st::kolmogorov_sf(1.3581) == Approx(0.05).epsilon(1e-3));
  // The statistic of an evenly spread sample is 1 / (2n), so p = 1.
  auto p = (torch::arange(10, torch::kDouble) + 0.5) / 10.0;
  const auto r = st::ks_uniform(p);
  CHECK(r.statistic == Approx(0.05).epsilon(1e-12));
  CHECK(r.p_value == 1.0);
  CHECK_THROWS(st::ks_uniform(torch::tensor({0.5, 1.5}, torch::kDouble)));
}

TEST_CASE("Benjamini-Hochberg rejects what the step-up definition rejects", "[stats]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (int rep = 0; rep < 20; ++rep) {
    auto p = torch::rand({40}, gen, torch::kDouble).pow(3);
    const double q = 0.1;
    const auto r = st::benjamini_hochberg(p, q);
    auto sorted = std::get<0>(p.sort());
    int64_t k = 0;
    for (int64_t i = 1; i <= 40; ++i) {
      if (sorted[i - 1].item<double>() <= i * q / 40) k = i;
    }
    const double cutoff = k > 0 ? sorted[k - 1].item<double>() : -1.0;
    CHECK(torch::equal(r.rejected, p <= cutoff));
    // Adjusted p-values: monotone in p, <= 1, and reproduce the rejections.
    auto adjusted_sorted = r.adjusted.index_select(0, std::get<1>(p.sort()));
    CHECK((adjusted_sorted.slice(0, 1) >= adjusted_sorted.slice(0, 0, -1)).all().item<bool>());
    CHECK(r.adjusted.max().item<double>() <= 1.0);
    CHECK(torch::equal(r.rejected, r.adjusted <= q));
  }
  CHECK_THROWS(st::benjamini_hochberg(torch::tensor({0.1, NAN}, torch::kDouble)));
  CHECK_THROWS(st::benjamini_hochberg(torch::tensor({0.1}, torch::kDouble), 0.0));
}

TEST_CASE("Fisher's method of one p-value returns it, and tiny ones stay finite in log space",
          "[stats]") {
  CHECK(st::fisher_combine(torch::tensor({0.3}, torch::kDouble)).p_value ==
        Approx(0.3).epsilon(1e-13));
  // Two p-values: P(chi2_4 >= X) = (1 + X/2) e^{-X/2} with X = -2 log(p1 p2).
  const double prod = 0.02 * 0.4;
  CHECK(st::fisher_combine(torch::tensor({0.02, 0.4}, torch::kDouble)).p_value ==
        Approx(prod * (1 - std::log(prod))).epsilon(1e-12));
  const auto tiny = st::fisher_combine_log(torch::tensor({-1000.0, -2000.0}, torch::kDouble));
  CHECK(tiny.p_value == 0.0);
  CHECK(tiny.log_p == Approx(-3000.0 + std::log(3001.0)).epsilon(1e-13));
  CHECK_THROWS(st::fisher_combine(torch::tensor({1.2}, torch::kDouble)));
}

TEST_CASE("average ranks share ties and Spearman is 1 for monotone data", "[stats]") {
  const auto r = st::rankdata(torch::tensor({10.0, 20.0, 20.0, 5.0}, torch::kDouble));
  CHECK(torch::allclose(r, torch::tensor({2.0, 3.5, 3.5, 1.0}, torch::kDouble)));
  const auto a = torch::tensor({1.0, 2.0, 3.0, 4.0}, torch::kDouble);
  CHECK(st::spearman(a, a.exp()) == Approx(1.0).epsilon(1e-15));
  CHECK(st::spearman(a, -a) == Approx(-1.0).epsilon(1e-15));
  CHECK(std::isnan(st::pearson(a, torch::ones({4}, torch::kDouble))));
}

TEST_CASE("the exact sign-flip test equals brute force over all sign patterns", "[stats]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const int64_t n = 7;
  const auto x = torch::randn({n, 3}, gen, torch::kDouble) + 0.3;
  for (const auto kind : {st::SignFlipStatistic::kSumSq, st::SignFlipStatistic::kMaxT}) {
    auto stat = [&](const torch::Tensor& y) {
      if (kind == st::SignFlipStatistic::kSumSq) return y.mean(0).pow(2).sum().item<double>();
      const auto sd = ((y - y.mean(0)).pow(2).sum(0) / double(n - 1)).sqrt();
      const auto t = y.mean(0) / (sd / std::sqrt(double(n)));
      return t.abs().max().item<double>();
    };
    const double observed = stat(x);
    int64_t count = 0;
    for (int64_t code = 0; code < (1 << n); ++code) {
      auto s = torch::ones({n, 1}, torch::kDouble);
      for (int64_t i = 0; i < n; ++i) {
        if (code >> i & 1) s[i][0] = -1.0;
      }
      if (stat(x * s) >= observed * (1 - 1e-12)) ++count;
    }
    const auto r = st::sign_flip_test(x, kind, 1000, 0);
    CHECK(r.exact);
    CHECK(r.permutations == 128);
    CHECK(r.statistic == Approx(observed).epsilon(1e-12));
    CHECK(r.p_value == Approx(count / 128.0).epsilon(1e-15));
  }
}

TEST_CASE("the random sign-flip test is deterministic given a seed and in (0, 1]", "[stats]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const auto x = torch::randn({30, 4}, gen, torch::kDouble);
  const auto a = st::sign_flip_test(x, st::SignFlipStatistic::kSumSq, 499, 5);
  const auto b = st::sign_flip_test(x, st::SignFlipStatistic::kSumSq, 499, 5);
  CHECK(!a.exact);
  CHECK(a.p_value == b.p_value);
  CHECK(a.p_value > 0.0);
  CHECK(a.p_value <= 1.0);
  // A strong shift gives the smallest attainable p-value 1 / (B + 1).
  CHECK(st::sign_flip_test(x + 5.0, st::SignFlipStatistic::kSumSq, 499, 5).p_value ==
        Approx(1.0 / 500));
  // All-zero differences: every pattern ties, p = 1.
  CHECK(st::sign_flip_test(torch::zeros({20, 3}), st::SignFlipStatistic::kMaxT, 99, 0).p_value ==
        1.0);
  CHECK_THROWS(st::sign_flip_test(torch::ones({1, 3}), st::SignFlipStatistic::kMaxT, 99, 0));
  CHECK_THROWS(st::parse_sign_flip_statistic("mean"));
}

TEST_CASE("one-sample t statistics match the textbook formula", "[stats]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  auto x = torch::randn({12, 3}, gen, torch::kDouble);
  x.select(1, 2).fill_(0.25);  // no spread: t = 0, p = 1 by definition
  const auto r = st::one_sample_t(x);
  for (int64_t j = 0; j < 2; ++j) {
    const auto col = x.select(1, j);
    const double t = col.mean().item<double>() / (col.std().item<double>() / std::sqrt(12.0));
    CHECK(r.t[j].item<double>() == Approx(t).epsilon(1e-12));
    CHECK(r.p[j].item<double>() == Approx(2 * st::t_sf(std::fabs(t), 11)).epsilon(1e-12));
  }
  CHECK(r.t[2].item<double>() == 0.0);
  CHECK(r.p[2].item<double>() == 1.0);
}

TEST_CASE("the permutation p-value counts ties and is never 0", "[stats]") {
  const auto null = torch::tensor({1.0, 2.0, 3.0, 4.0}, torch::kDouble);
  CHECK(st::permutation_p_value(3.0, null) == Approx(3.0 / 5));
  CHECK(st::permutation_p_value(10.0, null) == Approx(1.0 / 5));
  CHECK(st::permutation_p_value(2.0, null, false) == Approx(3.0 / 5));
}
