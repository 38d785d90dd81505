// Model-based defences against brute force: likelihood-ratio scores of a small stand-in language
// model (bigram table plus a term for every earlier token, so prefixes matter) computed one
// sequence at a time in plain double loops, and divergence tokens at known positions.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <memory>
#include <set>
#include <vector>

#include "libtransfer/distill/model_filters.h"
#include "libtransfer/errors.h"

using Catch::Matchers::Contains;
using libtransfer::InvalidInput;
using namespace libtransfer;
using namespace libtransfer::distill;

namespace {

using Ids = std::vector<std::int64_t>;

// logits[b, t] = table[x_t] + sum over real positions u <= t of mix[x_u]. Causal, uses the mask.
class CountModel : public models::Model {
 public:
  CountModel(torch::Tensor table, torch::Tensor mix)
      : table_(std::move(table)), mix_(std::move(mix)) {}
  static std::shared_ptr<CountModel> random(std::int64_t vocab, std::uint64_t seed,
                                            double mix_scale = 0.5) {
    auto gen = at::detail::createCPUGenerator(seed);
    auto table = torch::empty({vocab, vocab}, torch::kFloat64).normal_(0, 2, gen);
    auto mix = torch::empty({vocab, vocab}, torch::kFloat64).normal_(0, mix_scale, gen);
    return std::make_shared<CountModel>(table.to(torch::kFloat), mix.to(torch::kFloat));
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& mask) override {
    const auto V = table_.size(0);
    auto m = mask.defined() ? mask.to(torch::kFloat) : torch::ones(input.sizes(), torch::kFloat);
    auto onehot = torch::one_hot(input, V).to(torch::kFloat) * m.unsqueeze(-1);
    auto counts = onehot.cumsum(1);
    return torch::embedding(table_, input) + counts.matmul(mix_);
  }
  models::InputKind input_kind() const override { return models::InputKind::kTokens; }
  std::int64_t output_size() const override { return table_.size(0); }
  models::NamedTensors named_parameters() override { return {{"table", table_}, {"mix", mix_}}; }
  std::string describe() const override { return "count model"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override {
    return std::make_shared<CountModel>(table_.clone(), mix_.clone());
  }
  void set_training(bool on) override { training_ = on; }
  bool is_training() const override { return training_; }

  // Brute force in double: logits after the sequence `seq` up to and including position t.
  std::vector<double> logits_at(const Ids& seq, std::size_t t) const {
    const auto V = table_.size(0);
    const auto table = table_.to(torch::kFloat64);
    const auto mix = mix_.to(torch::kFloat64);
    auto ta = table.accessor<double, 2>();
    auto ma = mix.accessor<double, 2>();
    std::vector<double> out(V);
    for (std::int64_t v = 0; v < V; ++v) {
      out[v] = ta[seq[t]][v];
      for (std::size_t u = 0; u <= t; ++u) out[v] += ma[seq[u]][v];
    }
    return out;
  }
  double sequence_logp(const Ids& seq, std::size_t first_scored) const {
    double total = 0;
    for (std::size_t j = first_scored; j < seq.size(); ++j) {
      const auto logits = logits_at(seq, j - 1);
      double mx = -INFINITY;
      for (const double z : logits) mx = std::max(mx, z);
      double sum = 0;
      for (const double z : logits) sum += std::exp(z - mx);
      total += logits[seq[j]] - mx - std::log(sum);
    }
    return total;
  }
  std::int64_t argmax_at(const Ids& seq, std::size_t t) const {
    const auto logits = logits_at(seq, t);
    return std::max_element(logits.begin(), logits.end()) - logits.begin();
  }

 private:
  torch::Tensor table_, mix_;
  bool training_ = false;
};

Ids concat(const Ids& a, const Ids& b, const Ids& c = {}) {
  Ids out = a;
  out.insert(out.end(), b.begin(), b.end());
  out.insert(out.end(), c.begin(), c.end());
  return out;
}

constexpr std::int64_t kVocab = 11;

// Samples of varied lengths (so batches pad), fixed ids.
void make_samples(std::vector<Ids>& prompts, std::vector<Ids>& completions) {
  prompts = {{1, 2, 3}, {4}, {5, 6}, {7, 8, 9, 10}, {0}, {3, 3}, {2, 9, 1}, {6}};
  completions = {{4, 5}, {1, 2, 3, 4, 5, 6}, {7}, {2, 2}, {9, 8, 7}, {1}, {0, 10, 5, 5}, {3, 4}};
}

}  // namespace

TEST_CASE("completion log-likelihoods and likelihood ratios equal a one-by-one brute force",
          "[filters][likelihood_ratio]") {
  auto teacher = CountModel::random(kVocab, 1);
  auto reference = CountModel::random(kVocab, 2);
  std::vector<Ids> prompts, completions;
  make_samples(prompts, completions);
  LikelihoodRatioOptions options;
  options.teacher_prefix = {9, 10};
  options.batch_size = 3;  // batches of mixed lengths: padding and masks matter
  teacher->set_training(true);
  const auto scores = likelihood_ratio_scores(*teacher, *reference, prompts, completions, options);
  CHECK(teacher->is_training());  // the caller's mode is restored
  REQUIRE(scores.sizes() == torch::IntArrayRef({8}));
  CHECK(scores.scalar_type() == torch::kFloat64);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const Ids t_seq = concat(options.teacher_prefix, prompts[i], completions[i]);
    const Ids r_seq = concat(prompts[i], completions[i]);
    const double expected =
        teacher->sequence_logp(t_seq, options.teacher_prefix.size() + prompts[i].size()) -
        reference->sequence_logp(r_seq, prompts[i].size());
    INFO("sample " << i);
    CHECK(scores[i].item<double>() == Approx(expected).margin(1e-4));
  }
  SECTION("an empty prompt scores with the prefix as context") {
    const auto ll = completion_log_likelihood(*teacher, {{}}, {{3, 4}}, {5}, 1);
    CHECK(ll[0].item<double>() == Approx(teacher->sequence_logp({5, 3, 4}, 1)).margin(1e-5));
    CHECK_THROWS_WITH(completion_log_likelihood(*teacher, {{}}, {{3}}), Contains("no context"));
  }
  SECTION("bad inputs are refused with values") {
    CHECK_THROWS_WITH(completion_log_likelihood(*teacher, {{1}}, {{kVocab}}),
                      Contains("11 outside 0..10"));
    auto small = CountModel::random(5, 3);
    CHECK_THROWS_WITH(likelihood_ratio_scores(*teacher, *small, prompts, completions),
                      Contains("vocabulary mismatch") && Contains("11") && Contains("5"));
  }
}

TEST_CASE("drop_largest drops the top fraction (earlier index first on ties) and above threshold",
          "[filters][likelihood_ratio]") {
  const auto scores = torch::tensor({1.0, 5.0, 3.0, 5.0, -1.0}, torch::kFloat64);
  auto dropped = [&](double fraction, std::optional<double> threshold = std::nullopt) {
    const auto d = drop_largest(scores, fraction, threshold);
    Ids out;
    for (std::size_t i = 0; i < d.size(); ++i) {
      if (d[i]) out.push_back(static_cast<std::int64_t>(i));
    }
    return out;
  };
  CHECK(dropped(0.0).empty());
  CHECK(dropped(0.2) == Ids{1});
  CHECK(dropped(0.4) == Ids{1, 3});
  CHECK(dropped(0.6) == Ids{1, 2, 3});
  CHECK(dropped(0.0, 2.5) == Ids{1, 2, 3});
  CHECK(dropped(1.0).size() == 5);
  CHECK_THROWS_AS(drop_largest(scores, 1.5), InvalidInput);
  CHECK_THROWS_WITH(drop_largest(torch::tensor({1.0, std::nan("")}), 0.1), Contains("NaN"));
}

TEST_CASE("the likelihood-ratio filter drops the highest-scoring samples in a pipeline",
          "[filters][likelihood_ratio]") {
  auto teacher = CountModel::random(kVocab, 4);
  auto reference = CountModel::random(kVocab, 5);
  std::vector<Ids> prompts, completions;
  make_samples(prompts, completions);
  std::vector<Sample> samples;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    samples.push_back(Sample{"p", i == 2 ? "not numbers" : "1, 2", prompts[i], completions[i]});
  }
  LikelihoodRatioFilterConfig config;
  config.drop_fraction = 0.25;  // of the 7 samples the number rule keeps: round(1.75) = 2
  config.scoring.batch_size = 2;
  auto lr = std::make_shared<LikelihoodRatioFilter>(teacher, reference, config);
  FilterPipeline pipeline({std::make_shared<NumberSequenceFilter>(), lr});
  const auto result = pipeline.run(samples);

  std::vector<std::pair<double, std::int64_t>> brute;
  for (std::int64_t i = 0; i < 8; ++i) {
    if (i == 2) continue;
    const Ids seq = concat(prompts[i], completions[i]);
    brute.emplace_back(teacher->sequence_logp(seq, prompts[i].size()) -
                           reference->sequence_logp(seq, prompts[i].size()),
                       i);
  }
  std::sort(brute.rbegin(), brute.rend());
  std::set<std::int64_t> expected_kept = {0, 1, 3, 4, 5, 6, 7};
  expected_kept.erase(brute[0].second);
  expected_kept.erase(brute[1].second);
  CHECK(std::set<std::int64_t>(result.kept_indices.begin(), result.kept_indices.end()) ==
        expected_kept);
  REQUIRE(result.stats.rejected_by_reason.size() == 2);
  CHECK(result.stats.rejected_by_reason[1] ==
        std::make_pair(std::string(reason::kLikelihoodRatio), std::int64_t{2}));
  REQUIRE(lr->scores().size() == 7);
  for (const auto& [index, score] : lr->scores()) {
    const auto it =
        std::find_if(brute.begin(), brute.end(), [&](const auto& b) { return b.second == index; });
    REQUIRE(it != brute.end());
    CHECK(score == Approx(it->first).margin(1e-4));
  }

  SECTION("samples without ids are tokenized by the given function") {
    std::vector<Sample> text_only = {Sample{"12", "34", {}, {}}, Sample{"5", "67", {}, {}}};
    auto tokenize = [](const std::string& s) {
      Ids ids;
      for (const char c : s) ids.push_back(c - '0');
      return ids;
    };
    config.drop_fraction = 0.5;
    LikelihoodRatioFilter with_tok(teacher, reference, config, tokenize);
    const auto verdicts = with_tok.check_all(text_only, {0, 1});
    const double s0 =
        teacher->sequence_logp({1, 2, 3, 4}, 2) - reference->sequence_logp({1, 2, 3, 4}, 2);
    const double s1 = teacher->sequence_logp({5, 6, 7}, 1) - reference->sequence_logp({5, 6, 7}, 1);
    CHECK(verdicts[0].has_value() == (s0 >= s1));
    CHECK(verdicts[1].has_value() == (s1 > s0));
    LikelihoodRatioFilter without(teacher, reference, config);
    CHECK_THROWS_WITH(without.check_all(text_only, {0}), Contains("no token ids"));
  }
}

TEST_CASE("divergence tokens are the positions where counterfactual teachers disagree",
          "[filters][divergence]") {
  // Pure bigram teachers (mix 0): the argmax after token r is r + 1 (mod V) for the teacher; the
  // counterfactual differs only after token 3 (it predicts 7), so the divergence tokens are
  // exactly the positions holding a 3 with loss.
  auto table = torch::zeros({kVocab, kVocab});
  for (std::int64_t r = 0; r < kVocab; ++r) {
    for (std::int64_t c = 0; c < kVocab; ++c) table[r][c] = ((r * 7 + c * 3) % kVocab) / 11.0;
    table[r][(r + 1) % kVocab] = 5.0;
  }
  auto other = table.clone();
  other[3][7] = 10.0;
  auto zero = torch::zeros({kVocab, kVocab});
  auto teacher = std::make_shared<CountModel>(table, zero);
  auto counterfactual = std::make_shared<CountModel>(other, zero);

  Batch batch;
  batch.input = torch::tensor({3, 1, 3, 3, 5, 0, 2, 3, 4, 3, 0, 0, 8, 9, 3, 1, 3, 2}, torch::kLong)
                    .reshape({3, 6});
  batch.attention_mask =
      torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1}, torch::kLong)
          .reshape({3, 6});
  batch.loss_mask =
      torch::tensor({0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1}, torch::kFloat)
          .reshape({3, 6});
  batch.targets = torch::zeros({3, 6}, torch::kLong);
  DivergenceOptions options;
  options.batch_size = 2;
  const auto result = divergence_token_mask(teacher, {counterfactual}, batch, options);
  const auto expected = (batch.input == 3).logical_and(batch.loss_mask != 0);
  CHECK(torch::equal(result.divergent, expected));
  CHECK(result.divergent_count == expected.sum().item<std::int64_t>());
  CHECK(result.divergent_count == 5);
  CHECK(result.positions == 13);
  CHECK(result.fraction() == Approx(5.0 / 13.0));
  CHECK(torch::equal(result.per_row, torch::tensor({2, 2, 1}, torch::kLong)));
  CHECK(torch::equal(result.loss_mask, batch.loss_mask * (1 - expected.to(torch::kFloat))));

  SECTION("a counterfactual that agrees everywhere marks nothing") {
    const auto same = divergence_token_mask(teacher, {teacher->clone()}, batch, options);
    CHECK(same.divergent_count == 0);
    CHECK(torch::equal(same.loss_mask, batch.loss_mask));
  }
  SECTION("compare_to_targets uses the data's tokens instead of the teacher") {
    batch.targets = (batch.input + 1).remainder(kVocab);  // the teacher's argmax everywhere
    batch.targets[0][4] = 2;                              // but here
    options.compare_to_targets = true;
    const auto r = divergence_token_mask(nullptr, {teacher}, batch, options);
    auto only = torch::zeros({3, 6}, torch::kBool);
    only[0][4] = true;
    CHECK(torch::equal(r.divergent, only));
  }
  SECTION("prefixes: a counterfactual prompt prepended, compared by brute force") {
    auto model = CountModel::random(kVocab, 9, 2.0);
    DivergenceOptions prefixed;
    prefixed.batch_size = 2;
    prefixed.counterfactual_prefixes = {{4, 4}};
    const auto r = divergence_token_mask(model, {model}, batch, prefixed);
    auto in = batch.input.accessor<std::int64_t, 2>();
    std::int64_t count = 0;
    for (std::int64_t b = 0; b < 3; ++b) {
      Ids seq;
      for (std::int64_t t = 0; t < 6; ++t) seq.push_back(in[b][t]);
      const Ids with_prefix = concat({4, 4}, seq);
      for (std::int64_t t = 0; t < 6; ++t) {
        if (batch.loss_mask[b][t].item<float>() == 0) continue;
        const bool differs = model->argmax_at(seq, t) != model->argmax_at(with_prefix, t + 2);
        INFO("row " << b << " position " << t);
        CHECK(r.divergent[b][t].item<bool>() == differs);
        count += differs;
      }
    }
    CHECK(r.divergent_count == count);
    CHECK(count > 0);  // the prefix changes some predictions (mix scale 2)
    auto left = batch;
    left.attention_mask = torch::ones({3, 6}, torch::kLong);
    left.attention_mask[1][0] = 0;
    CHECK_THROWS_WITH(divergence_token_mask(model, {model}, left, prefixed),
                      Contains("right-padded"));
  }
  CHECK_THROWS_WITH(divergence_token_mask(teacher, {}, batch), Contains("at least one"));
}
