// Activation test, output test, susceptibility probe and report, on small stand-in models
// written here (a one-hidden-layer MLP and a GLU block), against independent expectations:
// brute-force permutation counts, closed forms of the uniform sphere, finite differences.
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>
#include <vector>

#include "libtransfer/detect/activation_test.h"
#include "libtransfer/detect/output_test.h"
#include "libtransfer/detect/report.h"
#include "libtransfer/detect/susceptibility.h"
#include "libtransfer/errors.h"

namespace {

using libtransfer::InvalidInput;
using libtransfer::models::InputKind;
using libtransfer::models::Model;
using libtransfer::models::ModelPtr;
using libtransfer::models::NamedTensors;
namespace detect = libtransfer::detect;

// features [B, F] -> hidden (ReLU, or a GLU silu(gate) * up) -> logits [B, C].
class StandIn : public Model {
 public:
  StandIn(std::int64_t f, std::int64_t h, std::int64_t c, std::uint64_t seed, bool glu)
      : glu_(glu) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto draw = [&](std::int64_t out, std::int64_t in) {
      return at::normal(0.0, 1.0 / std::sqrt(static_cast<double>(in)), {out, in}, gen,
                        torch::kFloat)
          .requires_grad_(true);
    };
    gate_ = draw(h, f);
    up_ = glu ? draw(h, f) : torch::Tensor();
    down_ = draw(c, h);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& = {}) override {
    return down_.matmul(hidden(x).t()).t();
  }
  torch::Tensor hidden(const torch::Tensor& x) {
    const torch::Tensor g = x.matmul(gate_.t());
    return glu_ ? torch::silu(g) * x.matmul(up_.t()) : torch::relu(g);
  }
  InputKind input_kind() const override { return InputKind::kFeatures; }
  std::int64_t output_size() const override { return down_.size(0); }
  std::int64_t input_size() const override { return gate_.size(1); }
  NamedTensors named_parameters() override {
    NamedTensors out = {{"gate", gate_}};
    if (glu_) out.push_back({"up", up_});
    out.push_back({"down", down_});
    return out;
  }
  NamedTensors hidden_activations(const torch::Tensor& x, const torch::Tensor& = {}) override {
    torch::NoGradGuard no_grad;
    if (!glu_) return {{"layers.0", x.matmul(gate_.t())}};
    return {{"layers.0.mlp.gate", x.matmul(gate_.t())}, {"layers.0.mlp.up", x.matmul(up_.t())}};
  }
  std::string describe() const override { return glu_ ? "stand-in glu" : "stand-in mlp"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<Model> clone() const override {
    auto copy = std::make_shared<StandIn>(*this);
    copy->gate_ = gate_.detach().clone().requires_grad_(true);
    if (glu_) copy->up_ = up_.detach().clone().requires_grad_(true);
    copy->down_ = down_.detach().clone().requires_grad_(true);
    return copy;
  }
  // Adds Gaussian noise of the given relative size to every parameter.
  void perturb(double relative, std::uint64_t seed) {
    torch::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    for (auto& [name, p] : named_parameters()) {
      p.add_(at::normal(0.0, 1.0, p.sizes(), gen, torch::kFloat) * relative * p.std());
    }
  }
  // Permutes the hidden units (rows of gate/up, columns of down): the function is unchanged.
  void permute_hidden(const torch::Tensor& perm) {
    torch::NoGradGuard no_grad;
    gate_.copy_(gate_.index_select(0, perm));
    if (glu_) up_.copy_(up_.index_select(0, perm));
    down_.copy_(down_.index_select(1, perm));
  }

 private:
  bool glu_;
  torch::Tensor gate_, up_, down_;
};

// A model without parameters: logits are the first 4 features.
class NoParameters : public Model {
 public:
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& = {}) override {
    return x.narrow(1, 0, 4);
  }
  InputKind input_kind() const override { return InputKind::kFeatures; }
  std::int64_t output_size() const override { return 4; }
  std::int64_t input_size() const override { return 12; }
  NamedTensors named_parameters() override { return {}; }
  std::string describe() const override { return "no parameters"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<Model> clone() const override { return std::make_shared<NoParameters>(); }
};

torch::Tensor noise(std::int64_t rows, std::int64_t f, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::empty({rows, f}, torch::kFloat).uniform_(-1.0, 1.0, gen);
}

// A few SGD steps of cross-entropy on random labels: a "briefly fine-tuned" copy.
void fine_tune(StandIn& model, std::int64_t steps, double lr, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const torch::Tensor x = noise(64, model.input_size(), seed);
  const torch::Tensor y = at::randint(0, model.output_size(), {64}, gen, torch::kLong);
  for (std::int64_t s = 0; s < steps; ++s) {
    auto params = libtransfer::models::parameters(model);
    const torch::Tensor loss = torch::cross_entropy_loss(model.forward(x), y);
    const auto grads = torch::autograd::grad({loss}, params);
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params.size(); ++i) params[i].sub_(grads[i] * lr);
  }
}

double log10_factorial(std::int64_t n) { return std::lgamma(n + 1.0) / std::log(10.0); }

}  // namespace

TEST_CASE("fixed-point tail matches brute force over all permutations", "[probes]") {
  for (std::int64_t n = 1; n <= 7; ++n) {
    std::vector<int> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::vector<double> count(n + 1, 0.0);
    double total = 0.0;
    do {
      int fixed = 0;
      for (int i = 0; i < n; ++i) fixed += perm[i] == i;
      count[fixed] += 1.0;
      total += 1.0;
    } while (std::next_permutation(perm.begin(), perm.end()));
    double tail = 0.0;
    for (std::int64_t k = n; k >= 1; --k) {
      tail += count[k] / total;
      if (tail == 0.0) {
        CHECK(detect::fixed_points_log10_sf(n, k) == -std::numeric_limits<double>::infinity());
      } else {
        CHECK(detect::fixed_points_log10_sf(n, k) == Approx(std::log10(tail)).epsilon(1e-12));
      }
    }
    CHECK(detect::fixed_points_log10_sf(n, 0) == 0.0);
  }
}

TEST_CASE("fixed-point tail: Poisson(1) limit and the 1/n! floor for large n", "[probes]") {
  // Poisson(1): P(K >= k) = 1 - e^-1 sum_{j<k} 1/j!, an independent formula for large n.
  for (std::int64_t k = 1; k <= 6; ++k) {
    double below = 0.0, term = 1.0;
    for (std::int64_t j = 0; j < k; ++j) {
      below += term;
      term /= static_cast<double>(j + 1);
    }
    const double poisson = 1.0 - std::exp(-1.0) * below;
    CHECK(detect::fixed_points_log10_sf(200, k) == Approx(std::log10(poisson)).epsilon(1e-9));
  }
  // P(K = n) = 1/n! and P(K >= n - 1) too (n - 1 fixed points are impossible).
  CHECK(detect::fixed_points_log10_sf(1000, 1000) == Approx(-log10_factorial(1000)).epsilon(1e-12));
  CHECK(detect::fixed_points_log10_sf(1000, 999) == Approx(-log10_factorial(1000)).epsilon(1e-12));
  CHECK(std::isfinite(detect::fixed_points_log10_sf(5000, 5000)));
}

TEST_CASE("column correlations equal Pearson's r computed pair by pair", "[probes]") {
  const torch::Tensor x = torch::randn({50, 4}, torch::kDouble);
  torch::Tensor y = torch::randn({50, 3}, torch::kDouble);
  y.select(1, 2).fill_(3.0);  // no spread: correlates 0
  const torch::Tensor c = detect::column_correlations(x, y);
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      const torch::Tensor a = x.select(1, i) - x.select(1, i).mean();
      const torch::Tensor b = y.select(1, j) - y.select(1, j).mean();
      const double r = (a.dot(b) / std::sqrt((a.dot(a) * b.dot(b)).item<double>())).item<double>();
      CHECK(c[i][j].item<double>() == Approx(r).epsilon(1e-12));
    }
    CHECK(c[i][2].item<double>() == 0.0);
  }
}

TEST_CASE("activation test separates shared from independent initializations", "[probes]") {
  const std::int64_t f = 24, h = 32, c = 6;
  const torch::Tensor x = noise(400, f, 11);
  for (bool glu : {false, true}) {
    INFO("glu " << glu);
    StandIn a(f, h, c, 1, glu);
    SECTION("a copy with small noise") {
      auto b = std::static_pointer_cast<StandIn>(a.clone());
      b->perturb(0.05, 3);
      const auto r = detect::activation_test(a, *b, x);
      CHECK(r.test.layers.size() == 1);
      CHECK(r.test.layers[0].statistic == h);
      CHECK(r.test.log10_p == Approx(-log10_factorial(h)).epsilon(1e-6));
    }
    SECTION("a briefly fine-tuned copy") {
      auto b = std::static_pointer_cast<StandIn>(a.clone());
      fine_tune(*b, 20, 0.1, 5);
      const auto r = detect::activation_test(a, *b, x);
      CHECK(r.test.statistic >= h - 2);
      CHECK(r.test.log10_p < -20.0);
    }
    SECTION("a copy with permuted hidden units") {
      auto b = std::static_pointer_cast<StandIn>(a.clone());
      b->permute_hidden(torch::randperm(h, torch::kLong));
      const auto r = detect::activation_test(a, *b, x);
      if (glu) {  // the sibling form is invariant to the permutation
        CHECK(r.test.statistic == h);
        CHECK(r.test.layers[0].kind == "glu_hidden");
      } else {  // the single form needs aligned indices (documented)
        CHECK(r.test.statistic <= 5);
      }
    }
    SECTION("independent initializations") {
      StandIn b(f, h, c, 2, glu);
      const auto r = detect::activation_test(a, b, x);
      CHECK(r.test.statistic <= 5);
      CHECK(r.test.log10_p > -3.0);
    }
    SECTION("controls give an empirical p with the +1 correction") {
      auto b = std::static_pointer_cast<StandIn>(a.clone());
      b->perturb(0.05, 3);
      std::vector<ModelPtr> controls;
      for (std::uint64_t s = 10; s < 14; ++s)
        controls.push_back(std::make_shared<StandIn>(f, h, c, s, glu));
      const auto r = detect::activation_test(a, *b, x, {}, controls);
      CHECK(r.control_statistics.size() == 4);
      CHECK(r.test.log10_p == Approx(std::log10(1.0 / 5.0)));
      CHECK(detect::is_calibrated(r.test));
    }
  }
}

TEST_CASE("activation test refuses mismatched models and empty inputs", "[probes]") {
  StandIn a(8, 16, 4, 1, false), wide(8, 20, 4, 2, false), glu(8, 16, 4, 3, true);
  const torch::Tensor x = noise(50, 8, 1);
  CHECK_THROWS_AS(detect::activation_test(a, wide, x), InvalidInput);
  CHECK_THROWS_WITH(detect::activation_test(a, wide, x),
                    Catch::Contains("16 units in a but 20 in b"));
  CHECK_THROWS_WITH(detect::activation_test(a, glu, x), Catch::Contains("no counterpart"));
  CHECK_THROWS_WITH(detect::activation_test(a, a, torch::Tensor()), Catch::Contains("input"));
}

TEST_CASE("output test: correlation, controls, and no p without controls", "[probes]") {
  StandIn a(10, 16, 5, 1, false);
  auto copy = std::static_pointer_cast<StandIn>(a.clone());
  copy->permute_hidden(torch::randperm(16, torch::kLong));  // same function
  std::vector<ModelPtr> controls;
  for (std::uint64_t s = 20; s < 26; ++s)
    controls.push_back(std::make_shared<StandIn>(10, 16, 5, s, false));

  const auto r = detect::output_test(a, *copy, {}, {}, controls, 7);
  CHECK(r.correlation == Approx(1.0).epsilon(1e-9));
  CHECK(r.test.log10_p == Approx(std::log10(1.0 / 7.0)));
  CHECK(r.control_correlations.size() == 6);
  CHECK(r.z > 3.0);

  // Independent check of the statistic: eager formula on the default probes.
  const torch::Tensor probes =
      detect::default_probe_inputs(a, detect::kDefaultProbeRows, detect::kDefaultProbeLength, 7);
  torch::Tensor la, lb;
  {
    torch::NoGradGuard ng;
    la = a.forward(probes).to(torch::kDouble);
    lb = controls[0]->forward(probes).to(torch::kDouble);
  }
  la = (la - la.mean(1, true)).flatten();
  lb = (lb - lb.mean(1, true)).flatten();
  const double expected =
      ((la - la.mean()).dot(lb - lb.mean()) / ((la - la.mean()).norm() * (lb - lb.mean()).norm()))
          .item<double>();
  CHECK(r.control_correlations[0] == Approx(expected).epsilon(1e-10));

  const auto bare = detect::output_test(a, *controls[0]);
  CHECK(bare.test.ran);
  CHECK(!bare.test.skipped_reason.empty());
  CHECK(bare.test.log10_p == 0.0);
  CHECK(!detect::is_calibrated(bare.test));

  StandIn other(10, 16, 6, 2, false);
  CHECK_THROWS_WITH(detect::output_test(a, other),
                    Catch::Contains("5 outputs") && Catch::Contains("6"));
}

TEST_CASE("random-direction cosine tail: closed forms in R^2, R^3 and simulation", "[probes]") {
  for (double c : {-0.9, -0.3, 0.0, 0.2, 0.7, 0.95}) {
    // R^3: the cosine is uniform on [-1, 1] (Archimedes); R^2: the angle is uniform.
    CHECK(std::pow(10.0, detect::random_direction_cosine_log10_sf(c, 3)) ==
          Approx((1.0 - c) / 2.0).epsilon(1e-9));
    CHECK(std::pow(10.0, detect::random_direction_cosine_log10_sf(c, 2)) ==
          Approx(std::acos(c) / M_PI).epsilon(1e-9));
  }
  // Simulation in R^50: the empirical tail at a few points within 4 standard errors.
  const torch::Tensor v = torch::randn({50}, torch::kDouble);
  const torch::Tensor sims = detect::random_direction_cosines(v, 20000, 3);
  for (double c : {0.0, 0.1, 0.2, 0.3}) {
    const double p = std::pow(10.0, detect::random_direction_cosine_log10_sf(c, 50));
    const double empirical = sims.ge(c).to(torch::kDouble).mean().item<double>();
    CHECK(std::fabs(empirical - p) < 4.0 * std::sqrt(p * (1 - p) / 20000) + 1e-4);
  }
  // Far tail stays finite: cos 0.5 in a million dimensions.
  const double far = detect::random_direction_cosine_log10_sf(0.5, 1000000);
  CHECK(std::isfinite(far));
  CHECK(far < -50000.0);
  CHECK_THROWS_AS(detect::random_direction_cosine_log10_sf(0.5, 1), InvalidInput);
}

TEST_CASE("susceptibility probe follows the theorem", "[probes]") {
  const std::int64_t f = 12, h = 24, c = 5;
  StandIn base(f, h, c, 1, false);
  const torch::Tensor x = noise(128, f, 4);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const torch::Tensor y = at::randint(0, c, {128}, gen, torch::kLong);
  // Trait loss L_T: cross-entropy on a fixed labelled set.
  detect::TraitLoss trait = [&](Model& m) { return torch::cross_entropy_loss(m.forward(x), y); };
  // Teacher = theta0 + eps dtheta_T, dtheta_T = -grad L_T(theta0).
  auto teacher = std::static_pointer_cast<StandIn>(base.clone());
  {
    auto params = libtransfer::models::parameters(*teacher);
    const auto grads = torch::autograd::grad({trait(*teacher)}, params);
    torch::NoGradGuard ng;
    for (std::size_t i = 0; i < params.size(); ++i) params[i].sub_(grads[i] * 0.5);
  }
  std::vector<ModelPtr> controls;
  for (std::uint64_t s = 30; s < 35; ++s)
    controls.push_back(std::make_shared<StandIn>(f, h, c, s, false));

  const auto before = libtransfer::models::state_dict(base);
  std::vector<torch::Tensor> copies;
  for (const auto& [n, t] : before) copies.push_back(t.clone());
  const auto r = detect::susceptibility_probe(base, *teacher, {}, {}, controls, trait);
  CHECK(r.cosine > 0.2);
  CHECK(r.test.log10_p == Approx(std::log10(1.0 / 6.0)));
  CHECK(r.random_direction_log10_p < -5.0);
  CHECK(r.dimension == h * f + c * h);
  CHECK(r.tensors.size() == 2);
  for (double cc : r.control_cosines) CHECK(std::fabs(cc) < r.cosine);
  // Parameters unchanged and still requiring grad as before.
  const auto after = libtransfer::models::state_dict(base);
  for (std::size_t i = 0; i < after.size(); ++i) CHECK(torch::equal(after[i].second, copies[i]));

  // The predicted first-order change against a finite step along -g (independent evaluation).
  REQUIRE(r.predicted_trait_change.has_value());
  CHECK(*r.predicted_trait_change < 0.0);  // imitating the teacher lowers the trait loss
  {
    auto student = std::static_pointer_cast<StandIn>(base.clone());
    const torch::Tensor probes = detect::default_probe_inputs(base, detect::kDefaultProbeRows,
                                                              detect::kDefaultProbeLength, 0);
    auto params = libtransfer::models::parameters(*student);
    torch::Tensor tl;
    {
      torch::NoGradGuard ng;
      tl = teacher->forward(probes);
    }
    const torch::Tensor kd = torch::kl_div(torch::log_softmax(student->forward(probes), 1),
                                           torch::log_softmax(tl, 1), at::Reduction::Sum,
                                           /*log_target=*/true) /
                             probes.size(0);
    const auto g = torch::autograd::grad({kd}, params);
    const double eta = 1e-3;
    const double l0 = trait(*student).item<double>();
    {
      torch::NoGradGuard ng;
      for (std::size_t i = 0; i < params.size(); ++i) params[i].sub_(g[i] * eta);
    }
    const double l1 = trait(*student).item<double>();
    CHECK(*r.predicted_trait_change == Approx(l1 - l0).epsilon(0.05));
    CHECK(*r.trait_loss == Approx(l0).epsilon(1e-6));
  }
}

TEST_CASE("susceptibility probe is near zero across independent initializations", "[probes]") {
  StandIn s(12, 24, 5, 1, false), t(12, 24, 5, 2, false);
  detect::SusceptibilityConfig config;
  config.random_directions = 200;
  const auto r = detect::susceptibility_probe(s, t, {}, {}, {}, {}, config);
  CHECK(std::fabs(r.cosine) < 0.2);
  CHECK(r.random_cosines.size(0) == 200);
  CHECK(!detect::is_calibrated(r.test));  // approximate null without controls
}

TEST_CASE("susceptibility probe refuses mismatched models and parameterless models", "[probes]") {
  StandIn s(12, 24, 5, 1, false), wide(12, 30, 5, 2, false), glu(12, 24, 5, 3, true);
  CHECK_THROWS_WITH(detect::susceptibility_probe(s, wide),
                    Catch::Contains("'gate'") && Catch::Contains("[24, 12]"));
  CHECK_THROWS_WITH(detect::susceptibility_probe(s, glu), Catch::Contains("parameter tensors"));
  CHECK_THROWS_WITH(detect::susceptibility_probe(s, s), Catch::Contains("equal the student's"));
  NoParameters none;
  CHECK_THROWS_WITH(detect::susceptibility_probe(none, none), Catch::Contains("no parameters"));
  CHECK_THROWS_WITH(detect::output_test(none, s), Catch::Contains("outputs"));
}

TEST_CASE("report combines calibrated tests with Bonferroni and prints them", "[probes]") {
  detect::TestResult weights;
  weights.test = "weights";
  weights.ran = true;
  weights.statistic = 30;
  weights.statistic_name = "fixed_points";
  weights.log10_p = -40.0;
  weights.method = "fisher over 2 layers";
  weights.layers = {{"layers.0", "mlp_hidden", 32, 30, "fixed_points", -30.0, 0.9375, ""},
                    {"layers.1", "mlp_hidden", 32, 12, "fixed_points", -10.0, 0.375, ""}};
  detect::TestResult outputs;
  outputs.test = "outputs";
  outputs.ran = true;
  outputs.skipped_reason = "no p-value: give control models";
  detect::TestResult approx;
  approx.test = "susceptibility";
  approx.ran = true;
  approx.log10_p = -400.0;
  approx.method = std::string(detect::kApproximateMethodPrefix) + "random direction";
  detect::TestResult act;
  act.test = "activations";
  act.ran = true;
  act.log10_p = std::log10(0.2);
  act.method = "empirical over 4 control pairs (+1)";
  detect::TestResult skipped;
  skipped.test = "weights2";
  skipped.skipped_reason = "no weights";

  const auto rep = detect::make_report({weights, outputs, approx, act, skipped}, 0.01);
  CHECK(rep.combined_tests == std::vector<std::string>{"weights", "activations"});
  CHECK(rep.combined_log10_p == Approx(-40.0 + std::log10(2.0)));
  CHECK(rep.verdict == detect::Verdict::kShared);
  const std::string text = rep.to_text();
  CHECK_THAT(text, Catch::Contains("shared") && Catch::Contains("layers.1") &&
                       Catch::Contains("1.0e-30") && Catch::Contains("skipped: no weights"));

  const auto j = nlohmann::json::parse(rep.to_json());
  CHECK(j["verdict"] == "shared");
  CHECK(j["tests"].size() == 5);
  CHECK(j["tests"][0]["layers"][1]["statistic"].get<double>() == 12.0);
  CHECK(j["tests"][0]["layers"][0]["matched_fraction"].get<double>() == 0.9375);
  CHECK(j["tests"][2]["p"].is_null());  // 1e-400 is below what a double holds
  CHECK(j["tests"][2]["log10_p"].get<double>() == -400.0);
  CHECK(j["tests"][2]["calibrated"] == false);

  CHECK(detect::make_report({act}, 0.01).verdict == detect::Verdict::kNotShared);
  CHECK(detect::make_report({outputs, approx}, 0.01).verdict == detect::Verdict::kInconclusive);
  CHECK_THROWS_AS(detect::make_report({}, 1.5), InvalidInput);
}
