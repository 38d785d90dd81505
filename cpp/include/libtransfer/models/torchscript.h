// A TorchScript module (a .pt archive written by torch.jit.save) driven as a Model, so that
// models defined in Python can be trained, sampled and tested from C++ without Python.
// Only TorchScript archives are loaded this way, never pickles of arbitrary Python objects.
//
// The module's forward takes (input) or (input, attention_mask) and returns the logits: a
// tensor, or a tuple / list whose first element, or a dict whose "logits" entry, is the logits.
// Costs: the JIT interpreter's overhead per op on top of the ops themselves.
#pragma once

#include <torch/script.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "libtransfer/models/model.h"

namespace libtransfer::models {

// What the caller knows about the module; what it leaves out is detected at load.
// input_kind: empty = probe with token ids [1, 2] first, then with features.
// output_size: 0 = the last dimension of a probe forward's logits.
// input_size: F of a feature model; 0 = the column count of the module's first 2-D parameter.
struct TorchScriptOptions {
  std::optional<InputKind> input_kind;
  std::int64_t output_size = 0;
  std::int64_t input_size = 0;
};

// The wrapper. Parameters are the module's own tensors (named_parameters(recurse)), so training
// through this Model updates the module; the attention mask is passed when forward takes a
// second argument (and the model takes tokens).
class TorchScriptModel : public Model {
 public:
  // FileError if the file is missing or unreadable; InvalidInput if it is no TorchScript archive
  // or the probe forward fails. The module is loaded onto `device`.
  static std::shared_ptr<TorchScriptModel> load(const std::string& path,
                                                const TorchScriptOptions& options = {},
                                                torch::Device device = torch::kCPU);
  // Wraps a module already in memory; `name` is used by describe().
  TorchScriptModel(torch::jit::Module module, std::string name,
                   const TorchScriptOptions& options = {});

  torch::Tensor forward(const torch::Tensor& input,
                        const torch::Tensor& attention_mask = {}) override;
  InputKind input_kind() const override { return input_kind_; }
  std::int64_t output_size() const override { return output_size_; }
  std::int64_t input_size() const override { return input_size_; }
  NamedTensors named_parameters() override;
  NamedTensors named_buffers() override;
  void set_training(bool on) override { module_.train(on); }
  bool is_training() const override { return module_.is_training(); }
  std::string describe() const override { return "torchscript:" + name_; }
  void to(torch::Device device, torch::Dtype dtype) override;
  // A deep copy of the module (torch::jit::Module::clone copies parameters and buffers).
  std::shared_ptr<Model> clone() const override;
  // Architecture "torchscript": load_model refuses these files with a pointer to load().
  std::map<std::string, std::string> metadata() const override;

  torch::jit::Module& module() { return module_; }
  // Whether forward passes the attention mask (the module's forward takes two inputs).
  bool passes_attention_mask() const { return pass_mask_; }

 private:
  torch::Tensor call(const torch::Tensor& input, const torch::Tensor& attention_mask);
  void detect(const TorchScriptOptions& options);

  torch::jit::Module module_;
  std::string name_;
  InputKind input_kind_ = InputKind::kTokens;
  std::int64_t output_size_ = 0;
  std::int64_t input_size_ = 0;
  bool pass_mask_ = false;
};

// The logits inside a forward's result: a tensor, the first element of a tuple or list, or the
// "logits" entry of a dict (recursively). InvalidInput naming `who` otherwise.
torch::Tensor logits_of(const c10::IValue& output, const std::string& who);

}  // namespace libtransfer::models
