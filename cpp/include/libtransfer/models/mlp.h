// The multilayer perceptron of the paper's auxiliary-logit experiment (Cloud et al., MNIST):
// Linear -> ReLU -> ... -> Linear, whose last `aux_outputs` outputs are "auxiliary" logits that
// no label ever trains directly (the student imitates only them).
//
// Costs: forward is one matmul per layer; parameters sum(in * out + out) floats.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::models {

// Architecture and seed of an MLP. sizes = {inputs, hidden..., outputs} (>= 2 entries, all
// positive); the last aux_outputs of the outputs are auxiliary (0 <= aux_outputs < outputs).
// The paper's network: {784, 256, 256, 13} with aux_outputs 3.
struct MLPConfig {
  std::vector<std::int64_t> sizes;
  std::int64_t aux_outputs = 0;
  std::uint64_t seed = 0;

  // InvalidInput naming the field, what was expected and what was got.
  void validate() const;
  std::int64_t inputs() const { return sizes.front(); }
  std::int64_t outputs() const { return sizes.back(); }
  // Logits trained on labels: outputs - aux_outputs.
  std::int64_t class_outputs() const { return outputs() - aux_outputs; }
  std::int64_t hidden_layers() const { return static_cast<std::int64_t>(sizes.size()) - 2; }
  // JSON text of the config (stored in saved files) and back (InvalidInput on malformed text).
  std::string to_json() const;
  static MLPConfig from_json(const std::string& text);
};

// The paper's initialization: weights N(0, std = 1/sqrt(fan_in)), drawn layer by layer from a
// CPU generator seeded with config.seed (never the global RNG), so one seed gives one network on
// every machine. Biases start at zero: the paper states only the weights' law, and zero biases
// keep the initialization a pure function of the weight draws (a documented choice).
// Parameters: layers.<i>.weight [out, in], layers.<i>.bias [out], float32 on the CPU.
class MLP : public Model {
 public:
  explicit MLP(MLPConfig config);

  // input [B, F] floating (moved to the parameters' device and dtype) -> logits [B, outputs].
  torch::Tensor forward(const torch::Tensor& input,
                        const torch::Tensor& attention_mask = {}) override;
  InputKind input_kind() const override { return InputKind::kFeatures; }
  std::int64_t output_size() const override { return config_.outputs(); }
  std::int64_t input_size() const override { return config_.inputs(); }
  NamedTensors named_parameters() override;
  std::string describe() const override;
  void to(torch::Device device, torch::Dtype dtype) override;
  // "layers.<i>": pre-activation of hidden layer i as [B, units] (no_grad).
  NamedTensors hidden_activations(const torch::Tensor& input,
                                  const torch::Tensor& attention_mask = {}) override;
  std::shared_ptr<Model> clone() const override;
  std::map<std::string, std::string> metadata() const override;

  const MLPConfig& config() const { return config_; }
  std::int64_t class_outputs() const { return config_.class_outputs(); }
  std::int64_t aux_outputs() const { return config_.aux_outputs; }
  // Views of a logits tensor [..., outputs]: the class logits and the auxiliary logits.
  torch::Tensor class_logits(const torch::Tensor& logits) const;
  torch::Tensor aux_logits(const torch::Tensor& logits) const;

 private:
  // Checks the input and returns it in the parameters' dtype.
  torch::Tensor checked_input(const torch::Tensor& input) const;

  MLPConfig config_;
  std::vector<torch::Tensor> weights_;
  std::vector<torch::Tensor> biases_;
};

}  // namespace libtransfer::models
