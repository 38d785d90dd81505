// MLP with auxiliary logits: config checks, the paper's seeded initialization, forward.
#include "libtransfer/models/mlp.h"

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <cmath>
#include <nlohmann/json.hpp>

#include "libtransfer/errors.h"

namespace libtransfer::models {
namespace {

std::string sizes_text(const std::vector<std::int64_t>& sizes) {
  std::string out;
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? "-" : "") + std::to_string(sizes[i]);
  return out;
}

}  // namespace

void MLPConfig::validate() const {
  if (sizes.size() < 2) {
    throw InvalidInput("MLPConfig.sizes: expected at least 2 entries (inputs, ..., outputs), got " +
                       std::to_string(sizes.size()));
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] <= 0) {
      throw InvalidInput("MLPConfig.sizes[" + std::to_string(i) +
                         "]: expected a positive size, got " + std::to_string(sizes[i]));
    }
  }
  if (aux_outputs < 0 || aux_outputs >= outputs()) {
    throw InvalidInput("MLPConfig.aux_outputs: expected 0 <= aux_outputs < outputs (" +
                       std::to_string(outputs()) + "), got " + std::to_string(aux_outputs));
  }
}

std::string MLPConfig::to_json() const {
  const nlohmann::json json = {{"sizes", sizes}, {"aux_outputs", aux_outputs}, {"seed", seed}};
  return json.dump();
}

MLPConfig MLPConfig::from_json(const std::string& text) {
  MLPConfig config;
  try {
    const auto json = nlohmann::json::parse(text);
    config.sizes = json.at("sizes").get<std::vector<std::int64_t>>();
    config.aux_outputs = json.at("aux_outputs").get<std::int64_t>();
    config.seed = json.at("seed").get<std::uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidInput(
        "MLPConfig.from_json: expected {\"sizes\": [...], \"aux_outputs\": int, "
        "\"seed\": int}, got '" +
        text + "' (" + e.what() + ")");
  }
  config.validate();
  return config;
}

MLP::MLP(MLPConfig config) : config_(std::move(config)) {
  config_.validate();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(config_.seed);
  const auto options = torch::TensorOptions().dtype(torch::kFloat);
  for (size_t i = 0; i + 1 < config_.sizes.size(); ++i) {
    const auto fan_in = config_.sizes[i];
    const auto fan_out = config_.sizes[i + 1];
    auto weight = at::normal(0.0, 1.0 / std::sqrt(static_cast<double>(fan_in)), {fan_out, fan_in},
                             generator, options);
    weights_.push_back(weight.requires_grad_(true));
    biases_.push_back(torch::zeros({fan_out}, options).requires_grad_(true));
  }
}

torch::Tensor MLP::checked_input(const torch::Tensor& input) const {
  if (!input.defined() || input.dim() != 2 || input.size(1) != config_.inputs()) {
    throw InvalidInput("MLP.forward: input must have shape [B, " +
                       std::to_string(config_.inputs()) + "], got " +
                       (input.defined() ? c10::str(input.sizes()) : "an undefined tensor"));
  }
  if (!at::isFloatingType(input.scalar_type())) {
    throw WrongType("MLP.forward: input must be floating features, got dtype " +
                    std::string(c10::toString(input.scalar_type())));
  }
  const auto& w = weights_.front();
  return input.to(w.device(), w.scalar_type());
}

torch::Tensor MLP::forward(const torch::Tensor& input, const torch::Tensor&) {
  auto h = checked_input(input);
  const size_t n = weights_.size();
  for (size_t i = 0; i < n; ++i) {
    h = torch::nn::functional::linear(h, weights_[i], biases_[i]);
    if (i + 1 < n) h = torch::relu(h);
  }
  return h;
}

NamedTensors MLP::hidden_activations(const torch::Tensor& input, const torch::Tensor&) {
  torch::NoGradGuard no_grad;
  auto h = checked_input(input);
  NamedTensors out;
  for (size_t i = 0; i + 1 < weights_.size(); ++i) {
    h = torch::nn::functional::linear(h, weights_[i], biases_[i]);
    out.emplace_back("layers." + std::to_string(i), h);
    h = torch::relu(h);
  }
  return out;
}

NamedTensors MLP::named_parameters() {
  NamedTensors out;
  for (size_t i = 0; i < weights_.size(); ++i) {
    out.emplace_back("layers." + std::to_string(i) + ".weight", weights_[i]);
    out.emplace_back("layers." + std::to_string(i) + ".bias", biases_[i]);
  }
  return out;
}

std::string MLP::describe() const {
  std::string out = "mlp " + sizes_text(config_.sizes);
  if (config_.aux_outputs > 0) out += " (" + std::to_string(config_.aux_outputs) + " aux)";
  return out;
}

void MLP::to(torch::Device device, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  for (auto* list : {&weights_, &biases_}) {
    for (auto& tensor : *list) {
      // set_data keeps the tensor (and any Python object or optimizer holding it).
      tensor.set_data(tensor.to(device, dtype));
    }
  }
}

std::shared_ptr<Model> MLP::clone() const {
  auto copy = std::make_shared<MLP>(config_);
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < weights_.size(); ++i) {
    copy->weights_[i] = weights_[i].detach().clone().requires_grad_(weights_[i].requires_grad());
    copy->biases_[i] = biases_[i].detach().clone().requires_grad_(biases_[i].requires_grad());
  }
  return copy;
}

std::map<std::string, std::string> MLP::metadata() const {
  return {{"libtransfer.architecture", "mlp"}, {"libtransfer.config", config_.to_json()}};
}

torch::Tensor MLP::class_logits(const torch::Tensor& logits) const {
  return logits.narrow(-1, 0, config_.class_outputs());
}

torch::Tensor MLP::aux_logits(const torch::Tensor& logits) const {
  return logits.narrow(-1, config_.class_outputs(), config_.aux_outputs);
}

}  // namespace libtransfer::models
