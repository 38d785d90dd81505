// TorchScriptModel: loading, argument and output detection, the Model interface over a
// torch::jit::Module.
#include "libtransfer/models/torchscript.h"

#include <torch/torch.h>

#include <filesystem>

#include "libtransfer/errors.h"

namespace libtransfer::models {

torch::Tensor logits_of(const c10::IValue& output, const std::string& who) {
  if (output.isTensor()) return output.toTensor();
  if (output.isTuple()) {
    const auto& elements = output.toTupleRef().elements();
    if (!elements.empty()) return logits_of(elements[0], who);
  } else if (output.isList()) {
    const auto list = output.toList();
    if (list.size() > 0) return logits_of(list.get(0), who);
  } else if (output.isGenericDict()) {
    const auto dict = output.toGenericDict();
    const auto found = dict.find(c10::IValue(std::string("logits")));
    if (found != dict.end()) return logits_of(found->value(), who);
  }
  throw InvalidInput(who +
                     ": forward must return logits (a tensor, a non-empty tuple or list "
                     "whose first element, or a dict whose \"logits\" entry is the logits), "
                     "got " +
                     output.tagKind());
}

std::shared_ptr<TorchScriptModel> TorchScriptModel::load(const std::string& path,
                                                         const TorchScriptOptions& options,
                                                         torch::Device device) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    throw FileError("TorchScriptModel.load: '" + path + "' is not a readable file");
  }
  torch::jit::Module module;
  try {
    module = torch::jit::load(path, device);
  } catch (const c10::Error& e) {
    throw InvalidInput(
        "TorchScriptModel.load: '" + path +
        "' is not a TorchScript archive (torch.jit.save): " + e.what_without_backtrace());
  }
  return std::make_shared<TorchScriptModel>(std::move(module), path, options);
}

TorchScriptModel::TorchScriptModel(torch::jit::Module module, std::string name,
                                   const TorchScriptOptions& options)
    : module_(std::move(module)), name_(std::move(name)) {
  const auto forward = module_.find_method("forward");
  if (!forward) throw InvalidInput(describe() + ": the module has no forward method");
  // arguments()[0] is self.
  const auto& arguments = forward->function().getSchema().arguments();
  if (arguments.size() < 2) {
    throw InvalidInput(describe() + ": forward must take the input, got no argument");
  }
  pass_mask_ = arguments.size() >= 3;
  detect(options);
}

void TorchScriptModel::detect(const TorchScriptOptions& options) {
  torch::NoGradGuard no_grad;
  const auto params = named_parameters();
  const auto device = params.empty() ? torch::Device(torch::kCPU) : params.front().second.device();
  const auto dtype = params.empty() ? torch::kFloat : params.front().second.scalar_type();
  input_size_ = options.input_size;
  if (input_size_ == 0) {
    for (const auto& [name, tensor] : params) {
      if (tensor.dim() == 2) {
        input_size_ = tensor.size(1);
        break;
      }
    }
  }
  auto try_tokens = [&]() -> torch::Tensor {
    const auto ids =
        torch::zeros({1, 2}, torch::TensorOptions().dtype(torch::kLong).device(device));
    return call(ids, torch::ones_like(ids));
  };
  auto try_features = [&]() -> torch::Tensor {
    if (input_size_ <= 0) {
      throw InvalidInput(describe() +
                         ": give input_size for a feature model without 2-D "
                         "parameters");
    }
    return call(torch::zeros({1, input_size_}, torch::TensorOptions().dtype(dtype).device(device)),
                {});
  };
  torch::Tensor probe;
  if (options.input_kind) {
    input_kind_ = *options.input_kind;
    if (options.output_size > 0) {
      output_size_ = options.output_size;
    } else {
      probe = input_kind_ == InputKind::kTokens ? try_tokens() : try_features();
    }
  } else {
    std::string token_error;
    try {
      probe = try_tokens();
      if (probe.dim() != 3) {
        token_error = "token probe returned shape " + c10::str(probe.sizes());
        probe = torch::Tensor();
      }
    } catch (const std::exception& e) {
      token_error = e.what();
    }
    if (probe.defined()) {
      input_kind_ = InputKind::kTokens;
    } else {
      try {
        probe = try_features();
      } catch (const std::exception& e) {
        throw InvalidInput(describe() +
                           ": could not detect the input kind (pass input_kind): "
                           "token ids failed (" +
                           token_error + "), features failed (" + e.what() + ")");
      }
      input_kind_ = InputKind::kFeatures;
    }
  }
  if (input_kind_ == InputKind::kTokens) input_size_ = 0;
  if (probe.defined()) {
    const auto expected_dim = input_kind_ == InputKind::kTokens ? 3 : 2;
    if (probe.dim() != expected_dim) {
      throw InvalidInput(describe() + ": a probe forward returned logits of shape " +
                         c10::str(probe.sizes()) + ", expected " + std::to_string(expected_dim) +
                         " dimensions");
    }
    output_size_ = options.output_size > 0 ? options.output_size : probe.size(-1);
  }
}

torch::Tensor TorchScriptModel::call(const torch::Tensor& input,
                                     const torch::Tensor& attention_mask) {
  std::vector<c10::IValue> inputs{input};
  if (pass_mask_) {
    // Feature models get None (their forward's second argument must then be Optional).
    inputs.emplace_back(attention_mask.defined() ? c10::IValue(attention_mask) : c10::IValue());
  }
  return logits_of(module_.forward(std::move(inputs)), describe());
}

torch::Tensor TorchScriptModel::forward(const torch::Tensor& input,
                                        const torch::Tensor& attention_mask) {
  if (input_kind_ == InputKind::kTokens) {
    if (!input.defined() || input.dim() != 2 ||
        !at::isIntegralType(input.scalar_type(), /*includeBool=*/false)) {
      throw InvalidInput(describe() + ": input must be integer token ids [B, T], got " +
                         (input.defined() ? std::string(c10::toString(input.scalar_type())) +
                                                " of shape " + c10::str(input.sizes())
                                          : std::string("an undefined tensor")));
    }
    const auto device = this->device();
    const auto mask = attention_mask.defined() ? attention_mask.to(device, torch::kLong)
                                               : torch::ones_like(input, torch::kLong).to(device);
    return call(input.to(device, torch::kLong), mask);
  }
  return call(input.to(device()), attention_mask);
}

NamedTensors TorchScriptModel::named_parameters() {
  NamedTensors out;
  for (const auto& p : module_.named_parameters(/*recurse=*/true))
    out.emplace_back(p.name, p.value);
  return out;
}

NamedTensors TorchScriptModel::named_buffers() {
  NamedTensors out;
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) out.emplace_back(b.name, b.value);
  return out;
}

void TorchScriptModel::to(torch::Device device, torch::Dtype dtype) { module_.to(device, dtype); }

std::shared_ptr<Model> TorchScriptModel::clone() const {
  TorchScriptOptions options;
  options.input_kind = input_kind_;
  options.output_size = output_size_;
  options.input_size = input_size_;
  return std::make_shared<TorchScriptModel>(module_.clone(), name_, options);
}

std::map<std::string, std::string> TorchScriptModel::metadata() const {
  return {{"libtransfer.architecture", "torchscript"}, {"libtransfer.torchscript", name_}};
}

}  // namespace libtransfer::models
