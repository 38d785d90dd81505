// The weight test: per-group p-values against closed forms and brute force, simulated shared and
// independent pairs, residual alignment, file sources, the permutation test, bad inputs.
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>

#include "../test_support.h"
#include "libtransfer/detect/weight_test.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"

using namespace libtransfer;
using namespace libtransfer::detect;
using models::NamedTensors;

namespace {

// A random MLP state dict: layers.<i>.weight [out, in] ~ N(0, 1/fan_in), biases small.
NamedTensors random_mlp(const std::vector<std::int64_t>& sizes, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  NamedTensors out;
  for (std::size_t i = 0; i + 1 < sizes.size(); ++i) {
    const auto p = "layers." + std::to_string(i);
    out.emplace_back(p + ".weight", torch::randn({sizes[i + 1], sizes[i]}, gen) /
                                        std::sqrt(static_cast<double>(sizes[i])));
    out.emplace_back(p + ".bias", 0.1 * torch::randn({sizes[i + 1]}, gen));
  }
  return out;
}

// A random state dict in our TransformerLM's names (no forward needed for the weight test).
NamedTensors random_transformer(std::int64_t vocab, std::int64_t d, std::int64_t layers,
                                std::int64_t d_mlp, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto w = [&](std::int64_t r, std::int64_t c) { return 0.02 * torch::randn({r, c}, gen); };
  NamedTensors out;
  out.emplace_back("embed.weight", w(vocab, d));
  for (std::int64_t i = 0; i < layers; ++i) {
    const auto p = "layers." + std::to_string(i) + ".";
    out.emplace_back(p + "attn_norm.weight", torch::ones({d}));
    for (const char* n : {"q", "k", "v", "o"})
      out.emplace_back(p + "attn." + n + ".weight", w(d, d));
    out.emplace_back(p + "mlp_norm.weight", torch::ones({d}));
    out.emplace_back(p + "mlp.gate.weight", w(d_mlp, d));
    out.emplace_back(p + "mlp.up.weight", w(d_mlp, d));
    out.emplace_back(p + "mlp.down.weight", w(d, d_mlp));
  }
  out.emplace_back("final_norm.weight", torch::ones({d}));
  out.emplace_back("head.weight", w(vocab, d));
  return out;
}

NamedTensors map_tensors(const NamedTensors& in,
                         const std::function<torch::Tensor(const std::string&, torch::Tensor)>& f) {
  NamedTensors out;
  for (const auto& [n, t] : in) out.emplace_back(n, f(n, t.clone()));
  return out;
}

torch::Tensor& at_name(NamedTensors& s, const std::string& name) {
  for (auto& [n, t] : s) {
    if (n == name) return t;
  }
  FAIL("no tensor " << name);
  throw;
}

const LayerEvidence& layer(const TestResult& r, const std::string& name) {
  for (const auto& e : r.layers) {
    if (e.name == name) return e;
  }
  FAIL("no layer " << name);
  throw;
}

// Brute force: P(rho* >= rho) over all permutations of n, rho from its definition in doubles.
double brute_force_spearman_p(const std::vector<std::int64_t>& perm) {
  const auto n = static_cast<std::int64_t>(perm.size());
  auto rho_of = [n](const std::vector<std::int64_t>& p) {
    // Pearson of (i, p(i)), written out.
    double mean = (n - 1) / 2.0, sxy = 0, sxx = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      sxy += (i - mean) * (p[i] - mean);
      sxx += (i - mean) * (i - mean);
    }
    return sxy / sxx;
  };
  const double observed = rho_of(perm);
  std::vector<std::int64_t> q(static_cast<std::size_t>(n));
  std::iota(q.begin(), q.end(), std::int64_t{0});
  double hits = 0, total = 0;
  do {
    hits += rho_of(q) >= observed - 1e-12;
    total += 1;
  } while (std::next_permutation(q.begin(), q.end()));
  return hits / total;
}

}  // namespace

TEST_CASE("fixed-point p-values are min(1, 1/K!)", "[detect][weights]") {
  CHECK(fixed_points_log10_p(0) == 0.0);
  CHECK(fixed_points_log10_p(1) == Approx(0.0).margin(1e-15));
  CHECK(fixed_points_log10_p(5) == Approx(-std::log10(120.0)).epsilon(1e-12));
  // 200! ~ 10^374.9: far beyond double range, fine in log space.
  double log10_fact = 0;
  for (int i = 2; i <= 200; ++i) log10_fact += std::log10(static_cast<double>(i));
  CHECK(fixed_points_log10_p(200) == Approx(-log10_fact).epsilon(1e-10));
  CHECK_THROWS_AS(fixed_points_log10_p(-1), InvalidInput);
}

TEST_CASE("one-sided Spearman against the identity", "[detect][weights]") {
  SECTION("exact for small n: equals brute force") {
    for (const auto& perm : std::vector<std::vector<std::int64_t>>{{1, 0},
                                                                   {0, 1},
                                                                   {2, 0, 1},
                                                                   {0, 1, 3, 2, 4},
                                                                   {4, 3, 2, 1, 0},
                                                                   {1, 0, 2, 4, 3, 5, 7, 6},
                                                                   {3, 0, 1, 2, 6, 4, 5, 8, 7}}) {
      const auto s = spearman_identity_test(perm);
      CHECK(s.exact);
      CHECK(std::pow(10.0, s.log10_p) == Approx(brute_force_spearman_p(perm)).epsilon(1e-12));
    }
  }
  SECTION("large n: the identity is floored at 1/n!, the reversal gives 1") {
    std::vector<std::int64_t> id(20);
    std::iota(id.begin(), id.end(), 0);
    auto s = spearman_identity_test(id);
    CHECK_FALSE(s.exact);
    CHECK(s.rho == 1.0);
    CHECK(s.log10_p == Approx(-std::lgamma(21.0) / std::log(10.0)));
    std::reverse(id.begin(), id.end());
    s = spearman_identity_test(id);
    CHECK(s.rho == Approx(-1.0));
    CHECK(s.log10_p == 0.0);
  }
  CHECK_THROWS_AS(spearman_identity_test({0}), InvalidInput);
  CHECK_THROWS_WITH(spearman_identity_test({0, 0, 1}), Catch::Contains("permutation"));
}

TEST_CASE("shared MLP pairs are detected, independent ones are not", "[detect][weights]") {
  const std::vector<std::int64_t> sizes = {20, 16, 16, 16, 5};
  const auto a = random_mlp(sizes, 1);
  SECTION("a copy with small noise: every group matched to itself") {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    const auto b = map_tensors(a, [&](const std::string&, torch::Tensor t) {
      return t + 0.01 * torch::randn(t.sizes(), gen);
    });
    const auto r = weight_test(a, b);
    REQUIRE(r.ran);
    REQUIRE(r.layers.size() == 3);
    for (const auto& e : r.layers) {
      CHECK(e.units == 16);
      CHECK(e.statistic == 16.0);
      CHECK(e.matched_fraction == 1.0);
      CHECK(e.log10_p == Approx(fixed_points_log10_p(16)));
    }
    CHECK(r.log10_p < -20.0);
    CHECK_THAT(r.method, Catch::Contains("fisher over 3 groups"));
  }
  SECTION("one hidden group re-initialized: its p is large, the pair still detected") {
    auto b = map_tensors(a, [](const std::string&, torch::Tensor t) { return t; });
    auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
    // Group layers.1 = rows of W1 (+ bias) and columns of W2: re-initialize all three.
    at_name(b, "layers.1.weight") = torch::randn({16, 16}, gen) / 4.0;
    at_name(b, "layers.1.bias") = 0.1 * torch::randn({16}, gen);
    at_name(b, "layers.2.weight") = torch::randn({16, 16}, gen) / 4.0;
    const auto r = weight_test(a, b);
    CHECK(layer(r, "layers.1").log10_p > -2.0);
    CHECK(layer(r, "layers.0").log10_p < -5.0);
    CHECK(r.log10_p < -2.0);
  }
  SECTION("Spearman statistic on the noisy copy") {
    const auto b = map_tensors(a, [](const std::string&, torch::Tensor t) { return t * 1.01; });
    WeightTestOptions options;
    options.statistic = WeightStatistic::kSpearman;
    const auto r = weight_test(a, b, options);
    for (const auto& e : r.layers) {
      CHECK(e.statistic == Approx(1.0));
      CHECK(e.statistic_name == "spearman");
    }
    CHECK(r.log10_p < -20.0);
  }
  SECTION("independent seeds: no evidence") {
    const auto b = random_mlp(sizes, 2);
    const auto r = weight_test(a, b);
    CHECK(r.log10_p > -2.0);
  }
  SECTION("greedy solver agrees on a shared pair") {
    WeightTestOptions options;
    options.solver = AssignmentSolver::kGreedy;
    const auto r = weight_test(a, a, options);
    for (const auto& e : r.layers) CHECK(e.matched_fraction == 1.0);
  }
}

TEST_CASE("fixed-point p-values are super-uniform over independent pairs", "[detect][weights]") {
  // P(p <= alpha) <= alpha for the combined p (Fisher over conservative p-values is conservative).
  int below_10 = 0, below_5 = 0;
  const int pairs = 60;
  for (int k = 0; k < pairs; ++k) {
    const auto r = weight_test(random_mlp({12, 10, 10, 4}, 1000 + 2 * k),
                               random_mlp({12, 10, 10, 4}, 1001 + 2 * k));
    below_10 += r.log10_p <= std::log10(0.1);
    below_5 += r.log10_p <= std::log10(0.05);
  }
  // Binomial(60, 0.1): P(X >= 13) < 0.01.
  CHECK(below_10 <= 12);
  CHECK(below_5 <= 9);
}

TEST_CASE("transformers: heads and GLU units; residual alignment", "[detect][weights]") {
  const auto a = random_transformer(64, 16, 2, 24, 3);
  WeightTestOptions options;
  options.n_heads = 4;
  SECTION("noisy copy: every group and the residual basis detected") {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
    const auto b = map_tensors(a, [&](const std::string&, torch::Tensor t) {
      return t + 0.002 * torch::randn(t.sizes(), gen);
    });
    const auto r = weight_test(a, b, options);
    REQUIRE(r.layers.size() == 5);
    CHECK(r.layers[0].kind == "residual_basis");
    CHECK(layer(r, "layers.0.attn.heads").units == 4);
    CHECK(layer(r, "layers.0.attn.heads").matched_fraction == 1.0);
    CHECK(layer(r, "layers.1.mlp").kind == "glu_hidden");
    CHECK(layer(r, "layers.1.mlp").matched_fraction == 1.0);
    CHECK(r.log10_p < -20.0);
  }
  SECTION("a copy with a permuted residual basis: found with alignment, not without") {
    // A permutation without fixed points (fixed residual dimensions would leave a partial
    // signal that the plain test can pick up, as it should): a random cyclic shift.
    const auto shuffle =
        torch::randperm(16, at::make_generator<at::CPUGeneratorImpl>(11), torch::kLong);
    auto perm = torch::empty({16}, torch::kLong);
    for (std::int64_t i = 0; i < 16; ++i)
      perm[shuffle[i].item<std::int64_t>()] = shuffle[(i + 1) % 16];
    // Residual axes: columns of embed/head/q/k/v/gate/up, rows of o/down, entries of norms.
    const auto b = map_tensors(a, [&](const std::string& n, torch::Tensor t) {
      const bool rows = n.find("attn.o.") != std::string::npos ||
                        n.find("mlp.down.") != std::string::npos || t.dim() == 1;
      return t.index_select(rows ? 0 : 1, perm);
    });
    const auto plain = weight_test(a, b, options);
    options.align_embeddings = true;
    const auto aligned = weight_test(a, b, options);
    CHECK(plain.log10_p > -2.0);
    CHECK(aligned.log10_p < -20.0);
    CHECK_THAT(aligned.layers[0].note, Catch::Contains("aligned"));
    CHECK(layer(aligned, "layers.1.mlp").matched_fraction == 1.0);
  }
  SECTION("without the head count the attention groups are skipped with a note") {
    const auto r = weight_test(a, a);
    CHECK_THAT(layer(r, "layers.0.attn.heads").note, Catch::Contains("skipped"));
    CHECK(layer(r, "layers.0.mlp").matched_fraction == 1.0);
  }
}

TEST_CASE("bad inputs give messages naming what is wrong", "[detect][weights]") {
  const auto a = random_mlp({8, 6, 6, 3}, 1);
  SECTION("missing tensor, with similar names and the mapping hint") {
    NamedTensors b;
    for (const auto& [n, t] : a) b.emplace_back(n == "layers.1.weight" ? "layer.1.w" : n, t);
    CHECK_THROWS_WITH(weight_test(a, b), Catch::Contains("no tensor 'layers.1.weight'") &&
                                             Catch::Contains("'layer.1.w'") &&
                                             Catch::Contains("mapping"));
    WeightTestOptions options;
    options.mapping = {{"layers.1.weight", "layer.1.w"}};
    CHECK(weight_test(a, b, options).layers.size() == 2);
    options.mapping = {{"nope", "x"}};
    CHECK_THROWS_WITH(weight_test(a, a, options),
                      Catch::Contains("mapping") && Catch::Contains("'nope'"));
  }
  SECTION("shape mismatch names the tensor and both shapes") {
    const auto b = random_mlp({8, 7, 6, 3}, 2);
    CHECK_THROWS_WITH(weight_test(a, b), Catch::Contains("'layers.0.weight'") &&
                                             Catch::Contains("[6, 8]") &&
                                             Catch::Contains("[7, 8]"));
  }
  SECTION("non-finite weights: tensor and count") {
    auto b = map_tensors(a, [](const std::string&, torch::Tensor t) { return t; });
    auto& w = at_name(b, "layers.1.weight");
    w[0][0] = NAN;
    w[1][2] = INFINITY;
    CHECK_THROWS_WITH(weight_test(a, b), Catch::Contains("'layers.1.weight' of model B") &&
                                             Catch::Contains("2 non-finite"));
  }
  SECTION("no 2-D weight; nothing testable") {
    const NamedTensors flat = {{"x", torch::ones({4})}};
    CHECK_THROWS_WITH(weight_test(flat, flat), Catch::Contains("no 2-D floating weight"));
    const NamedTensors thin = {{"a.weight", torch::ones({1, 4})},
                               {"b.weight", torch::ones({3, 1})}};
    CHECK_THROWS_WITH(weight_test(thin, thin), Catch::Contains("nothing testable"));
  }
  SECTION("options") {
    WeightTestOptions options;
    options.align_embeddings = true;
    CHECK_THROWS_WITH(weight_test(a, a, options), Catch::Contains("embedding"));
    CHECK_THROWS_AS(parse_weight_statistic("median"), InvalidInput);
    CHECK_THROWS_AS(parse_assignment_solver("fast"), InvalidInput);
    WeightTestOptions wrong_dtype;
    wrong_dtype.compute_dtype = torch::kHalf;
    CHECK_THROWS_AS(weight_test(a, a, wrong_dtype), WrongType);
  }
}

TEST_CASE("safetensors sources read lazily and give the same result", "[detect][weights]") {
  libtransfer::testing::TempDir dir("weights_test");
  const auto a = random_mlp({10, 8, 8, 3}, 4);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const auto b = map_tensors(a, [&](const std::string&, torch::Tensor t) {
    return t + 0.05 * torch::randn(t.sizes(), gen);
  });
  auto write = [&](const NamedTensors& s, const std::string& path, torch::ScalarType dtype) {
    std::vector<torch::Tensor> keep;
    std::vector<io::TensorView> views;
    const auto code = dtype == torch::kBFloat16 ? io::Dtype::kBF16
                      : dtype == torch::kHalf   ? io::Dtype::kF16
                                                : io::Dtype::kF32;
    for (const auto& [n, t] : s) {
      keep.push_back(t.to(dtype).contiguous());
      views.push_back({n, code, t.sizes().vec(), keep.back().data_ptr(),
                       static_cast<std::uint64_t>(keep.back().nbytes())});
    }
    io::write_safetensors(path, views);
  };
  for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    write(a, dir.file("a.safetensors"), dtype);
    write(b, dir.file("b.safetensors"), dtype);
    const auto from_files = weight_test(*state_from_safetensors({dir.file("a.safetensors")}),
                                        *state_from_safetensors({dir.file("b.safetensors")}));
    // The same tensors, rounded through the file dtype, as in-memory state dicts.
    auto rounded = [&](const NamedTensors& s) {
      return map_tensors(
          s, [&](const std::string&, torch::Tensor t) { return t.to(dtype).to(torch::kFloat); });
    };
    const auto in_memory = weight_test(rounded(a), rounded(b));
    REQUIRE(from_files.layers.size() == in_memory.layers.size());
    for (std::size_t i = 0; i < in_memory.layers.size(); ++i) {
      CHECK(from_files.layers[i].statistic == in_memory.layers[i].statistic);
    }
    CHECK(from_files.log10_p == Approx(in_memory.log10_p));
  }
  SECTION("a missing file is a FileError") {
    CHECK_THROWS_AS(state_from_safetensors({dir.file("none.safetensors")}), FileError);
  }
}

TEST_CASE("the permutation test: exact p-values, seeded, any statistic", "[detect][weights]") {
  const auto a = random_mlp({12, 10, 10, 4}, 21);
  const auto source_a = state_from_tensors(a);
  PermutationTestOptions options;
  options.permutations = 99;
  SECTION("a shared pair reaches the smallest possible p, 1/(T+1)") {
    const auto r = weight_permutation_test(*source_a, *source_a, options);
    CHECK(r.log10_p == Approx(std::log10(1.0 / 100.0)));
    CHECK(r.statistic == Approx(1.0));
    REQUIRE(r.layers.size() == 2);
    options.statistic = PermutationStatistic::kMatchedSimilarity;
    const auto m = weight_permutation_test(*source_a, *source_a, options);
    CHECK(m.log10_p == Approx(std::log10(1.0 / 100.0)));
  }
  SECTION("same seed, same result; independent pair not significant") {
    const auto source_b = state_from_tensors(random_mlp({12, 10, 10, 4}, 22));
    options.seed = 5;
    const auto r1 = weight_permutation_test(*source_a, *source_b, options);
    const auto r2 = weight_permutation_test(*source_a, *source_b, options);
    CHECK(r1.log10_p == r2.log10_p);
    CHECK(r1.log10_p > std::log10(0.01));
  }
  SECTION("a custom statistic sees permuted A and B under A's names") {
    int calls = 0;
    options.custom = [&](const NamedTensors& x, const NamedTensors& y) {
      ++calls;
      CHECK(x.size() == y.size());
      // Negative squared distance of the first hidden layer's weights.
      return -(x[0].second - y[0].second).pow(2).sum().item<double>();
    };
    const auto r = weight_permutation_test(*source_a, *source_a, options);
    CHECK(calls == 100);
    CHECK(r.log10_p == Approx(std::log10(1.0 / 100.0)));
    CHECK(r.layers.empty());
  }
  SECTION("bad permutation count") {
    options.permutations = 0;
    CHECK_THROWS_WITH(weight_permutation_test(*source_a, *source_a, options),
                      Catch::Contains("permutations"));
  }
}

namespace {

// Brute force: P(K >= k) for the fixed points K of a uniform permutation of n.
double brute_force_fixed_points_tail(std::int64_t k, std::int64_t n) {
  std::vector<std::int64_t> q(static_cast<std::size_t>(n));
  std::iota(q.begin(), q.end(), std::int64_t{0});
  double hits = 0, total = 0;
  do {
    std::int64_t fixed = 0;
    for (std::int64_t i = 0; i < n; ++i) fixed += q[i] == i;
    hits += fixed >= k;
    total += 1;
  } while (std::next_permutation(q.begin(), q.end()));
  return hits / total;
}

// Fisher's combination written out: X = -2 sum ln p ~ chi2(2L), sf(x) = e^{-x/2} sum_{i<L}
// (x/2)^i / i!. Returns log10 of the combined p.
double fisher_log10_by_hand(const std::vector<double>& log10_p) {
  double x = 0;
  for (const double l : log10_p) x += -2.0 * l * std::log(10.0);
  double term = 1.0, sum = 0.0;
  for (std::size_t i = 0; i < log10_p.size(); ++i) {
    if (i > 0) term *= (x / 2.0) / static_cast<double>(i);
    sum += term;
  }
  return (-x / 2.0 + std::log(sum)) / std::log(10.0);
}

// A permutation of n without fixed points (random cyclic order), seeded.
torch::Tensor derangement(std::int64_t n, std::uint64_t seed) {
  const auto shuffle =
      torch::randperm(n, at::make_generator<at::CPUGeneratorImpl>(seed), torch::kLong);
  auto perm = torch::empty({n}, torch::kLong);
  for (std::int64_t i = 0; i < n; ++i) {
    perm[shuffle[i].item<std::int64_t>()] = shuffle[(i + 1) % n];
  }
  return perm;
}

// B = A with the hidden units of every layer permuted (the function is unchanged).
NamedTensors permute_mlp_hidden(const NamedTensors& a, std::int64_t layers, std::uint64_t seed) {
  NamedTensors b = map_tensors(a, [](const std::string&, torch::Tensor t) { return t; });
  for (std::int64_t l = 0; l + 1 < layers; ++l) {
    const auto p = "layers." + std::to_string(l);
    const auto next = "layers." + std::to_string(l + 1) + ".weight";
    const auto perm = derangement(at_name(b, p + ".weight").size(0), seed + l);
    at_name(b, p + ".weight") = at_name(b, p + ".weight").index_select(0, perm);
    at_name(b, p + ".bias") = at_name(b, p + ".bias").index_select(0, perm);
    at_name(b, next) = at_name(b, next).index_select(1, perm);
  }
  return b;
}

}  // namespace

TEST_CASE("fixed-point tail P(K >= k) is exact", "[detect][weights][agreement]") {
  for (std::int64_t n = 1; n <= 7; ++n) {
    for (std::int64_t k = 0; k <= n; ++k) {
      CHECK(std::pow(10.0, fixed_points_tail_log10_p(k, n)) ==
            Approx(brute_force_fixed_points_tail(k, n)).epsilon(1e-12));
    }
  }
  // K = n is the identity alone: 1/n!, far below what a double holds for n = 300.
  CHECK(fixed_points_tail_log10_p(300, 300) ==
        Approx(-std::lgamma(301.0) / std::log(10.0)).epsilon(1e-12));
  // Large n: K is Poisson(1) in the limit, P(K >= 2) -> 1 - 2/e.
  CHECK(std::pow(10.0, fixed_points_tail_log10_p(2, 5000)) ==
        Approx(1.0 - 2.0 / std::exp(1.0)).epsilon(1e-9));
  CHECK_THROWS_AS(fixed_points_tail_log10_p(5, 4), InvalidInput);
}

TEST_CASE("solver auto: exact up to the threshold, greedy above", "[detect][weights]") {
  const auto a = random_mlp({12, 16, 16, 4}, 7);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const auto b = map_tensors(a, [&](const std::string&, torch::Tensor t) {
    return t + 0.01 * torch::randn(t.sizes(), gen);
  });
  WeightTestOptions options;
  CHECK(options.solver == AssignmentSolver::kAuto);  // the default
  CHECK(options.auto_exact_max_units == 4096);
  SECTION("below the threshold: exact") {
    options.auto_exact_max_units = 16;
    const auto r = weight_test(a, b, options);
    for (const auto& e : r.layers) CHECK(e.note == "exact assignment");
    CHECK_THAT(r.method, Catch::Contains("auto assignment (exact up to 16 units)"));
  }
  SECTION("above the threshold: greedy, named in the note, same matching on a shared pair") {
    options.auto_exact_max_units = 15;
    const auto r = weight_test(a, b, options);
    for (const auto& e : r.layers) {
      CHECK(e.note == "greedy assignment (auto: 16 units > 15)");
      CHECK(e.matched_fraction == 1.0);
    }
  }
  SECTION("explicit solvers and names") {
    options.solver = parse_assignment_solver("greedy");
    CHECK(weight_test(a, b, options).layers[0].note == "greedy assignment");
    CHECK(resolve_solver(AssignmentSolver::kAuto, 4097) == AssignmentSolver::kGreedy);
    CHECK(resolve_solver(AssignmentSolver::kAuto, 4096) == AssignmentSolver::kExact);
    CHECK(resolve_solver(AssignmentSolver::kExact, 10, 1) == AssignmentSolver::kExact);
    CHECK(parse_assignment_solver("auto") == AssignmentSolver::kAuto);
    CHECK_THROWS_WITH(parse_assignment_solver("hungarian"), Catch::Contains("'auto'"));
    options.auto_exact_max_units = 0;
    CHECK_THROWS_WITH(weight_test(a, b, options), Catch::Contains("auto_exact_max_units"));
  }
}

TEST_CASE("agreement detects copies whose hidden units were permuted",
          "[detect][weights][agreement]") {
  SECTION("MLP: identity statistics see nothing, agreement p < 1e-10 per layer") {
    const auto a = random_mlp({20, 16, 16, 16, 5}, 21);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(22);
    const auto b =
        map_tensors(permute_mlp_hidden(a, 4, 100), [&](const std::string&, torch::Tensor t) {
          return t + 0.01 * torch::randn(t.sizes(), gen);
        });
    const auto plain = weight_test(a, b);
    // B's units live in B's permuted neighbouring bases: the identity matching is noise.
    CHECK(plain.log10_p > -2.0);
    WeightTestOptions options;
    options.statistic = WeightStatistic::kAgreement;
    const auto r = weight_test(a, b, options);
    REQUIRE(r.layers.size() == 3);
    std::vector<double> per_layer;
    for (const auto& e : r.layers) {
      CHECK(e.statistic_name == "agreement");
      CHECK(e.statistic == 16.0);
      CHECK(e.log10_p == Approx(-std::lgamma(17.0) / std::log(10.0)).epsilon(1e-9));
      CHECK(e.log10_p < -10.0);
      CHECK_THAT(e.note, Catch::Contains("forward"));
      per_layer.push_back(e.log10_p);
    }
    CHECK(r.log10_p == Approx(fisher_log10_by_hand(per_layer)).epsilon(1e-9));
    CHECK(r.method.rfind("approximate null: ", 0) == 0);

    // robust: both families, Bonferroni over the two Fisher p-values.
    WeightTestOptions robust;
    robust.robust = true;
    const auto both = weight_test(a, b, robust);
    REQUIRE(both.layers.size() == 6);
    CHECK(both.layers[0].statistic_name == "fixed_points");
    CHECK(both.layers[3].statistic_name == "agreement");
    CHECK(both.statistic_name == "bonferroni");
    CHECK(both.log10_p == Approx(std::log10(2.0) + fisher_log10_by_hand(per_layer)).epsilon(1e-9));
    CHECK(both.method.rfind("approximate null: ", 0) == 0);
  }
  SECTION("independent MLPs: no agreement evidence") {
    WeightTestOptions options;
    options.statistic = parse_weight_statistic("agreement");
    const auto r =
        weight_test(random_mlp({20, 16, 16, 5}, 31), random_mlp({20, 16, 16, 5}, 32), options);
    CHECK(r.log10_p > -2.0);
  }
  SECTION("transformer: permuted residual basis, hidden units and heads, aligned embeddings") {
    const std::int64_t d = 16, d_mlp = 24, heads = 4, dh = d / heads;
    const auto a = random_transformer(64, d, 2, d_mlp, 3);
    const auto residual = derangement(d, 41);
    const auto head_perm = derangement(heads, 42);
    // Head h of B is head head_perm[h] of A: rows/columns h*dh..(h+1)*dh move together.
    const auto head_rows = (head_perm.unsqueeze(1) * dh + torch::arange(dh).unsqueeze(0)).flatten();
    auto b = map_tensors(a, [&](const std::string& n, torch::Tensor t) {
      const bool rows = n.find("attn.o.") != std::string::npos ||
                        n.find("mlp.down.") != std::string::npos || t.dim() == 1;
      return t.index_select(rows ? 0 : 1, residual);
    });
    for (int l = 0; l < 2; ++l) {
      const auto p = "layers." + std::to_string(l) + ".";
      const auto hidden = derangement(d_mlp, 50 + l);
      for (const char* n : {"mlp.gate.weight", "mlp.up.weight"})
        at_name(b, p + n) = at_name(b, p + n).index_select(0, hidden);
      at_name(b, p + "mlp.down.weight") = at_name(b, p + "mlp.down.weight").index_select(1, hidden);
      for (const char* n : {"attn.q.weight", "attn.k.weight", "attn.v.weight"})
        at_name(b, p + n) = at_name(b, p + n).index_select(0, head_rows);
      at_name(b, p + "attn.o.weight") = at_name(b, p + "attn.o.weight").index_select(1, head_rows);
    }
    WeightTestOptions options;
    options.n_heads = heads;
    options.align_embeddings = true;
    const auto plain = weight_test(a, b, options);
    CHECK(plain.log10_p == Approx(0.0).margin(1e-12));  // aligned, but hidden units deranged
    options.statistic = WeightStatistic::kAgreement;
    const auto r = weight_test(a, b, options);
    CHECK(r.log10_p < -10.0);
    CHECK(layer(r, "layers.0.mlp").statistic == d_mlp);
    CHECK_THAT(layer(r, "layers.0.mlp").note, Catch::Contains("gate rows vs up rows"));
    CHECK(layer(r, "layers.1.attn.heads").statistic == heads);
    CHECK_THAT(layer(r, "layers.1.attn.heads").note, Catch::Contains("q,k rows vs v rows,o"));
    CHECK_THAT(r.layers[0].note, Catch::Contains("aligned"));
  }
  SECTION("explicit groups: agreement is skipped with a note") {
    const auto a = random_mlp({8, 6, 3}, 61);
    WeightTestOptions options;
    options.statistic = WeightStatistic::kAgreement;
    options.groups = {
        UnitGroup{"h", "custom", 0, {{"layers.0.weight", 0}, {"layers.1.weight", 1}}, ""}};
    CHECK_THROWS_WITH(weight_test(a, a, options), Catch::Contains("nothing testable"));
    options.robust = true;
    options.statistic = WeightStatistic::kFixedPoints;
    const auto r = weight_test(a, a, options);
    REQUIRE(r.layers.size() == 2);
    CHECK_THAT(r.layers[1].note, Catch::Contains("skipped: agreement needs"));
    CHECK(r.method.rfind("fisher over 1 groups", 0) == 0);  // identity family alone
  }
}

TEST_CASE("agreement is calibrated at initialization for transformer blocks",
          "[detect][weights][agreement]") {
  // Independent random-init transformers: each GLU/head agreement count has the fixed-point law,
  // so P(p <= alpha) <= alpha for the combined p; mean agreements per group is 1.
  WeightTestOptions options;
  options.n_heads = 4;
  options.statistic = WeightStatistic::kAgreement;
  const int pairs = 60;
  int below_10 = 0, below_5 = 0, groups = 0;
  double agreements = 0;
  for (int k = 0; k < pairs; ++k) {
    const auto r = weight_test(random_transformer(32, 16, 2, 24, 500 + 2 * k),
                               random_transformer(32, 16, 2, 24, 501 + 2 * k), options);
    below_10 += r.log10_p <= std::log10(0.1);
    below_5 += r.log10_p <= std::log10(0.05);
    for (const auto& e : r.layers) {
      if (e.statistic_name != "agreement") continue;
      agreements += e.statistic;
      ++groups;
    }
  }
  CHECK(groups == 4 * pairs);
  CHECK(std::fabs(agreements / groups - 1.0) < 3.5 / std::sqrt(static_cast<double>(groups)));
  // Binomial(60, 0.1): P(X >= 13) < 0.01; Binomial(60, 0.05): P(X >= 9) < 0.01.
  CHECK(below_10 <= 12);
  CHECK(below_5 <= 8);
}
