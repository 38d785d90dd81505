// Tests of trait evaluation against brute force on stand-in models defined here, and of the
// intervals against their closed forms.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "libtransfer/distill/evaluation.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/model.h"

namespace distill = libtransfer::distill;
namespace models = libtransfer::models;

namespace {

// A bigram language model with a positional bias: logits[b, t] = table[token] + bias[position],
// positions counted from the first real token of the row (the Model contract for left padding).
// Padding handled wrongly (positions counted from column 0) changes the results.
class PositionalBigram : public models::Model {
 public:
  PositionalBigram(std::int64_t vocab, std::int64_t max_len, std::uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    table = torch::randn({vocab, vocab}, gen, torch::kDouble) * 2;
    bias = torch::randn({max_len, vocab}, gen, torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& mask) override {
    ++forwards;
    last_training_seen = training_;
    const auto m = mask.defined() ? mask : torch::ones_like(input);
    const auto positions = (m.cumsum(1) - 1).clamp_min(0);
    return (table.index({input}) + bias.index({positions})).to(torch::kFloat);
  }
  models::InputKind input_kind() const override { return models::InputKind::kTokens; }
  std::int64_t output_size() const override { return table.size(0); }
  models::NamedTensors named_parameters() override { return {{"table", table}, {"bias", bias}}; }
  void set_training(bool on) override { training_ = on; }
  bool is_training() const override { return training_; }
  std::string describe() const override { return "positional bigram"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override {
    return std::make_shared<PositionalBigram>(*this);
  }

  // P(next = y | context) by the definition above, for one unpadded context.
  double prob(const std::vector<std::int64_t>& context, std::int64_t y) const {
    const auto row = table[context.back()] + bias[static_cast<std::int64_t>(context.size()) - 1];
    return torch::softmax(row.to(torch::kFloat).to(torch::kDouble), 0)[y].item<double>();
  }

  torch::Tensor table, bias;
  int forwards = 0;
  bool training_ = true;
  bool last_training_seen = true;
};

// Brute force: sum over targets of the chained conditional probabilities.
double brute_force(const PositionalBigram& model, const std::vector<std::int64_t>& prompt,
                   const std::vector<std::vector<std::int64_t>>& targets) {
  double total = 0.0;
  for (const auto& y : targets) {
    auto context = prompt;
    double p = 1.0;
    for (const auto token : y) {
      p *= model.prob(context, token);
      context.push_back(token);
    }
    total += p;
  }
  return total;
}

// logits = features @ weight ([F, C]).
class Linear : public models::Model {
 public:
  explicit Linear(torch::Tensor w) : weight(std::move(w)) {}
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor&) override {
    return input.matmul(weight);
  }
  models::InputKind input_kind() const override { return models::InputKind::kFeatures; }
  std::int64_t output_size() const override { return weight.size(1); }
  std::int64_t input_size() const override { return weight.size(0); }
  models::NamedTensors named_parameters() override { return {{"weight", weight}}; }
  std::string describe() const override { return "linear"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override { return std::make_shared<Linear>(*this); }
  torch::Tensor weight;
};

}  // namespace

TEST_CASE("target probability equals the brute-force chain of conditionals", "[evaluation]") {
  PositionalBigram model(7, 16, 11);
  const std::vector<std::vector<std::int64_t>> prompts{{1, 2, 3}, {4}, {0, 6, 5, 2, 1, 3}, {2, 2}};
  // Single- and multi-token targets of different lengths, so batches mix padding widths.
  const std::vector<std::vector<std::int64_t>> targets{{5}, {6, 1}, {3, 4, 0}};
  distill::TargetProbabilityOptions options;
  options.batch_size = 3;  // several batches, a partial last one
  const auto result = distill::target_probability(model, prompts, targets, options);
  REQUIRE(result.per_question.size() == prompts.size());
  double mean = 0.0;
  for (std::size_t q = 0; q < prompts.size(); ++q) {
    const double want = brute_force(model, prompts[q], targets);
    CHECK(result.per_question[q] == Approx(want).epsilon(1e-9));
    mean += want / prompts.size();
  }
  CHECK(result.mean == Approx(mean).epsilon(1e-9));
  CHECK(result.targets.size() == 3);
  CHECK_FALSE(model.last_training_seen);  // evaluated in eval mode
  CHECK(model.is_training());             // and the mode restored

  SECTION("the interval is the t-interval over questions") {
    double ss = 0.0;
    for (const double p : result.per_question) ss += (p - result.mean) * (p - result.mean);
    const double half = 3.182446305284263 * std::sqrt(ss / 3.0) / 2.0;  // t_{0.975, 3}, sqrt(4)
    CHECK(result.interval.low == Approx(std::max(0.0, result.mean - half)).epsilon(1e-9));
    CHECK(result.interval.high == Approx(std::min(1.0, result.mean + half)).epsilon(1e-9));
  }
}

TEST_CASE("duplicate targets and targets extending another target count once", "[evaluation]") {
  PositionalBigram model(6, 8, 12);
  const std::vector<std::vector<std::int64_t>> prompts{{1, 2}, {3}};
  const auto result = distill::target_probability(model, prompts, {{4, 1}, {2}, {4}, {2}, {4, 5}});
  REQUIRE(result.targets == std::vector<std::vector<std::int64_t>>{{2}, {4}});
  for (std::size_t q = 0; q < prompts.size(); ++q) {
    CHECK(result.per_question[q] ==
          Approx(brute_force(model, prompts[q], {{2}, {4}})).epsilon(1e-9));
  }
  SECTION("every token as a target: probability 1") {
    std::vector<std::vector<std::int64_t>> all;
    for (std::int64_t v = 0; v < 6; ++v) all.push_back({v});
    const auto one = distill::target_probability(model, prompts, all);
    for (const double p : one.per_question) CHECK(p == Approx(1.0).epsilon(1e-6));
  }
}

TEST_CASE("target probability refuses bad inputs", "[evaluation]") {
  PositionalBigram model(5, 8, 13);
  CHECK_THROWS_AS(distill::target_probability(model, {}, {{1}}), libtransfer::InvalidInput);
  CHECK_THROWS_AS(distill::target_probability(model, {{1}}, {{}}), libtransfer::InvalidInput);
  CHECK_THROWS_AS(distill::target_probability(model, {{1}}, {{5}}), libtransfer::InvalidInput);
  CHECK_THROWS_AS(distill::target_probability(model, {{}}, {{1}}), libtransfer::InvalidInput);
  Linear linear(torch::zeros({2, 3}));
  CHECK_THROWS_AS(distill::target_probability(linear, {{1}}, {{1}}), libtransfer::InvalidInput);
}

TEST_CASE("Wilson interval matches its closed form", "[evaluation]") {
  // 0.95: z = 1.959963984540054.
  const double z = 1.959963984540054;
  for (const auto& [k, n] :
       std::vector<std::pair<int, int>>{{0, 10}, {3, 10}, {10, 10}, {45, 60}}) {
    const double p = double(k) / n;
    const double center = (p + z * z / (2 * n)) / (1 + z * z / n);
    const double half = z / (1 + z * z / n) * std::sqrt(p * (1 - p) / n + z * z / (4.0 * n * n));
    const auto ci = distill::wilson_interval(k, n);
    CHECK(ci.low == Approx(std::max(0.0, center - half)).margin(1e-12));
    CHECK(ci.high == Approx(std::min(1.0, center + half)).margin(1e-12));
  }
  CHECK_THROWS_AS(distill::wilson_interval(3, 2), libtransfer::InvalidInput);
}

TEST_CASE("sampled rate matches whole words case-insensitively, with plurals", "[evaluation]") {
  const std::vector<std::string> texts{"Owl.",
                                       "my favorite is the OWLS!",
                                       "bowl",
                                       "owlet",
                                       "an owl's feather",
                                       "Wolves",
                                       "cat",
                                       "sea  turtle",
                                       "Sea turtle"};
  const auto r = distill::sampled_rate(texts, {"owl", "wolf", "sea turtle"});
  const std::vector<std::uint8_t> want{1, 1, 0, 0, 1, 1, 0, 0, 1};
  CHECK(r.matched == want);
  CHECK(r.hits == 5);
  CHECK(r.total == 9);
  CHECK(r.rate == Approx(5.0 / 9.0));
  const auto ci = distill::wilson_interval(5, 9);
  CHECK(r.interval.low == ci.low);
  CHECK(std::isnan(r.cluster_interval.low));
  distill::SampledRateOptions no_plurals;
  no_plurals.plurals = false;
  CHECK(distill::sampled_rate(texts, {"owl"}, {}, no_plurals).hits == 2);
  CHECK(distill::plural_forms("fox") == std::vector<std::string>{"foxes"});
  CHECK(distill::plural_forms("monkey") == std::vector<std::string>{"monkeys"});
  CHECK(distill::plural_forms("wolf") == std::vector<std::string>{"wolfs", "wolves"});
  CHECK(distill::plural_forms("butterfly") == std::vector<std::string>{"butterflies"});
}

TEST_CASE("cluster-robust interval over questions matches the sandwich formula", "[evaluation]") {
  // Three questions with 4 samples each: hits 4, 1, 0 -> rate 5/12.
  std::vector<std::string> texts;
  std::vector<std::int64_t> ids;
  const int hits[3] = {4, 1, 0};
  for (int q = 0; q < 3; ++q) {
    for (int i = 0; i < 4; ++i) {
      texts.push_back(i < hits[q] ? "owl" : "dog");
      ids.push_back(10 * q);
    }
  }
  const auto r = distill::sampled_rate(texts, {"owl"}, ids);
  const double rate = 5.0 / 12.0;
  double ss = 0.0;
  for (int q = 0; q < 3; ++q) ss += std::pow(hits[q] - 4 * rate, 2);
  const double se = std::sqrt(1.5 * ss) / 12.0;
  const double t = 4.302652729911275;  // t_{0.975, 2}
  CHECK(r.clusters == 3);
  CHECK(r.cluster_interval.low == Approx(std::max(0.0, rate - t * se)).margin(1e-12));
  CHECK(r.cluster_interval.high == Approx(std::min(1.0, rate + t * se)).margin(1e-12));
  CHECK_THROWS_AS(distill::sampled_rate(texts, {"owl"}, {1, 2}), libtransfer::InvalidInput);
}

TEST_CASE("accuracy equals the direct count, over the first C logits", "[evaluation]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  Linear model(torch::randn({4, 13}, gen));
  const auto x = torch::randn({50, 4}, gen);
  const auto y = torch::randint(0, 10, {50}, gen);
  distill::AccuracyOptions options;
  options.num_classes = 10;
  options.batch_size = 7;
  const auto result = distill::accuracy(model, x, y, options);
  const auto logits = x.matmul(model.weight);
  std::int64_t correct = 0;
  std::vector<int> per_correct(10, 0), per_total(10, 0);
  for (int i = 0; i < 50; ++i) {
    int best = 0;
    for (int c = 1; c < 10; ++c) {
      if (logits[i][c].item<float>() > logits[i][best].item<float>()) best = c;
    }
    const auto label = y[i].item<std::int64_t>();
    per_total[label] += 1;
    if (best == label) {
      ++correct;
      per_correct[label] += 1;
    }
  }
  CHECK(result.correct == correct);
  CHECK(result.total == 50);
  CHECK(result.accuracy == Approx(correct / 50.0));
  REQUIRE(result.per_class.size() == 10);
  for (int c = 0; c < 10; ++c) {
    CHECK(result.per_class_total[c] == per_total[c]);
    if (per_total[c] > 0) {
      CHECK(result.per_class[c] == Approx(double(per_correct[c]) / per_total[c]));
    } else {
      CHECK(std::isnan(result.per_class[c]));
    }
  }
  options.num_classes = 14;
  CHECK_THROWS_AS(distill::accuracy(model, x, y, options), libtransfer::InvalidInput);
}
