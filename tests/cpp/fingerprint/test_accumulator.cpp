// The fingerprint accumulator against a naive double-precision loop written here; merge; save/load.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "libtransfer/fingerprint/accumulator.h"

namespace fp = libtransfer::fingerprint;

namespace {

// The fused kernel's per-position terms are float32 arithmetic (see the Python test): 2e-6 of the
// largest magnitude; float64 backends: 1e-10.
constexpr double kFloatTolerance = 2e-6;
constexpr double kMergeTolerance = 1e-12;

struct Naive {
  std::vector<double> sum_delta, sum_sq, sum_grad;
  double kl_tr = 0, kl_rt = 0;
};

// Straight from the definition: log_softmax per row in double, then the sums.
Naive naive(const torch::Tensor& teacher, const torch::Tensor& reference, double tau) {
  const auto t = teacher.to(torch::kDouble).contiguous(),
             r = reference.to(torch::kDouble).contiguous();
  const int64_t rows = t.size(0), vocab = t.size(1);
  Naive out{std::vector<double>(vocab), std::vector<double>(vocab), std::vector<double>(vocab)};
  for (int64_t i = 0; i < rows; ++i) {
    const double* a = t.data_ptr<double>() + i * vocab;
    const double* b = r.data_ptr<double>() + i * vocab;
    double za = 0, zb = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      za += std::exp(a[v] / tau);
      zb += std::exp(b[v] / tau);
    }
    for (int64_t v = 0; v < vocab; ++v) {
      const double la = a[v] / tau - std::log(za), lb = b[v] / tau - std::log(zb);
      out.sum_delta[v] += la - lb;
      out.sum_sq[v] += (la - lb) * (la - lb);
      out.sum_grad[v] += std::exp(la) - std::exp(lb);
      out.kl_tr += std::exp(la) * (la - lb);
      out.kl_rt += std::exp(lb) * (lb - la);
    }
  }
  return out;
}

void require_close(const torch::Tensor& actual, const std::vector<double>& expected, double tol,
                   double floor) {
  double scale = floor;
  for (double e : expected) scale = std::max(scale, std::abs(e));
  for (size_t v = 0; v < expected.size(); ++v) {
    INFO("index " << v);
    REQUIRE(std::abs(actual[v].item<double>() - expected[v]) <= tol * scale);
  }
}

}  // namespace

TEST_CASE("the accumulator's sums match a naive double loop", "[accumulator]") {
  torch::manual_seed(7);
  const double tau = 0.8;
  for (const int64_t vocab : {1, 5, 8, 9, 600}) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble}) {
      const auto t = (torch::randn({11, vocab}) * 2).to(dtype);
      const auto r = (t.to(torch::kFloat) + torch::randn({11, vocab})).to(dtype);
      const auto expected = naive(t, r, tau);
      for (const auto backend : {fp::Backend::kAuto, fp::Backend::kScalar}) {
        INFO("V=" << vocab << " dtype " << dtype << " backend " << static_cast<int>(backend));
        fp::AccumulatorOptions options;
        options.temperature = tau;
        options.backend = backend;
        fp::Accumulator acc(vocab, options);
        acc.update(t, r);
        const auto state = acc.state();
        const double tol = backend == fp::Backend::kAuto ? kFloatTolerance : 1e-10;
        require_close(state.at("sum_delta"), expected.sum_delta, tol, 11.0);
        require_close(state.at("sum_delta_sq"), expected.sum_sq, tol, 11.0);
        require_close(state.at("sum_grad"), expected.sum_grad, tol, 11.0);
        REQUIRE(state.at("sum_kl_teacher_reference").item<double>() ==
                Approx(expected.kl_tr).margin(tol * 11));
        REQUIRE(state.at("sum_kl_reference_teacher").item<double>() ==
                Approx(expected.kl_rt).margin(tol * 11));
        REQUIRE(acc.positions() == 11);
      }
    }
  }
}

TEST_CASE("merging shards equals one pass over the union", "[accumulator]") {
  torch::manual_seed(3);
  fp::AccumulatorOptions options;
  options.subset = {2, 40, 7};
  const auto t = torch::randn({30, 50}), r = torch::randn({30, 50});
  const auto ids = torch::div(torch::arange(30, torch::kLong), 4, "floor");
  fp::Accumulator whole(50, options), a(50, options), b(50, options);
  whole.update(t, r, {}, ids);
  a.update(t.slice(0, 0, 13), r.slice(0, 0, 13), {}, ids.slice(0, 0, 13));
  b.update(t.slice(0, 13), r.slice(0, 13), {}, ids.slice(0, 13));
  b.merge(a);
  const auto x = b.finalize(), y = whole.finalize();
  REQUIRE(torch::allclose(x.mean_log_ratio, y.mean_log_ratio, kMergeTolerance, 1e-14));
  REQUIRE(torch::allclose(x.sequence_centered, y.sequence_centered, kMergeTolerance, 1e-14));
  REQUIRE(torch::equal(x.sequence_counts, y.sequence_counts));
  fp::Accumulator other(51, options);
  REQUIRE_THROWS_WITH(b.merge(other), Catch::Contains("V=50") && Catch::Contains("V=51"));
}

TEST_CASE("save and load round-trip the state exactly and reject other vocabularies",
          "[accumulator]") {
  fp::AccumulatorOptions options;
  options.subset = {1, 3};
  options.temperature = 1.0 / 3.0;
  fp::Accumulator acc(16, options);
  acc.update(torch::randn({2, 3, 16}), torch::randn({2, 3, 16}));
  const std::string path = "test_accumulator_round_trip.safetensors";
  acc.save(path, {{"tokenizer_hash", "h1"}});
  std::map<std::string, std::string> metadata;
  const auto loaded = fp::Accumulator::load(path, &metadata, 16, std::string("h1"));
  REQUIRE(metadata.at("format") == fp::kAccumulatorFormat);
  REQUIRE(loaded.temperature() == options.temperature);
  for (const auto& [name, tensor] : acc.state()) {
    INFO(name);
    REQUIRE(torch::equal(loaded.state().at(name), tensor));
  }
  REQUIRE_THROWS_WITH(fp::Accumulator::load(path, nullptr, 17),
                      Catch::Contains("another vocabulary"));
  REQUIRE_THROWS_WITH(fp::Accumulator::load(path, nullptr, {}, std::string("h2")),
                      Catch::Contains("tokenizer_hash=h1, expected h2"));
  std::remove(path.c_str());
}

TEST_CASE("the fused kernel matches the float64 loop on offset, masked-style and huge logits",
          "[accumulator]") {
  torch::manual_seed(11);
  // V = 1029: three 512-element chunks and a partial last vector; 11 rows: blocks of 4, 4 and 3.
  const int64_t rows = 11, vocab = 1029;
  auto t = torch::randn({rows, vocab}) * 3 + 40;  // teacher and reference offsets differ
  auto r = torch::randn({rows, vocab}) * 3 - 25;
  t.index_put_({torch::indexing::Slice(), torch::indexing::Slice(100, 110)}, -1e4);  // masked ids
  r.index_put_({torch::indexing::Slice(), torch::indexing::Slice(500, 520)}, -1e4);
  t[3] = torch::randn({vocab}) * 1e30;  // finite but far beyond any sane logit
  r[3] = torch::randn({vocab}) * 1e30;
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    INFO("dtype " << dtype);
    const auto tt = t.to(dtype), rr = r.to(dtype);
    fp::AccumulatorOptions fused, scalar;
    fused.temperature = scalar.temperature = 0.9;
    scalar.backend = fp::Backend::kScalar;
    fp::Accumulator a(vocab, fused), b(vocab, scalar);
    a.update(tt, rr);
    b.update(tt, rr);
    const auto x = a.state(), y = b.state();
    for (const char* key : {"sum_delta", "sum_delta_sq", "sum_grad", "sum_kl_teacher_reference",
                            "sum_kl_reference_teacher"}) {
      INFO(key);
      const double scale = std::max(y.at(key).abs().max().item<double>(), double(rows));
      REQUIRE((x.at(key) - y.at(key)).abs().max().item<double>() <= kFloatTolerance * scale);
    }
  }
}

TEST_CASE("the fused kernel adds each row the same way whatever block or update it falls in",
          "[accumulator]") {
  torch::manual_seed(12);
  const int64_t rows = 9, vocab = 700;
  const auto t = torch::randn({rows, vocab}) * 2, r = torch::randn({rows, vocab}) * 2;
  fp::Accumulator whole(vocab), single(vocab);
  whole.update(t, r);
  for (int64_t i = rows - 1; i >= 0; --i) {  // reversed, one row per update: blocks of 1
    single.update(t.slice(0, i, i + 1), r.slice(0, i, i + 1));
  }
  const auto x = whole.state(), y = single.state();
  for (const char* key : {"sum_delta", "sum_delta_sq", "sum_grad", "sum_kl_teacher_reference"}) {
    INFO(key);
    REQUIRE(torch::allclose(x.at(key), y.at(key), kMergeTolerance,
                            kMergeTolerance * y.at(key).abs().max().item<double>()));
  }
}

TEST_CASE("the fused kernel gives the same sums on two threads as on one", "[accumulator]") {
  torch::manual_seed(13);
  const int64_t rows = 64, vocab = 8200;  // enough work to split across threads
  const auto t = torch::randn({rows, vocab}) * 2, r = torch::randn({rows, vocab}) * 2;
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  fp::Accumulator one(vocab);
  one.update(t, r);
  at::set_num_threads(2);
  fp::Accumulator two(vocab);
  two.update(t, r);
  // A non-finite value in the second thread's rows: an error naming the row, or skipped.
  auto bad = t.clone();
  bad[rows - 3][5] = std::numeric_limits<float>::quiet_NaN();
  fp::Accumulator raising(vocab);
  REQUIRE_THROWS_WITH(raising.update(bad, r),
                      Catch::Contains("scored row " + std::to_string(rows - 3)));
  REQUIRE(raising.positions() == 0);
  fp::AccumulatorOptions skip;
  skip.skip_nonfinite = true;
  fp::Accumulator skipping(vocab, skip);
  skipping.update(bad, r);
  at::set_num_threads(saved);
  REQUIRE(skipping.positions() == rows - 1);
  REQUIRE(skipping.skipped_nonfinite() == 1);
  const auto x = one.state(), y = two.state();
  for (const char* key : {"sum_delta", "sum_delta_sq", "sum_grad", "sum_kl_teacher_reference"}) {
    INFO(key);
    REQUIRE(torch::allclose(x.at(key), y.at(key), kMergeTolerance,
                            kMergeTolerance * y.at(key).abs().max().item<double>()));
  }
}
