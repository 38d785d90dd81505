// Data sets: completion-only masks checked position by position, truncation policies, packing
// conserving tokens and masks, seeded per-epoch shuffling as a pure function of the step, and
// the feature and noise sources.
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/distill/dataset.h"
#include "libtransfer/errors.h"

using Catch::Matchers::Contains;
using libtransfer::InvalidInput;
using libtransfer::WrongType;
using namespace libtransfer::distill;

namespace {

using Ids = std::vector<std::int64_t>;

TokenizedExample example(const Ids& prompt, const Ids& completion,
                         std::optional<std::int64_t> eos = std::nullopt) {
  TokenizeOptions options;
  options.eos_id = eos;
  return *make_example(prompt, completion, options);
}

Ids row(const torch::Tensor& t, std::int64_t r) {
  auto c = t.select(0, r).to(torch::kLong).contiguous();
  return Ids(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
}

Ids flat(const torch::Tensor& t) {
  auto c = t.reshape({-1}).to(torch::kLong).contiguous();
  return Ids(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
}

}  // namespace

TEST_CASE("collate masks the prompt and pads on the right, position by position", "[dataset]") {
  // Example 0: prompt 5 6 7, completion 8 9, EOS 1 -> tokens 5 6 7 8 9 1.
  // Example 1: prompt 2, completion 3, EOS 1     -> tokens 2 3 1.
  const std::vector<TokenizedExample> examples = {example({5, 6, 7}, {8, 9}, 1),
                                                  example({2}, {3}, 1)};
  CHECK(examples[0].completion == std::vector<std::uint8_t>{0, 0, 0, 1, 1, 1});
  CHECK(examples[0].prompt_length() == 3);
  const Batch b = collate(examples, /*pad_id=*/0);
  REQUIRE(b.input.sizes() == torch::IntArrayRef({2, 5}));
  CHECK(b.input.scalar_type() == torch::kLong);
  CHECK(b.loss_mask.scalar_type() == torch::kFloat);
  // Inputs are tokens[:-1], targets tokens[1:]; loss where the target is a completion token.
  CHECK(row(b.input, 0) == Ids{5, 6, 7, 8, 9});
  CHECK(row(b.targets, 0) == Ids{6, 7, 8, 9, 1});
  CHECK(row(b.attention_mask, 0) == Ids{1, 1, 1, 1, 1});
  CHECK(row(b.loss_mask, 0) == Ids{0, 0, 1, 1, 1});
  CHECK(row(b.input, 1) == Ids{2, 3, 0, 0, 0});
  CHECK(row(b.targets, 1) == Ids{3, 1, 0, 0, 0});
  CHECK(row(b.attention_mask, 1) == Ids{1, 1, 0, 0, 0});
  CHECK(row(b.loss_mask, 1) == Ids{1, 1, 0, 0, 0});

  SECTION("pad_to fixes the width; pad ids are configurable") {
    const Batch wide = collate(examples, 7, 8);
    CHECK(row(wide.input, 1) == Ids{2, 3, 7, 7, 7, 7, 7, 7});
    CHECK(row(wide.loss_mask, 0) == Ids{0, 0, 1, 1, 1, 0, 0, 0});
    CHECK_THROWS_WITH(collate(examples, 0, 4), Contains("pad_to = 4"));
  }
  SECTION("without EOS the last completion token is only a target") {
    const auto ex = example({4}, {5, 6});
    const Batch one = collate({ex}, 0);
    CHECK(row(one.input, 0) == Ids{4, 5});
    CHECK(row(one.targets, 0) == Ids{5, 6});
    CHECK(row(one.loss_mask, 0) == Ids{1, 1});
  }
  SECTION("bad examples are refused") {
    CHECK_THROWS_WITH(make_example({1}, {}, {}), Contains("empty completion"));
    CHECK_THROWS_WITH(make_example({}, {1}, {}), Contains("at least 2 tokens"));
    CHECK_THROWS_WITH(make_example({-3}, {1}, {}), Contains("-3"));
  }
}

TEST_CASE("truncation policies keep, cut or drop long examples as documented", "[dataset]") {
  const Ids prompt = {1, 2, 3, 4}, completion = {5, 6, 7};
  TokenizeOptions options;
  options.max_tokens = 5;
  SECTION("error names the example") {
    CHECK_THROWS_WITH(make_example(prompt, completion, options, 12),
                      Contains("example 12") && Contains("7 tokens"));
  }
  SECTION("right keeps the first max_tokens") {
    options.truncation = Truncation::kRight;
    const auto ex = *make_example(prompt, completion, options);
    CHECK(ex.tokens == Ids{1, 2, 3, 4, 5});
    CHECK(ex.completion == std::vector<std::uint8_t>{0, 0, 0, 0, 1});
    options.max_tokens = 4;
    CHECK_THROWS_WITH(make_example(prompt, completion, options), Contains("no completion"));
  }
  SECTION("left keeps the last max_tokens") {
    options.truncation = Truncation::kLeft;
    const auto ex = *make_example(prompt, completion, options);
    CHECK(ex.tokens == Ids{3, 4, 5, 6, 7});
    CHECK(ex.completion == std::vector<std::uint8_t>{0, 0, 1, 1, 1});
  }
  SECTION("drop skips") {
    options.truncation = Truncation::kDrop;
    CHECK_FALSE(make_example(prompt, completion, options).has_value());
  }
  CHECK(parse_truncation("left") == Truncation::kLeft);
  CHECK_THROWS_WITH(parse_truncation("middle"), Contains("error, right, left, drop"));
}

TEST_CASE("records tokenize prompt and completion separately", "[dataset]") {
  libtransfer::testing::TempDir dir;
  // A tiny byte-level BPE: a b c, the space symbol, and the merge "a b".
  libtransfer::testing::write_bytes(dir.file("vocab.json"),
                                    R"({"a": 0, "b": 1, "c": 2, "\u0120": 3, "ab": 4, "X": 5})");
  libtransfer::testing::write_bytes(dir.file("merges.txt"), "#version: 0.2\na b\n");
  const auto tok =
      libtransfer::io::Tokenizer::from_files(dir.file("vocab.json"), dir.file("merges.txt"));
  const std::vector<libtransfer::io::Record> records = {
      {"ab", " c", ""}, {"c", "ab c", ""}, {"a", "cccccc", ""}};
  TokenizeOptions options;
  options.eos_id = 5;
  options.max_tokens = 5;
  options.truncation = Truncation::kDrop;
  TokenizeStats stats;
  const auto examples = tokenize_records(tok, records, options, &stats);
  REQUIRE(examples.size() == 2);
  CHECK(examples[0].tokens == Ids{4, 3, 2, 5});  // "ab" | " c" | EOS
  CHECK(examples[0].completion == std::vector<std::uint8_t>{0, 1, 1, 1});
  CHECK(examples[1].tokens == Ids{2, 4, 3, 2, 5});
  CHECK(examples[1].prompt_length() == 1);
  CHECK(stats.examples == 2);
  CHECK(stats.dropped == 1);
  CHECK(stats.truncated == 0);
  CHECK_THROWS_WITH(tokenize_records(tok, {{"a", "", ""}}), Contains("record 0"));
}

TEST_CASE("packing conserves every token and every mask", "[dataset]") {
  std::vector<TokenizedExample> examples;
  for (std::int64_t i = 0; i < 7; ++i) {
    Ids prompt, completion;
    for (std::int64_t k = 0; k <= i % 3; ++k) prompt.push_back(100 + 10 * i + k);
    for (std::int64_t k = 0; k <= (i * 5) % 4; ++k) completion.push_back(200 + 10 * i + k);
    examples.push_back(example(prompt, completion, 1));
  }
  Ids stream;
  std::vector<std::uint8_t> flags;
  for (const auto& ex : examples) {
    stream.insert(stream.end(), ex.tokens.begin(), ex.tokens.end());
    flags.insert(flags.end(), ex.completion.begin(), ex.completion.end());
  }
  for (const std::int64_t L : {1, 3, 4, 16, 100}) {
    INFO("block length " << L);
    const auto blocks = pack_examples(examples, L, /*pad_id=*/0);
    const auto S = static_cast<std::int64_t>(stream.size());
    REQUIRE(blocks.size() == (S + L - 1) / L);
    const Ids in = flat(blocks.input), tg = flat(blocks.targets), at = flat(blocks.attention_mask);
    const Ids loss = flat(blocks.loss_mask);
    // Every token is an input once, in order; every token but the first a target once.
    std::int64_t real = 0, loss_positions = 0;
    for (std::size_t p = 0; p < in.size(); ++p) {
      if (at[p] == 0) {
        CHECK(in[p] == 0);
        CHECK(loss[p] == 0);
        continue;
      }
      REQUIRE(real < S);
      CHECK(in[p] == stream[real]);
      if (real + 1 < S) {
        CHECK(tg[p] == stream[real + 1]);
        CHECK(loss[p] == flags[real + 1]);
      } else {
        CHECK(loss[p] == 0);  // the stream's last token has no target
      }
      loss_positions += loss[p];
      ++real;
    }
    CHECK(real == S);
    std::int64_t completion_tokens = 0;
    for (std::size_t s = 1; s < flags.size(); ++s) completion_tokens += flags[s];
    CHECK(loss_positions == completion_tokens);
  }
  CHECK_THROWS_AS(pack_examples(examples, 0, 0), InvalidInput);
}

TEST_CASE("shuffling covers every example once per epoch and is a pure function of the step",
          "[dataset]") {
  const std::int64_t n = 23;
  ShuffleConfig config;
  config.batch_size = 5;
  config.seed = 42;
  REQUIRE(steps_per_epoch(n, config) == 5);
  std::map<std::int64_t, Ids> forward;
  for (std::int64_t step = 0; step < 15; ++step) forward[step] = batch_indices(n, config, step);
  for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
    std::multiset<std::int64_t> seen;
    for (std::int64_t s = 0; s < 5; ++s) {
      const auto& idx = forward[epoch * 5 + s];
      CHECK(idx.size() == (s < 4 ? 5u : 3u));  // last partial batch kept
      seen.insert(idx.begin(), idx.end());
    }
    std::multiset<std::int64_t> all;
    for (std::int64_t i = 0; i < n; ++i) all.insert(i);
    CHECK(seen == all);
  }
  // Epochs differ; order of calls does not matter; the permutation is the documented one.
  CHECK(forward[0] != forward[5]);
  EpochSampler sampler(n, config);
  for (const std::int64_t step : {14, 0, 7, 3, 14, 5})
    CHECK(sampler.indices(step) == forward[step]);
  const auto perm = epoch_permutation(n, 42, 2);
  CHECK(Ids(perm.begin(), perm.begin() + 5) == forward[10]);
  config.seed = 43;
  CHECK(batch_indices(n, config, 0) != forward[0]);

  SECTION("drop_last skips the partial batch") {
    config.drop_last = true;
    CHECK(steps_per_epoch(n, config) == 4);
    const auto perm1 = epoch_permutation(n, 43, 1);
    CHECK(batch_indices(n, config, 4) == Ids(perm1.begin(), perm1.begin() + 5));
    CHECK_THROWS_WITH(EpochSampler(3, config), Contains("no batch"));
  }
  SECTION("no shuffle keeps the order") {
    config.shuffle = false;
    CHECK(batch_indices(n, config, 5) == Ids{0, 1, 2, 3, 4});
  }
}

TEST_CASE("TokenDataset batches are deterministic, padded or packed", "[dataset]") {
  std::vector<TokenizedExample> examples;
  for (std::int64_t i = 0; i < 10; ++i)
    examples.push_back(example({10 + i}, Ids(1 + i % 3, 20 + i), 1));
  TokenDatasetConfig config;
  config.shuffle.batch_size = 4;
  config.shuffle.seed = 7;
  config.pad_id = 0;
  TokenDataset a(examples, config), b(examples, config);
  CHECK(a.steps_per_epoch() == 3);
  const auto later = a.batch(5);
  a.batch(0);
  CHECK(torch::equal(a.batch(5).input, later.input));
  CHECK(torch::equal(b.batch(5).loss_mask, later.loss_mask));
  // The batch holds the examples batch_indices names.
  const auto idx = batch_indices(10, config.shuffle, 5);
  std::vector<TokenizedExample> chosen;
  for (const auto i : idx) chosen.push_back(examples[i]);
  const auto expected = collate(chosen, 0);
  CHECK(torch::equal(later.input, expected.input));
  CHECK(torch::equal(later.targets, expected.targets));

  config.pack_length = 6;
  TokenDataset packed(examples, config);
  const auto blocks = pack_examples(examples, 6, 0);
  CHECK(packed.size() == blocks.size());
  const auto pb = packed.batch(1);
  CHECK(pb.input.size(1) == 6);
  const auto pidx = batch_indices(blocks.size(), config.shuffle, 1);
  CHECK(torch::equal(pb.input, blocks.input.index_select(0, torch::tensor(pidx))));
  CHECK_THROWS_AS(TokenDataset({}, config), InvalidInput);
}

TEST_CASE("TensorDataset serves shuffled feature batches", "[dataset]") {
  const std::int64_t n = 10, f = 3;
  auto features = torch::arange(n * f, torch::kFloat).reshape({n, f});
  auto labels = torch::arange(n, torch::kLong);
  ShuffleConfig config;
  config.batch_size = 4;
  config.seed = 1;
  TensorDataset data(features, labels, config);
  CHECK(data.steps_per_epoch() == 3);
  std::set<std::int64_t> seen;
  for (std::int64_t s = 3; s < 6; ++s) {
    const auto b = data.batch(s);
    CHECK_FALSE(b.attention_mask.defined());
    const auto ids = batch_indices(n, config, s);
    CHECK(flat(b.targets) == ids);
    // Row r of the input is the features of label r (pairs stay together).
    CHECK(torch::equal(b.input, features.index_select(0, b.targets)));
    seen.insert(ids.begin(), ids.end());
  }
  CHECK(seen.size() == static_cast<std::size_t>(n));
  CHECK_THROWS_AS(TensorDataset(features, labels.to(torch::kInt), config), WrongType);
  CHECK_THROWS_AS(TensorDataset(features, labels.slice(0, 0, 5), config), InvalidInput);
  CHECK_THROWS_AS(TensorDataset(labels, labels, config), WrongType);
}

TEST_CASE("NoiseSource draws seeded uniform noise in range", "[dataset]") {
  NoiseConfig config;
  config.batch_size = 256;
  config.features = 16;
  config.low = -2.0;
  config.high = 3.0;
  config.seed = 5;
  NoiseSource noise(config);
  const auto x = noise.batch(3).input;
  REQUIRE(x.sizes() == torch::IntArrayRef({256, 16}));
  CHECK(x.scalar_type() == torch::kFloat);
  CHECK(x.min().item<double>() >= -2.0);
  CHECK(x.max().item<double>() <= 3.0);
  // Uniform on [-2, 3]: mean 0.5, variance 25/12 (4096 draws: 5 standard errors of slack).
  CHECK(x.mean().item<double>() == Approx(0.5).margin(5 * std::sqrt(25.0 / 12 / 4096)));
  CHECK(x.var().item<double>() == Approx(25.0 / 12).margin(0.15));
  CHECK(torch::equal(noise.batch(3).input, x));
  CHECK_FALSE(torch::equal(noise.batch(4).input, x));
  NoiseSource same(config);
  CHECK(torch::equal(same.batch(3).input, x));
  CHECK_FALSE(noise.batch(0).targets.defined());
  config.high = -2.0;
  CHECK_THROWS_WITH(NoiseSource(config), Contains("low < high"));
}
