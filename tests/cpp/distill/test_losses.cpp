// Tests of the training losses against closed forms and formulas written here.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "libtransfer/distill/losses.h"
#include "libtransfer/errors.h"

namespace distill = libtransfer::distill;
using distill::Divergence;
using distill::KDConfig;

namespace {

KDConfig config_of(Divergence d, double tau = 1.0, std::int64_t top_k = 0) {
  KDConfig c;
  c.divergence = d;
  c.temperature = tau;
  c.top_k = top_k;
  return c;
}

// sum p (log p - log q) over the last dim, from probabilities (float64).
double kl(const std::vector<double>& p, const std::vector<double>& q) {
  double sum = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] > 0) sum += p[i] * std::log(p[i] / q[i]);
  }
  return sum;
}

std::vector<double> softmax(const std::vector<double>& z, double tau) {
  double mx = -std::numeric_limits<double>::infinity();
  for (double x : z) mx = std::max(mx, x / tau);
  double total = 0.0;
  std::vector<double> p;
  for (double x : z) total += std::exp(x / tau - mx);
  for (double x : z) p.push_back(std::exp(x / tau - mx) / total);
  return p;
}

}  // namespace

TEST_CASE("forward, reverse KL and JSD match hand-computed values on one row", "[losses]") {
  const std::vector<double> zs{0.5, -1.0, 2.0, 0.0}, zt{1.0, 0.3, -0.7, 0.2};
  const auto s = torch::tensor(zs, torch::kDouble).reshape({1, 4});
  const auto t = torch::tensor(zt, torch::kDouble).reshape({1, 4});
  for (const double tau : {1.0, 2.0}) {
    const auto ps = softmax(zs, tau), pt = softmax(zt, tau);
    std::vector<double> m;
    for (int i = 0; i < 4; ++i) m.push_back(0.3 * pt[i] + 0.7 * ps[i]);
    KDConfig jsd = config_of(Divergence::kJSD, tau);
    jsd.beta = 0.3;
    CHECK(distill::kd_loss(s, t, {}, config_of(Divergence::kForwardKL, tau)).item<double>() ==
          Approx(tau * tau * kl(pt, ps)).epsilon(1e-12));
    CHECK(distill::kd_loss(s, t, {}, config_of(Divergence::kReverseKL, tau)).item<double>() ==
          Approx(tau * tau * kl(ps, pt)).epsilon(1e-12));
    CHECK(distill::kd_loss(s, t, {}, jsd).item<double>() ==
          Approx(tau * tau * (0.3 * kl(pt, m) + 0.7 * kl(ps, m))).epsilon(1e-12));
  }
}

TEST_CASE("top-k KD keeps the teacher's top tokens plus one tail bucket", "[losses]") {
  // Teacher top-2 are ids 0 and 3; the bucket holds ids 1 and 2 for both distributions.
  const std::vector<double> zs{0.1, 1.0, -0.5, 0.4}, zt{2.0, -1.0, 0.0, 1.5};
  const auto ps = softmax(zs, 1.0), pt = softmax(zt, 1.0);
  const std::vector<double> bs{ps[0], ps[3], ps[1] + ps[2]}, bt{pt[0], pt[3], pt[1] + pt[2]};
  const auto s = torch::tensor(zs, torch::kDouble).reshape({1, 4});
  const auto t = torch::tensor(zt, torch::kDouble).reshape({1, 4});
  CHECK(distill::kd_loss(s, t, {}, config_of(Divergence::kForwardKL, 1.0, 2)).item<double>() ==
        Approx(kl(bt, bs)).epsilon(1e-12));
  SECTION("offline top-k log-probs give the same value") {
    const auto ids = torch::tensor({0, 3}, torch::kLong).reshape({1, 2});
    const auto lp =
        torch::tensor({std::log(pt[0]), std::log(pt[3])}, torch::kDouble).reshape({1, 2});
    CHECK(distill::topk_kd_loss(s, ids, lp, {}, config_of(Divergence::kForwardKL)).item<double>() ==
          Approx(kl(bt, bs)).epsilon(1e-12));
  }
  SECTION("k >= V is the full KD") {
    const auto full = distill::kd_loss(s, t, {}, config_of(Divergence::kReverseKL));
    CHECK(distill::kd_loss(s, t, {}, config_of(Divergence::kReverseKL, 1.0, 4)).item<double>() ==
          Approx(full.item<double>()).epsilon(1e-14));
  }
}

TEST_CASE("logit_subset is KD on the sliced logits", "[losses]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto s = torch::randn({5, 13}, gen, torch::kDouble);
  const auto t = torch::randn({5, 13}, gen, torch::kDouble);
  KDConfig c = config_of(Divergence::kJSD, 2.0);
  c.logit_subset = {10, 11, 12};
  const auto index = torch::tensor({10, 11, 12}, torch::kLong);
  const auto sliced = distill::kd_loss(s.index_select(1, index), t.index_select(1, index), {},
                                       config_of(Divergence::kJSD, 2.0));
  CHECK(distill::kd_loss(s, t, {}, c).item<double>() ==
        Approx(sliced.item<double>()).epsilon(1e-14));
}

TEST_CASE("JSD at beta 0.5 is symmetric and at most tau^2 log 2", "[losses]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const auto a = torch::randn({7, 9}, gen, torch::kDouble) * 4;
  const auto b = torch::randn({7, 9}, gen, torch::kDouble) * 4;
  const auto c = config_of(Divergence::kJSD, 3.0);
  const double ab = distill::kd_loss(a, b, {}, c).item<double>();
  CHECK(ab == Approx(distill::kd_loss(b, a, {}, c).item<double>()).epsilon(1e-12));
  CHECK(ab > 0);
  CHECK(ab <= 9 * std::log(2.0));
}

TEST_CASE("losses upcast half precision and keep float64", "[losses]") {
  const auto s = torch::randn({3, 6}).to(torch::kBFloat16);
  const auto t = torch::randn({3, 6}).to(torch::kBFloat16);
  const auto loss = distill::kd_loss(s, t, {}, config_of(Divergence::kForwardKL));
  CHECK(loss.scalar_type() == torch::kFloat);
  const auto ref = distill::kd_loss(s.to(torch::kDouble), t.to(torch::kDouble), {},
                                    config_of(Divergence::kForwardKL));
  CHECK(loss.item<double>() == Approx(ref.item<double>()).epsilon(1e-5));
  CHECK(distill::completion_cross_entropy(s.to(torch::kDouble), torch::zeros({3}, torch::kLong))
            .scalar_type() == torch::kDouble);
}

TEST_CASE("cross-entropy averages -log p(target) over masked positions", "[losses]") {
  const auto logits = torch::tensor({{0.0, std::log(3.0)}, {std::log(4.0), 0.0}}, torch::kDouble)
                          .reshape({1, 2, 2});
  const auto targets = torch::tensor({1, -100}, torch::kLong).reshape({1, 2});
  const auto mask = torch::tensor({1.0, 0.0}).reshape({1, 2});
  // Position 0: p(1) = 3/4; position 1 is masked out (its target would be out of range).
  CHECK(distill::completion_cross_entropy(logits, targets, mask).item<double>() ==
        Approx(-std::log(0.75)).epsilon(1e-14));
  CHECK_THROWS_AS(distill::completion_cross_entropy(logits, targets), libtransfer::InvalidInput);
}

TEST_CASE("gradients stay finite when probabilities underflow", "[losses]") {
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto d : {Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD}) {
    auto s = torch::tensor({1e4, -1e4, 0.0, -inf}, torch::kFloat).reshape({1, 4}).requires_grad_();
    const auto t = torch::tensor({-1e4, 1e4, 0.0, -inf}, torch::kFloat).reshape({1, 4});
    const auto loss = distill::kd_loss(s, t, {}, config_of(d));
    loss.backward();
    CHECK(std::isfinite(loss.item<double>()));
    CHECK(torch::isfinite(s.grad()).all().item<bool>());
  }
}

TEST_CASE("bad inputs are refused with messages naming both sides", "[losses]") {
  const auto s = torch::zeros({2, 10});
  const auto check_message = [](auto&& f, const std::string& needle) {
    try {
      f();
      FAIL("expected InvalidInput");
    } catch (const libtransfer::InvalidInput& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  const auto c = config_of(Divergence::kForwardKL);
  check_message([&] { distill::kd_loss(s, torch::zeros({2, 12}), {}, c); }, "vocabulary");
  check_message([&] { distill::kd_loss(s, torch::zeros({2, 12}), {}, c); }, "12");
  check_message([&] { distill::kd_loss(s, s, torch::zeros({2}), c); }, "selects no position");
  check_message([&] { distill::kd_loss(s, torch::zeros({3, 10}), {}, c); }, "[3, 10]");
  check_message([&] { distill::parse_divergence("kl"); }, "forward_kl");
  CHECK(distill::parse_divergence(distill::to_string(Divergence::kJSD)) == Divergence::kJSD);
  KDConfig tempered = c;
  tempered.temperature = 2.0;
  check_message(
      [&] {
        distill::topk_kd_loss(s, torch::zeros({2, 1}, torch::kLong), torch::zeros({2, 1}), {},
                              tempered);
      },
      "temperature");
  CHECK_THROWS_AS(distill::kd_loss(s, s.to(torch::kLong), {}, c), libtransfer::WrongType);
}
