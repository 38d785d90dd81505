// The non-virtual parts of the Model interface: state dicts, safetensors save/load, defaults.
#include "libtransfer/models/model.h"

#include <torch/torch.h>

#include <cstring>
#include <set>

#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/models/mlp.h"
#include "libtransfer/models/transformer.h"
#include "libtransfer/torch_dtype.h"

namespace libtransfer::models {
namespace {

// Metadata keys that save_model owns (extra metadata may not override them).
constexpr const char* kArchitectureKey = "libtransfer.architecture";
constexpr const char* kConfigKey = "libtransfer.config";

io::Dtype stored_safetensors_dtype(const std::string& name, at::ScalarType type) {
  const auto dtype = safetensors_dtype(type);
  if (!dtype) {
    throw WrongType("save_model: tensor '" + name + "' has dtype " +
                    std::string(c10::toString(type)) + ", which safetensors cannot store");
  }
  return *dtype;
}

at::ScalarType stored_dtype(const std::string& path, const io::TensorInfo& info) {
  const auto dtype = torch_dtype(info.dtype);
  if (!dtype) {
    throw InvalidInput("load_model('" + path + "'): tensor '" + info.name + "' has dtype " +
                       io::dtype_name(info.dtype) + ", which torch 1.13 does not have");
  }
  return *dtype;
}

std::string shape_text(c10::IntArrayRef shape) { return c10::str(shape); }

// Values any model of this config must store: its weight matrices (a lower bound: biases, norms,
// an untied head and buffers come on top). In double, so absurd sizes cannot overflow.
double stored_values_at_least(const MLPConfig& c) {
  double count = 0;
  for (std::size_t i = 0; i + 1 < c.sizes.size(); ++i) {
    count += static_cast<double>(c.sizes[i]) * static_cast<double>(c.sizes[i + 1]);
  }
  return count;
}

double stored_values_at_least(const TransformerConfig& c) {
  const double d = static_cast<double>(c.d_model);
  return static_cast<double>(c.vocab_size) * d +
         static_cast<double>(c.n_layers) * (4 * d * d + 3 * d * static_cast<double>(c.d_mlp));
}

// A file's config is checked against the values the file holds before the model is built, so a
// small file whose config claims billions of parameters is refused without allocating them.
template <typename Config>
void check_config_fits_file(const std::string& path, const Config& config,
                            const io::SafetensorsFile& file) {
  config.validate();
  double stored = 0;
  for (const auto& info : file.tensors()) stored += static_cast<double>(info.numel());
  const double needed = stored_values_at_least(config);
  if (needed > stored) {
    throw InvalidInput("load_model('" + path + "'): its config describes a model of at least " +
                       c10::str(needed) + " weights, but the file holds only " + c10::str(stored) +
                       " values (a damaged or forged file)");
  }
}

// A few names of a list, for error messages.
std::string some_names(const std::vector<std::string>& names) {
  std::string out;
  const size_t shown = std::min<size_t>(names.size(), 5);
  for (size_t i = 0; i < shown; ++i) out += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > shown) out += " and " + std::to_string(names.size() - shown) + " more";
  return out;
}

}  // namespace

torch::Device Model::device() {
  const auto params = named_parameters();
  return params.empty() ? torch::Device(torch::kCPU) : params.front().second.device();
}

torch::Tensor Model::forward_cached(const torch::Tensor&, const torch::Tensor&, KVCache&) {
  throw InvalidInput("forward_cached: " + describe() +
                     " does not support a KV cache (supports_kv_cache() is false); recompute "
                     "the whole prefix with forward instead");
}

NamedTensors Model::hidden_activations(const torch::Tensor&, const torch::Tensor&) {
  throw InvalidInput("hidden_activations: " + describe() +
                     " does not expose hidden activations (built-in MLP and TransformerLM do)");
}

NamedTensors state_dict(Model& model) {
  NamedTensors out;
  for (auto& [name, tensor] : model.named_parameters()) out.emplace_back(name, tensor.detach());
  for (auto& [name, tensor] : model.named_buffers()) out.emplace_back(name, tensor.detach());
  return out;
}

void load_state_dict(Model& model, const NamedTensors& tensors, bool strict) {
  std::map<std::string, const torch::Tensor*> given;
  for (const auto& [name, tensor] : tensors) {
    if (!given.emplace(name, &tensor).second) {
      throw InvalidInput("load_state_dict: tensor '" + name + "' is given twice");
    }
  }
  const auto own = state_dict(model);
  std::vector<std::string> missing;
  std::set<std::string> known;
  for (const auto& [name, target] : own) {
    known.insert(name);
    const auto found = given.find(name);
    if (found == given.end()) {
      missing.push_back(name);
      continue;
    }
    const auto& source = *found->second;
    if (!source.defined() || source.sizes() != target.sizes()) {
      throw InvalidInput("load_state_dict into " + model.describe() + ": tensor '" + name +
                         "' must have shape " + shape_text(target.sizes()) + ", got " +
                         (source.defined() ? shape_text(source.sizes()) : "an undefined tensor"));
    }
  }
  std::vector<std::string> extra;
  for (const auto& [name, tensor] : tensors) {
    if (known.count(name) == 0) extra.push_back(name);
  }
  if (strict && !missing.empty()) {
    throw InvalidInput("load_state_dict into " + model.describe() + ": " +
                       std::to_string(missing.size()) +
                       " tensor(s) missing: " + some_names(missing));
  }
  if (strict && !extra.empty()) {
    throw InvalidInput("load_state_dict into " + model.describe() + ": " +
                       std::to_string(extra.size()) +
                       " unexpected tensor(s): " + some_names(extra));
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, target] : own) {
    const auto found = given.find(name);
    if (found != given.end()) target.copy_(*found->second);
  }
}

void save_model(Model& model, const std::string& path,
                const std::map<std::string, std::string>& extra_metadata) {
  auto metadata = model.metadata();
  for (const auto& [key, value] : extra_metadata) {
    if (key == kArchitectureKey || key == kConfigKey) {
      throw InvalidInput("save_model: metadata key '" + key +
                         "' is reserved for the model's own description");
    }
    metadata[key] = value;
  }
  // Contiguous CPU copies that stay alive until the file is written.
  std::vector<torch::Tensor> held;
  std::vector<io::TensorView> views;
  for (const auto& [name, tensor] : state_dict(model)) {
    const auto dtype = stored_safetensors_dtype(name, tensor.scalar_type());
    auto cpu = tensor.to(torch::kCPU).contiguous();
    held.push_back(cpu);
    views.push_back(
        {name, dtype, cpu.sizes().vec(), cpu.data_ptr(), static_cast<std::uint64_t>(cpu.nbytes())});
  }
  io::write_safetensors(path, views, metadata);
}

ModelPtr load_model(const std::string& path) {
  const auto file = io::SafetensorsFile::open(path);
  const auto& metadata = file.metadata();
  const auto architecture = metadata.find(kArchitectureKey);
  if (architecture == metadata.end()) {
    throw InvalidInput("load_model('" + path + "'): the file has no '" + kArchitectureKey +
                       "' metadata; it was not written by save_model");
  }
  const auto config = metadata.find(kConfigKey);
  const std::string& kind = architecture->second;
  if (kind == "torchscript") {
    throw InvalidInput("load_model('" + path +
                       "'): these are the weights of a TorchScript module; load the module "
                       "(TorchScriptModel::load) and then load_state_dict with this file");
  }
  if (kind != "mlp" && kind != "transformer") {
    throw InvalidInput("load_model('" + path + "'): unknown architecture '" + kind +
                       "', expected 'mlp' or 'transformer'");
  }
  if (config == metadata.end()) {
    throw InvalidInput("load_model('" + path + "'): the file has no '" + kConfigKey + "' metadata");
  }
  ModelPtr model;
  if (kind == "mlp") {
    const auto parsed = MLPConfig::from_json(config->second);
    check_config_fits_file(path, parsed, file);
    model = std::make_shared<MLP>(parsed);
  } else {
    const auto parsed = TransformerConfig::from_json(config->second);
    check_config_fits_file(path, parsed, file);
    model = std::make_shared<TransformerLM>(parsed);
  }
  NamedTensors tensors;
  for (const auto& info : file.tensors()) {
    // A fresh tensor and a byte copy: the file's data may be unaligned for the element type.
    auto tensor = torch::empty(info.shape, torch::TensorOptions().dtype(stored_dtype(path, info)));
    if (info.nbytes() != static_cast<std::uint64_t>(tensor.nbytes())) {
      throw InvalidInput("load_model('" + path + "'): tensor '" + info.name + "' has " +
                         std::to_string(info.nbytes()) + " bytes, expected " +
                         std::to_string(tensor.nbytes()));
    }
    if (info.nbytes() > 0) std::memcpy(tensor.data_ptr(), file.data(info), info.nbytes());
    tensors.emplace_back(info.name, tensor);
  }
  // The saved dtype wins (a bfloat16 model loads as bfloat16).
  if (!tensors.empty()) {
    const auto params = model->named_parameters();
    if (!params.empty()) {
      for (const auto& [name, tensor] : tensors) {
        if (name == params.front().first) {
          model->to(torch::kCPU, tensor.scalar_type());
          break;
        }
      }
    }
  }
  load_state_dict(*model, tensors, /*strict=*/true);
  return model;
}

std::vector<torch::Tensor> parameters(Model& model) {
  std::vector<torch::Tensor> out;
  for (auto& [name, tensor] : model.named_parameters()) out.push_back(tensor);
  return out;
}

}  // namespace libtransfer::models
