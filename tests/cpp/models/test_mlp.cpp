// The auxiliary-logit MLP: forward against an independent float64 formula, the paper's seeded
// initialization, hidden activations, save/load round trips and state-dict errors.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/mlp.h"
#include "libtransfer/models/model.h"

using libtransfer::InvalidInput;
using libtransfer::WrongType;
using namespace libtransfer::models;

namespace {

torch::Tensor param(Model& model, const std::string& name) {
  for (auto& [n, t] : model.named_parameters()) {
    if (n == name) return t;
  }
  FAIL("no parameter " << name);
  return {};
}

// relu(x W0^T + b0) ... written out with matmuls in float64.
std::vector<torch::Tensor> reference_layers(Model& model, const torch::Tensor& x, size_t layers) {
  std::vector<torch::Tensor> out;
  auto h = x.to(torch::kDouble);
  for (size_t i = 0; i < layers; ++i) {
    const auto w =
        param(model, "layers." + std::to_string(i) + ".weight").detach().to(torch::kDouble);
    const auto b =
        param(model, "layers." + std::to_string(i) + ".bias").detach().to(torch::kDouble);
    h = torch::mm(h, w.t()) + b;
    out.push_back(h);
    if (i + 1 < layers) h = h.clamp_min(0.0);
  }
  return out;
}

}  // namespace

TEST_CASE("MLP forward equals the layer-by-layer formula", "[models][mlp]") {
  MLP mlp({{5, 7, 6, 4}, 1, 3});
  // Non-zero biases, so that they are exercised.
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : mlp.named_parameters()) {
      if (name.find("bias") != std::string::npos) t.uniform_(-0.5, 0.5);
    }
  }
  const auto x = torch::randn({8, 5}, torch::kDouble);
  const auto logits = mlp.forward(x);
  REQUIRE(logits.sizes() == torch::IntArrayRef({8, 4}));
  REQUIRE(logits.scalar_type() == torch::kFloat);
  const auto expected = reference_layers(mlp, x, 3).back();
  REQUIRE(torch::allclose(logits.to(torch::kDouble), expected, 1e-5, 1e-5));
  CHECK(torch::equal(mlp.class_logits(logits), logits.narrow(1, 0, 3)));
  CHECK(torch::equal(mlp.aux_logits(logits), logits.narrow(1, 3, 1)));
  CHECK(mlp.class_outputs() == 3);
  CHECK(mlp.input_size() == 5);
  CHECK(mlp.output_size() == 4);
  CHECK(mlp.input_kind() == InputKind::kFeatures);
  CHECK(mlp.describe() == "mlp 5-7-6-4 (1 aux)");

  SECTION("hidden activations are the pre-activations of the hidden layers") {
    const auto acts = mlp.hidden_activations(x);
    REQUIRE(acts.size() == 2);
    const auto layers = reference_layers(mlp, x, 3);
    for (size_t i = 0; i < 2; ++i) {
      CHECK(acts[i].first == "layers." + std::to_string(i));
      CHECK_FALSE(acts[i].second.requires_grad());
      CHECK(torch::allclose(acts[i].second.to(torch::kDouble), layers[i], 1e-5, 1e-5));
    }
  }
  SECTION("gradients reach every parameter") {
    mlp.forward(x).pow(2).sum().backward();
    for (auto& [name, t] : mlp.named_parameters()) {
      INFO(name);
      REQUIRE(t.grad().defined());
      CHECK(t.grad().abs().sum().item<double>() > 0);
    }
  }
}

TEST_CASE("MLP initialization follows the paper and depends only on the seed", "[models][mlp]") {
  MLP a({{784, 256, 256, 13}, 3, 11});
  MLP b({{784, 256, 256, 13}, 3, 11});
  MLP c({{784, 256, 256, 13}, 3, 12});
  const auto names = a.named_parameters();
  REQUIRE(names.size() == 6);
  CHECK(names[0].first == "layers.0.weight");
  CHECK(names[0].second.sizes() == torch::IntArrayRef({256, 784}));
  CHECK(names[5].first == "layers.2.bias");
  for (size_t i = 0; i < names.size(); ++i) {
    CHECK(torch::equal(a.named_parameters()[i].second, b.named_parameters()[i].second));
  }
  CHECK_FALSE(torch::equal(param(a, "layers.0.weight"), param(c, "layers.0.weight")));
  // std 1/sqrt(fan_in): with 200k (layer 0) and 65k (layer 1) draws the sample std is within 1%.
  const std::vector<std::pair<std::string, double>> expected_std = {
      {"layers.0.weight", 1.0 / std::sqrt(784.0)},
      {"layers.1.weight", 1.0 / 16.0},
      {"layers.2.weight", 1.0 / 16.0}};
  for (const auto& [name, std] : expected_std) {
    const auto w = param(a, name).detach().to(torch::kDouble);
    CHECK(std::abs(w.mean().item<double>()) < 4 * std / std::sqrt(double(w.numel())));
    const double tolerance = name == "layers.2.weight" ? 0.05 : 0.01;
    CHECK(w.std().item<double>() == Approx(std).epsilon(tolerance));
  }
  CHECK(param(a, "layers.1.bias").abs().sum().item<double>() == 0.0);

  SECTION("the global RNG is neither used nor disturbed") {
    torch::manual_seed(5);
    const auto first = torch::rand({4});
    torch::manual_seed(5);
    MLP d({{10, 3}, 0, 1});
    const auto second = torch::rand({4});
    CHECK(torch::equal(first, second));
  }
}

TEST_CASE("MLPConfig rejects bad sizes", "[models][mlp]") {
  CHECK_THROWS_AS(MLP({{5}, 0, 0}), InvalidInput);
  CHECK_THROWS_AS(MLP({{5, 0, 3}, 0, 0}), InvalidInput);
  CHECK_THROWS_AS(MLP({{5, 3}, 3, 0}), InvalidInput);
  CHECK_THROWS_WITH(MLP({{5, 3}, -1, 0}),
                    Catch::Contains("aux_outputs") && Catch::Contains("got -1"));
  MLP mlp({{5, 3}, 0, 0});
  CHECK_THROWS_WITH(mlp.forward(torch::zeros({2, 4})), Catch::Contains("[B, 5]"));
  CHECK_THROWS_AS(mlp.forward(torch::zeros({2, 5}, torch::kLong)), WrongType);
  CHECK_THROWS_AS(
      mlp.forward_cached(torch::zeros({1, 1}), torch::ones({1, 1}), *std::make_unique<KVCache>()),
      InvalidInput);
}

TEST_CASE("MLP clone is a deep copy and to() keeps tensor identity", "[models][mlp]") {
  MLP mlp({{4, 3, 2}, 1, 7});
  const auto copy = mlp.clone();
  const auto x = torch::randn({3, 4});
  CHECK(torch::equal(copy->forward(x), mlp.forward(x)));
  {
    torch::NoGradGuard no_grad;
    param(*copy, "layers.0.weight").add_(1.0);
  }
  CHECK_FALSE(torch::equal(copy->forward(x), mlp.forward(x)));
  auto weight = param(mlp, "layers.0.weight");
  mlp.to(torch::kCPU, torch::kDouble);
  CHECK(weight.scalar_type() == torch::kDouble);  // the same tensor object, converted
  CHECK(param(mlp, "layers.0.weight").unsafeGetTensorImpl() == weight.unsafeGetTensorImpl());
  CHECK(mlp.forward(x).scalar_type() == torch::kDouble);
}

TEST_CASE("Models round-trip through safetensors bit-exactly", "[models][mlp][io]") {
  libtransfer::testing::TempDir dir;
  MLP mlp({{6, 5, 4}, 2, 3});
  {
    torch::NoGradGuard no_grad;
    param(mlp, "layers.1.bias").uniform_();
  }
  const auto path = dir.file("mlp.safetensors");
  save_model(mlp, path, {{"note", "hello"}});
  const auto loaded = load_model(path);
  CHECK(loaded->describe() == mlp.describe());
  const auto a = state_dict(mlp);
  const auto b = state_dict(*loaded);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].first == b[i].first);
    CHECK(torch::equal(a[i].second, b[i].second));
  }
  CHECK(dir.entries().size() == 1);  // no temporary file left behind

  SECTION("bfloat16 models load as bfloat16") {
    mlp.to(torch::kCPU, torch::kBFloat16);
    save_model(mlp, path);
    const auto bf = load_model(path);
    CHECK(bf->named_parameters()[0].second.scalar_type() == torch::kBFloat16);
    CHECK(torch::equal(bf->named_parameters()[0].second, mlp.named_parameters()[0].second));
  }
  SECTION("reserved metadata keys are refused") {
    CHECK_THROWS_AS(save_model(mlp, path, {{"libtransfer.architecture", "x"}}), InvalidInput);
  }
  SECTION("files without architecture metadata are refused") {
    libtransfer::testing::write_bytes(dir.file("plain.safetensors"),
                                      std::string("\x02\0\0\0\0\0\0\0{}", 10));
    CHECK_THROWS_WITH(load_model(dir.file("plain.safetensors")),
                      Catch::Contains("libtransfer.architecture"));
  }
}

TEST_CASE("load_state_dict checks names and shapes", "[models][mlp]") {
  MLP mlp({{4, 3, 2}, 0, 0});
  auto tensors = state_dict(*MLP({{4, 3, 2}, 0, 1}).clone());
  SECTION("a complete state dict is copied") {
    load_state_dict(mlp, tensors);
    CHECK(torch::equal(param(mlp, "layers.0.weight"), tensors[0].second));
    CHECK(param(mlp, "layers.0.weight").requires_grad());
  }
  SECTION("wrong shape") {
    tensors[0].second = torch::zeros({3, 5});
    CHECK_THROWS_WITH(load_state_dict(mlp, tensors), Catch::Contains("layers.0.weight") &&
                                                         Catch::Contains("[3, 4]") &&
                                                         Catch::Contains("[3, 5]"));
    CHECK_THROWS_AS(load_state_dict(mlp, tensors, /*strict=*/false), InvalidInput);
  }
  SECTION("missing tensor") {
    tensors.pop_back();
    CHECK_THROWS_WITH(load_state_dict(mlp, tensors),
                      Catch::Contains("missing") && Catch::Contains("layers.1.bias"));
    load_state_dict(mlp, tensors, /*strict=*/false);
    CHECK(torch::equal(param(mlp, "layers.0.weight"), tensors[0].second));
  }
  SECTION("extra tensor") {
    tensors.emplace_back("layers.9.weight", torch::zeros({1}));
    CHECK_THROWS_WITH(load_state_dict(mlp, tensors),
                      Catch::Contains("unexpected") && Catch::Contains("layers.9.weight"));
  }
  SECTION("dtype is converted to the model's") {
    for (auto& [name, t] : tensors) t = t.to(torch::kDouble);
    load_state_dict(mlp, tensors);
    CHECK(param(mlp, "layers.0.weight").scalar_type() == torch::kFloat);
  }
}
