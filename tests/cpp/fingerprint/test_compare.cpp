// Tests of fingerprint comparisons and tests (compare.h) against formulas written here.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <set>
#include <vector>

#include "libtransfer/fingerprint/compare.h"
#include "libtransfer/stats/permutation.h"

namespace fp = libtransfer::fingerprint;
namespace st = libtransfer::stats;

namespace {
double centered_cosine(const torch::Tensor& a, const torch::Tensor& b) {
  const auto x = a - a.mean();
  const auto y = b - b.mean();
  return ((x * y).sum() / (x.norm() * y.norm())).item<double>();
}
}  // namespace

TEST_CASE("the trait-specific fingerprint subtracts the controls' mean", "[compare]") {
  const auto t = torch::tensor({1.0, 2.0, 3.0}, torch::kDouble);
  const auto c1 = torch::tensor({0.0, 1.0, 1.0}, torch::kDouble);
  const auto c2 = torch::tensor({1.0, 1.0, 0.0}, torch::kDouble);
  CHECK(torch::allclose(fp::trait_specific(t, {c1, c2}),
                        torch::tensor({0.5, 1.0, 2.5}, torch::kDouble)));
  CHECK(torch::equal(fp::trait_specific(t, {}), t));
  CHECK_THROWS_WITH(fp::trait_specific(t, {torch::zeros({4})}),
                    Catch::Contains("controls[0]") && Catch::Contains("[3]"));
}

TEST_CASE("the global test is the sign-flip test of teacher minus control sequences", "[compare]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const auto teacher = torch::randn({25, 6}, gen, torch::kDouble) + 0.2;
  const auto control = torch::randn({25, 6}, gen, torch::kDouble);
  const auto r = fp::global_test(teacher, {control}, "maxt", 199, 3);
  const auto direct = st::sign_flip_test(teacher - control, st::SignFlipStatistic::kMaxT, 199, 3);
  CHECK(r.p_value == direct.p_value);
  CHECK(r.statistic == Approx(direct.statistic).epsilon(1e-14));
  CHECK(r.n_sequences == 25);
  CHECK_THROWS_WITH(fp::global_test(teacher, {control.slice(0, 1)}, "sumsq", 99, 0),
                    Catch::Contains("controls[0]"));
  CHECK_THROWS(fp::global_test(teacher.select(1, 0), {}, "sumsq", 99, 0));
}

TEST_CASE("per-token tests find a planted shift and BH controls the rest", "[compare]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  auto teacher = torch::randn({60, 20}, gen, torch::kDouble);
  teacher.slice(1, 0, 3) += 2.0;
  const auto r = fp::per_token_test(teacher, {}, 0.05);
  CHECK(r.rejected.slice(0, 0, 3).all().item<bool>());
  CHECK(r.rejected.sum().item<int64_t>() <= 5);
  CHECK(torch::equal(r.rejected, r.adjusted <= 0.05));
}

TEST_CASE("comparisons: centered cosine, Spearman, top-k overlap and z against controls",
          "[compare]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto a = torch::randn({30}, gen, torch::kDouble);
  const auto b = a + 0.5 * torch::randn({30}, gen, torch::kDouble);
  std::vector<torch::Tensor> controls;
  for (int i = 0; i < 4; ++i) controls.push_back(torch::randn({30}, gen, torch::kDouble));
  const auto r = fp::compare_fingerprints(a, b, 5, controls);
  CHECK(r.cosine == Approx(centered_cosine(a, b)).epsilon(1e-12));
  const auto top_a = std::get<1>(a.topk(5));
  const auto top_b = std::get<1>(b.topk(5));
  std::set<int64_t> sa(top_a.data_ptr<int64_t>(), top_a.data_ptr<int64_t>() + 5);
  int common = 0;
  for (int i = 0; i < 5; ++i) common += sa.count(top_b[i].item<int64_t>());
  CHECK(r.topk_overlap == Approx(common / 5.0));
  std::vector<double> cos;
  for (const auto& c : controls) cos.push_back(centered_cosine(c, b));
  const auto cs = torch::tensor(cos, torch::kDouble);
  REQUIRE(r.z_cosine.has_value());
  CHECK(*r.z_cosine ==
        Approx((r.cosine - cs.mean().item<double>()) / cs.std().item<double>()).epsilon(1e-10));
  CHECK(fp::compare_fingerprints(a, a, 5).spearman == Approx(1.0));
  CHECK(fp::compare_fingerprints(a, -a, 100).k == 30);  // k is clamped to S
  CHECK_FALSE(fp::compare_fingerprints(a, b, 5, {controls[0]}).z_cosine.has_value());
  CHECK_THROWS(fp::compare_fingerprints(a, b.slice(0, 1), 5));
}
