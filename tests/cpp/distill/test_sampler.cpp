// The sampler: each filter's distribution against hand computations (exact support, chi-square
// frequencies), greedy decoding, stop tokens, batching invariance, cache vs recomputation and
// the reported log-probabilities.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <map>

#include "libtransfer/distill/sampler.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/transformer.h"

using libtransfer::InvalidInput;
using namespace libtransfer::distill;
using namespace libtransfer::models;

namespace {

// A stand-in language model without parameters: the same logits at every position.
class FixedModel : public Model {
 public:
  explicit FixedModel(std::vector<double> logits)
      : logits_(torch::tensor(logits, torch::kDouble)) {}
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor&) override {
    ++calls;
    return logits_.view({1, 1, -1}).expand({input.size(0), input.size(1), logits_.size(0)});
  }
  InputKind input_kind() const override { return InputKind::kTokens; }
  std::int64_t output_size() const override { return logits_.size(0); }
  NamedTensors named_parameters() override { return {}; }
  std::string describe() const override { return "fixed"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<Model> clone() const override { return nullptr; }
  int calls = 0;

 private:
  torch::Tensor logits_;
};

// Predicts (last token + 1) mod V with certainty, ignoring the rest.
class CounterModel : public Model {
 public:
  explicit CounterModel(int64_t vocab) : vocab_(vocab) {}
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor&) override {
    return torch::one_hot((input + 1) % vocab_, vocab_).to(torch::kFloat) * 20.0;
  }
  InputKind input_kind() const override { return InputKind::kTokens; }
  std::int64_t output_size() const override { return vocab_; }
  NamedTensors named_parameters() override { return {}; }
  std::string describe() const override { return "counter"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<Model> clone() const override { return nullptr; }

 private:
  int64_t vocab_;
};

// probabilities 0.4 0.25 0.15 0.1 0.06 0.04 (logits are their logs, shuffled in index order).
const std::vector<double> kProbs = {0.1, 0.4, 0.04, 0.25, 0.06, 0.15};
std::vector<double> log_of(const std::vector<double>& p) {
  std::vector<double> out;
  for (double x : p) out.push_back(std::log(x));
  return out;
}

// Hand-computed filtered distributions over the indices of kProbs.
std::vector<double> normalized(std::vector<double> p) {
  double total = 0;
  for (double x : p) total += x;
  for (double& x : p) x /= total;
  return p;
}

// Draws n tokens (20 prompts x n/20 steps) and returns the counts per token.
std::vector<int64_t> draw_counts(FixedModel& model, const SamplerConfig& config, int n) {
  SamplerConfig c = config;
  c.max_new_tokens = n / 20;
  const std::vector<std::vector<int64_t>> prompts(20, std::vector<int64_t>{0});
  const auto samples = sample(model, prompts, c);
  std::vector<int64_t> counts(kProbs.size(), 0);
  for (const auto& row : samples) {
    for (const auto token : row) ++counts[size_t(token)];
  }
  return counts;
}

// Pearson's statistic over the support; the support must be exact (no draw outside).
double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& expected, int n,
                  int* cells) {
  double stat = 0;
  *cells = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected[i] == 0) {
      CHECK(counts[i] == 0);
      continue;
    }
    ++*cells;
    const double e = expected[i] * n;
    stat += (counts[i] - e) * (counts[i] - e) / e;
  }
  return stat;
}

// Upper 0.1% points of chi-square with 1..5 degrees of freedom (standard tables).
const double kChi2Critical[] = {0, 10.828, 13.816, 16.266, 18.467, 20.515};

}  // namespace

TEST_CASE("Each sampling filter gives the hand-computed distribution", "[sampler]") {
  FixedModel model(log_of(kProbs));
  struct Case {
    std::string name;
    SamplerConfig config;
    std::vector<double> expected;
  };
  std::vector<Case> cases;
  SamplerConfig c;
  cases.push_back({"plain", c, kProbs});
  c = {};
  c.top_k = 3;  // 0.4, 0.25, 0.15
  cases.push_back({"top_k", c, normalized({0, 0.4, 0, 0.25, 0, 0.15})});
  c = {};
  c.top_p = 0.7;  // 0.4 + 0.25 = 0.65 < 0.7, so 0.15 joins
  cases.push_back({"top_p", c, normalized({0, 0.4, 0, 0.25, 0, 0.15})});
  c = {};
  c.top_p = 0.65 + 1e-9;  // just above 0.65: still three tokens
  cases.push_back({"top_p boundary", c, normalized({0, 0.4, 0, 0.25, 0, 0.15})});
  c = {};
  c.top_p = 0.6;
  cases.push_back({"top_p two", c, normalized({0, 0.4, 0, 0.25, 0, 0})});
  c = {};
  c.min_p = 0.3;  // p >= 0.12
  cases.push_back({"min_p", c, normalized({0, 0.4, 0, 0.25, 0, 0.15})});
  c = {};
  c.threshold = 0.08;  // p >= 0.08
  cases.push_back({"threshold", c, normalized({0.1, 0.4, 0, 0.25, 0, 0.15})});
  c = {};
  c.threshold = 0.9;  // nothing reaches it: the most probable token survives
  cases.push_back({"threshold keeps argmax", c, {0, 1, 0, 0, 0, 0}});
  c = {};
  c.temperature = 0.5;  // p^2 renormalized
  cases.push_back({"temperature", c, normalized({0.01, 0.16, 0.0016, 0.0625, 0.0036, 0.0225})});
  c = {};
  c.temperature = 2.0;  // sqrt(p), then top_k 4 and min_p 0.55 of the renormalized max
  c.top_k = 4;
  c.min_p = 0.55;
  {
    std::vector<double> s;
    for (double p : kProbs) s.push_back(std::sqrt(p));
    // After top_k: sqrt 0.4, 0.25, 0.15, 0.1 = .632 .5 .387 .316 (ratios to the max 1, .79,
    // .61, .5); min_p 0.55 drops the last.
    cases.push_back({"combined", c, normalized({0, s[1], 0, s[3], 0, s[5]})});
  }
  for (const auto& test : cases) {
    DYNAMIC_SECTION(test.name) {
      const auto logits = torch::tensor(log_of(kProbs), torch::kDouble).unsqueeze(0);
      const auto filtered = filtered_probabilities(logits, test.config)[0];
      for (size_t i = 0; i < kProbs.size(); ++i) {
        CHECK(filtered[int64_t(i)].item<double>() == Approx(test.expected[i]).margin(1e-12));
      }
      const int n = 4000;
      const auto counts = draw_counts(model, test.config, n);
      int cells = 0;
      const double stat = chi_square(counts, test.expected, n, &cells);
      if (cells > 1) CHECK(stat < kChi2Critical[cells - 1]);
    }
  }
}

TEST_CASE("Greedy sampling equals argmax decoding", "[sampler]") {
  TransformerConfig config;
  config.vocab_size = 17;
  config.init_std = 0.5;
  config.seed = 9;
  TransformerLM model(config);
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {4}, {5, 6, 7, 8, 9}};
  SamplerConfig c;
  c.temperature = 0;
  c.max_new_tokens = 6;
  c.batch_size = 3;
  const auto samples = sample_with_details(model, prompts, c);
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int64_t> seq = prompts[i];
    std::vector<int64_t> expected;
    for (int t = 0; t < 6; ++t) {
      const auto logits = model.forward(torch::tensor(seq).unsqueeze(0))[0];
      const auto next = logits[int64_t(seq.size()) - 1].argmax().item<int64_t>();
      // The reported log-probability is log_softmax at temperature 1 of the full forward.
      CHECK(samples.logprobs[i][size_t(t)] ==
            Approx(torch::log_softmax(logits[int64_t(seq.size()) - 1].to(torch::kDouble), 0)[next]
                       .item<double>())
                .margin(1e-5));
      expected.push_back(next);
      seq.push_back(next);
    }
    CHECK(samples.tokens[i] == expected);
    CHECK(samples.stop_reasons[i] == StopReason::kMaxTokens);
  }
}

TEST_CASE("Stop tokens end a row while the others continue", "[sampler]") {
  CounterModel model(10);
  SamplerConfig c;
  c.stop_tokens = {5};
  c.max_new_tokens = 7;
  c.pad_id = 0;
  for (const bool cached : {true, false}) {
    c.use_cache = cached;
    const auto out = sample_with_details(model, {{3}, {0, 1}, {6}}, c);
    CHECK(out.tokens[0] == std::vector<int64_t>{4, 5});
    CHECK(out.tokens[1] == std::vector<int64_t>{2, 3, 4, 5});
    CHECK(out.tokens[2] == std::vector<int64_t>{7, 8, 9, 0, 1, 2, 3});
    CHECK(out.stop_reasons[0] == StopReason::kStopToken);
    CHECK(out.stop_reasons[1] == StopReason::kStopToken);
    CHECK(out.stop_reasons[2] == StopReason::kMaxTokens);
    CHECK(out.logprobs[2].size() == 7);
  }
  CHECK(stop_reason_name(StopReason::kStopToken) == "stop_token");
}

TEST_CASE("Samples do not depend on batch size, other prompts or the KV cache", "[sampler]") {
  TransformerConfig config;
  config.vocab_size = 31;
  config.d_model = 32;
  config.n_layers = 2;
  config.init_std = 0.3;
  config.seed = 2;
  TransformerLM model(config);
  std::vector<std::vector<int64_t>> prompts;
  for (int i = 0; i < 9; ++i) {
    std::vector<int64_t> p;
    for (int t = 0; t <= i % 4; ++t) p.push_back((i * 7 + t * 3) % 31);
    prompts.push_back(p);
  }
  SamplerConfig c;
  c.max_new_tokens = 8;
  c.stop_tokens = {3, 4};
  c.seed = 123;
  c.batch_size = 1;
  const auto one = sample_with_details(model, prompts, c);
  c.batch_size = 7;
  const auto seven = sample_with_details(model, prompts, c);
  CHECK(one.tokens == seven.tokens);
  c.use_cache = false;
  const auto recomputed = sample_with_details(model, prompts, c);
  CHECK(recomputed.tokens == seven.tokens);
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (size_t t = 0; t < one.logprobs[i].size(); ++t) {
      CHECK(recomputed.logprobs[i][t] == Approx(one.logprobs[i][t]).margin(1e-5));
    }
  }
  // A prompt's sample does not depend on the prompts after it.
  const auto alone = sample(model, {prompts[0], prompts[1]}, c);
  CHECK(alone[1] == one.tokens[1]);
  // Another seed gives other samples; the same seed the same.
  c.seed = 124;
  CHECK(sample(model, prompts, c) != one.tokens);
  c.seed = 123;
  CHECK(sample(model, prompts, c) == one.tokens);
}

TEST_CASE("The sampler checks its config and inputs", "[sampler]") {
  CounterModel model(10);
  SamplerConfig c;
  auto bad = [&](auto change, const std::string& field) {
    SamplerConfig broken;
    change(broken);
    CHECK_THROWS_WITH(sample(model, {{1}}, broken), Catch::Contains(field));
  };
  bad([](SamplerConfig& s) { s.temperature = -1; }, "temperature");
  bad([](SamplerConfig& s) { s.top_p = 0; }, "top_p");
  bad([](SamplerConfig& s) { s.top_p = 1.5; }, "top_p");
  bad([](SamplerConfig& s) { s.min_p = 1; }, "min_p");
  bad([](SamplerConfig& s) { s.threshold = -0.1; }, "threshold");
  bad([](SamplerConfig& s) { s.top_k = -2; }, "top_k");
  bad([](SamplerConfig& s) { s.batch_size = 0; }, "batch_size");
  bad([](SamplerConfig& s) { s.max_new_tokens = -1; }, "max_new_tokens");
  bad([](SamplerConfig& s) { s.pad_id = 10; }, "pad_id");
  CHECK_THROWS_WITH(sample(model, {{1}, {}}, c), Catch::Contains("prompts[1]"));
  CHECK_THROWS_WITH(sample(model, {{1, 12}}, c), Catch::Contains("12"));
  c.max_new_tokens = 0;
  CHECK(sample(model, {{1}}, c) == std::vector<std::vector<int64_t>>{{}});
  CHECK(sampler_uniform(1, 2, 3) == sampler_uniform(1, 2, 3));
  CHECK(sampler_uniform(1, 2, 3) != sampler_uniform(1, 3, 2));
}
