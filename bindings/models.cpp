// biastransfer._C: models (libtransfer/models/*.h): the Model base class with its Python
// protocol (callable, state dicts, save, train/eval, to), the built-in MLP and TransformerLM,
// TorchScript modules, and WrappedModule, which lets C++ drive a Python torch.nn.Module.
#include <pybind11/stl.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/extension.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "device.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/mlp.h"
#include "libtransfer/models/model.h"
#include "libtransfer/models/torchscript.h"
#include "libtransfer/models/transformer.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using models::InputKind;
using models::KVCache;
using models::MLP;
using models::MLPConfig;
using models::Model;
using models::ModelPtr;
using models::NamedTensors;
using models::TorchScriptModel;
using models::TorchScriptOptions;
using models::TransformerConfig;
using models::TransformerLM;

std::string type_name(const py::handle& object) { return Py_TYPE(object.ptr())->tp_name; }

InputKind parse_input_kind(const std::string& name, const std::string& argument) {
  if (name == "tokens") return InputKind::kTokens;
  if (name == "features") return InputKind::kFeatures;
  throw InvalidInput(argument + ": expected 'tokens' or 'features', got '" + name + "'");
}

std::string input_kind_name(InputKind kind) {
  return kind == InputKind::kTokens ? "tokens" : "features";
}

// A torch.device, a string ("cuda:0") or a CUDA index.
torch::Device parse_device(const py::handle& object) {
  if (THPDevice_Check(object.ptr())) {
    return available_device(reinterpret_cast<THPDevice*>(object.ptr())->device);
  }
  if (py::isinstance<py::str>(object)) return parse_available_device(object.cast<std::string>());
  if (py::isinstance<py::int_>(object)) {
    return available_device(
        torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(object.cast<int>())));
  }
  throw WrongType("device: expected a torch.device, a string or an int, got " + type_name(object));
}

torch::Dtype parse_dtype(const py::handle& object) {
  if (THPDtype_Check(object.ptr())) return reinterpret_cast<THPDtype*>(object.ptr())->scalar_type;
  throw WrongType("dtype: expected a torch.dtype, got " + type_name(object));
}

py::object dtype_object(torch::Dtype dtype) {
  return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
}

py::dict to_dict(const NamedTensors& tensors) {
  py::dict out;
  for (const auto& [name, tensor] : tensors) out[py::str(name)] = tensor;
  return out;
}

py::list to_pairs(const NamedTensors& tensors) {
  py::list out;
  for (const auto& [name, tensor] : tensors) out.append(py::make_tuple(name, tensor));
  return out;
}

// A mapping of names to tensors (dict, OrderedDict, or an iterable of (name, tensor) pairs).
NamedTensors named_tensors_of(const py::object& object, const std::string& argument) {
  NamedTensors out;
  const py::object items = py::hasattr(object, "items") ? object.attr("items")() : object;
  for (const auto& item : items) {
    const auto pair = item.cast<py::tuple>();
    if (pair.size() != 2 || !THPVariable_Check(pair[1].ptr())) {
      throw WrongType(argument + ": expected a mapping of names to tensors, got an entry of type " +
                      type_name(pair.size() == 2 ? pair[1] : item));
    }
    out.emplace_back(pair[0].cast<std::string>(), pair[1].cast<torch::Tensor>());
  }
  return out;
}

torch::Tensor optional_tensor(const std::optional<torch::Tensor>& tensor) {
  return tensor.value_or(torch::Tensor());
}

// ---- Python modules driven from C++ --------------------------------------------------------

// The logits inside a Python forward's result: a tensor, `.logits` (Hugging Face outputs),
// dict["logits"], or the first element of a tuple or list.
torch::Tensor python_logits(const py::handle& output, const std::string& who) {
  if (THPVariable_Check(output.ptr())) return output.cast<torch::Tensor>();
  if (py::hasattr(output, "logits")) return python_logits(output.attr("logits"), who);
  if (py::isinstance<py::dict>(output) && output.cast<py::dict>().contains("logits")) {
    return python_logits(output.cast<py::dict>()["logits"], who);
  }
  if ((py::isinstance<py::tuple>(output) || py::isinstance<py::list>(output)) &&
      py::len(output) > 0) {
    return python_logits(output[py::int_(0)], who);
  }
  throw WrongType(who +
                  ": forward must return logits (a tensor, an object with .logits, a dict "
                  "with \"logits\", or a tuple whose first element is the logits), got " +
                  type_name(output));
}

// A torch.nn.Module (or any callable with named_parameters) as a Model. Every call into Python
// takes the GIL, so C++ code may call it with the GIL released (the trainer does). Parameters
// are the module's own tensors: a C++ optimizer updates the Python module in place.
class PyModuleModel : public Model {
 public:
  PyModuleModel(py::object module, InputKind kind, std::int64_t output_size,
                std::int64_t input_size, std::string mask_argument, std::string name)
      : module_(std::move(module)),
        kind_(kind),
        output_size_(output_size),
        input_size_(kind == InputKind::kFeatures ? input_size : 0),
        mask_argument_(std::move(mask_argument)),
        name_(std::move(name)) {
    if (!py::hasattr(module_, "named_parameters") || !PyCallable_Check(module_.ptr())) {
      throw WrongType("module: expected a torch.nn.Module (callable with named_parameters), got " +
                      type_name(module_));
    }
    if (output_size_ <= 0) probe_output_size();
  }
  ~PyModuleModel() override {
    // The last reference may go away in a thread without the GIL (e.g. the trainer's).
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      module_ = py::object();
    } else {
      module_.release();
    }
  }

  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& attention_mask) override {
    py::gil_scoped_acquire gil;
    py::object output;
    if (!mask_argument_.empty() && attention_mask.defined() && kind_ == InputKind::kTokens) {
      py::dict kwargs;
      kwargs[py::str(mask_argument_)] = attention_mask;
      output = module_(input, **kwargs);
    } else {
      output = module_(input);
    }
    return python_logits(output, describe());
  }
  InputKind input_kind() const override { return kind_; }
  std::int64_t output_size() const override { return output_size_; }
  std::int64_t input_size() const override { return input_size_; }
  NamedTensors named_parameters() override {
    py::gil_scoped_acquire gil;
    NamedTensors out;
    for (const auto& item : module_.attr("named_parameters")()) {
      const auto pair = item.cast<py::tuple>();
      out.emplace_back(pair[0].cast<std::string>(), pair[1].cast<torch::Tensor>());
    }
    return out;
  }
  NamedTensors named_buffers() override {
    py::gil_scoped_acquire gil;
    NamedTensors out;
    if (!py::hasattr(module_, "named_buffers")) return out;
    for (const auto& item : module_.attr("named_buffers")()) {
      const auto pair = item.cast<py::tuple>();
      out.emplace_back(pair[0].cast<std::string>(), pair[1].cast<torch::Tensor>());
    }
    return out;
  }
  void set_training(bool on) override {
    py::gil_scoped_acquire gil;
    if (py::hasattr(module_, "train")) module_.attr("train")(on);
  }
  bool is_training() const override {
    py::gil_scoped_acquire gil;
    return py::hasattr(module_, "training") && module_.attr("training").cast<bool>();
  }
  std::string describe() const override { return name_; }
  void to(torch::Device device, torch::Dtype dtype) override {
    py::gil_scoped_acquire gil;
    // nn.Module.to keeps the parameters' identity (it assigns .data).
    module_.attr("to")(py::arg("device") = py::cast(device),
                       py::arg("dtype") = dtype_object(dtype));
  }
  std::shared_ptr<Model> clone() const override {
    throw InvalidInput("clone: " + name_ +
                       " is a Python module; copy it on the Python side "
                       "(biastransfer.modeling.wrap(copy.deepcopy(module)))");
  }

  const py::object& module() const { return module_; }
  const std::string& mask_argument() const { return mask_argument_; }

 private:
  // One forward on a tiny input: the logits' last dimension is the output size.
  void probe_output_size() {
    py::gil_scoped_acquire gil;
    const auto params = named_parameters();
    const auto device =
        params.empty() ? torch::Device(torch::kCPU) : params.front().second.device();
    torch::Tensor input;
    torch::Tensor mask;
    if (kind_ == InputKind::kTokens) {
      input = torch::zeros({1, 1}, torch::TensorOptions().dtype(torch::kLong).device(device));
      mask = torch::ones_like(input);
    } else {
      if (input_size_ <= 0) {
        throw InvalidInput("wrap(" + name_ +
                           "): give input_size (or output_size) for a feature model whose "
                           "first layer is not an nn.Linear");
      }
      const auto dtype = params.empty() ? torch::kFloat : params.front().second.scalar_type();
      input = torch::zeros({1, input_size_}, torch::TensorOptions().dtype(dtype).device(device));
    }
    torch::NoGradGuard no_grad;
    const auto logits = forward(input, mask);
    const auto expected = kind_ == InputKind::kTokens ? 3 : 2;
    if (logits.dim() != expected) {
      throw InvalidInput("wrap(" + name_ + "): a probe forward on " + input_kind_name(kind_) +
                         " returned logits of shape " + c10::str(logits.sizes()) + ", expected " +
                         std::to_string(expected) + " dimensions");
    }
    output_size_ = logits.size(-1);
  }

  py::object module_;
  InputKind kind_;
  std::int64_t output_size_;
  std::int64_t input_size_;
  std::string mask_argument_;
  std::string name_;
};

// forward without the GIL (Python modules take it back themselves).
torch::Tensor forward_released(Model& model, const torch::Tensor& input,
                               const std::optional<torch::Tensor>& attention_mask) {
  py::gil_scoped_release release;
  return model.forward(input, optional_tensor(attention_mask));
}

std::string model_repr(const Model& model) {
  return "<biastransfer Model: " + model.describe() + ">";
}

}  // namespace

void bind_models(py::module_& m) {
  py::class_<KVCache>(m, "KVCache",
                      "Incremental decoding state of a language model (keys and values of the\n"
                      "positions seen so far); grown in place by Model.forward_cached.")
      .def(py::init<>())
      .def_property_readonly("length", &KVCache::length, "Positions cached (T_past).")
      .def_readonly("mask", &KVCache::mask, "[B, T_past] int64 attention mask of the cache.")
      .def_readonly("positions", &KVCache::positions, "[B] int64 position of the next token.")
      .def("clear", &KVCache::clear);

  py::class_<Model, ModelPtr>(
      m, "Model",
      "A libtransfer model: logits for token ids [B, T] (-> [B, T, V]) or features [B, F]\n"
      "(-> [B, C]) plus named parameters. Callable: model(x) returns logits with autograd into\n"
      "the parameters (the same tensors the C++ trainer updates).")
      .def("forward", &forward_released, py::arg("input"), py::arg("attention_mask") = py::none(),
           "Logits for a batch. attention_mask [B, T] (1 real, 0 padding; left padding\n"
           "supported) for language models, ignored by feature models.")
      .def("__call__", &forward_released, py::arg("input"), py::arg("attention_mask") = py::none())
      .def(
          "forward_cached",
          [](Model& model, const torch::Tensor& input, const std::optional<torch::Tensor>& mask,
             KVCache& cache) {
            py::gil_scoped_release release;
            const auto m = mask ? *mask : torch::ones_like(input, torch::kLong);
            return model.forward_cached(input, m, cache);
          },
          py::arg("input"), py::arg("attention_mask"), py::arg("cache"),
          "Logits [B, T_new, V] for new tokens given the cache (extended in place); only for\n"
          "models with supports_kv_cache.")
      .def_property_readonly("supports_kv_cache", &Model::supports_kv_cache)
      .def_property_readonly(
          "input_kind", [](const Model& model) { return input_kind_name(model.input_kind()); },
          "'tokens' or 'features'.")
      .def_property_readonly("output_size", &Model::output_size,
                             "V for language models, C (number of logits) for feature models.")
      .def_property_readonly("input_size", &Model::input_size,
                             "F for feature models, 0 for language models.")
      .def_property_readonly("device", &Model::device)
      .def_property_readonly(
          "dtype",
          [](Model& model) -> py::object {
            const auto params = model.named_parameters();
            return params.empty() ? py::none() : dtype_object(params.front().second.scalar_type());
          },
          "The dtype of the first parameter (None without parameters).")
      .def_property_readonly("training", &Model::is_training)
      .def(
          "named_parameters", [](Model& model) { return to_pairs(model.named_parameters()); },
          "[(name, tensor)]: the trainable parameters themselves (not copies).")
      .def(
          "parameters", [](Model& model) { return models::parameters(model); },
          "The parameters, for optimizers.")
      .def("named_buffers", [](Model& model) { return to_pairs(model.named_buffers()); })
      .def(
          "state_dict", [](Model& model) { return to_dict(models::state_dict(model)); },
          "{name: tensor} of parameters then buffers, detached (sharing storage).")
      .def(
          "load_state_dict",
          [](Model& model, const py::object& tensors, bool strict) {
            const auto named = named_tensors_of(tensors, "state_dict");
            py::gil_scoped_release release;
            models::load_state_dict(model, named, strict);
          },
          py::arg("state_dict"), py::arg("strict") = true,
          "Copies tensors into the parameters (no_grad). strict: the names must match exactly;\n"
          "shapes must always match (ValueError naming the tensor and both shapes).")
      .def(
          "save",
          [](Model& model, const std::string& path,
             const std::map<std::string, std::string>& metadata) {
            py::gil_scoped_release release;
            models::save_model(model, path, metadata);
          },
          py::arg("path"), py::arg("metadata") = std::map<std::string, std::string>{},
          "Writes the state dict as safetensors (atomically) with the architecture metadata;\n"
          "load_model(path) rebuilds built-in models.")
      .def(
          "train",
          [](const ModelPtr& model, bool mode) {
            model->set_training(mode);
            return model;
          },
          py::arg("mode") = true, "Sets training mode; returns the model.")
      .def(
          "eval",
          [](const ModelPtr& model) {
            model->set_training(false);
            return model;
          },
          "Sets evaluation mode; returns the model.")
      .def(
          "clone", [](const Model& model) { return model.clone(); },
          "A new model with deep copies of the parameters (not for Python modules: use\n"
          "copy.deepcopy on the module).")
      .def(
          "to",
          [](const ModelPtr& model, const py::object& device, const py::object& dtype) {
            const auto params = model->named_parameters();
            const auto target_device = device.is_none() ? model->device() : parse_device(device);
            const auto target_dtype = !dtype.is_none() ? parse_dtype(dtype)
                                      : params.empty() ? torch::kFloat
                                                       : params.front().second.scalar_type();
            py::gil_scoped_release release;
            model->to(target_device, target_dtype);
            return model;
          },
          py::arg("device") = py::none(), py::arg("dtype") = py::none(),
          "Moves parameters and buffers in place (tensor identity kept); returns the model.")
      .def(
          "hidden_activations",
          [](Model& model, const torch::Tensor& input, const std::optional<torch::Tensor>& mask) {
            NamedTensors out;
            {
              py::gil_scoped_release release;
              out = model.hidden_activations(input, optional_tensor(mask));
            }
            return to_dict(out);
          },
          py::arg("input"), py::arg("attention_mask") = py::none(),
          "{name: [N, units]} hidden pre-activations (MLP 'layers.<i>'; TransformerLM\n"
          "'layers.<i>.mlp.gate' / '.up' at real positions), computed under no_grad.")
      .def("metadata", &Model::metadata)
      .def("describe", &Model::describe)
      .def("__repr__", &model_repr);

  py::class_<MLP, Model, std::shared_ptr<MLP>>(
      m, "MLP",
      "Multilayer perceptron with auxiliary logits (ReLU between layers). Weights\n"
      "N(0, 1/sqrt(fan_in)) from a generator seeded with `seed`, biases 0. The last\n"
      "aux_outputs outputs are auxiliary logits.")
      .def(py::init(
               [](std::vector<std::int64_t> sizes, std::int64_t aux_outputs, std::uint64_t seed) {
                 return std::make_shared<MLP>(MLPConfig{std::move(sizes), aux_outputs, seed});
               }),
           py::arg("sizes"), py::arg("aux_outputs") = 0, py::arg("seed") = 0,
           "sizes: [inputs, hidden..., outputs], e.g. [784, 256, 256, 13] with aux_outputs=3.")
      .def_property_readonly("sizes", [](const MLP& mlp) { return mlp.config().sizes; })
      .def_property_readonly("seed", [](const MLP& mlp) { return mlp.config().seed; })
      .def_property_readonly("aux_outputs", &MLP::aux_outputs)
      .def_property_readonly("class_outputs", &MLP::class_outputs,
                             "Logits trained on labels (outputs - aux_outputs).")
      .def("class_logits", &MLP::class_logits, py::arg("logits"),
           "logits[..., :class_outputs] (a view).")
      .def("aux_logits", &MLP::aux_logits, py::arg("logits"),
           "logits[..., class_outputs:] (a view).")
      .def_property_readonly("config_json", [](const MLP& mlp) { return mlp.config().to_json(); });

  py::class_<TransformerLM, Model, std::shared_ptr<TransformerLM>>(
      m, "TransformerLM",
      "Decoder-only transformer LM: RMSNorm pre-norm blocks, causal attention, SwiGLU MLP,\n"
      "rotary or learned positions, tied or untied head; KV cache; left padding supported.")
      .def(py::init([](std::int64_t vocab_size, std::int64_t d_model, std::int64_t n_layers,
                       std::int64_t n_heads, std::int64_t d_mlp, std::int64_t max_seq_len,
                       std::string positions, bool tied_head, double norm_eps, double rope_theta,
                       std::uint64_t seed, double init_std) {
             TransformerConfig c;
             c.vocab_size = vocab_size;
             c.d_model = d_model;
             c.n_layers = n_layers;
             c.n_heads = n_heads;
             c.d_mlp = d_mlp;
             c.max_seq_len = max_seq_len;
             c.positions = std::move(positions);
             c.tied_head = tied_head;
             c.norm_eps = norm_eps;
             c.rope_theta = rope_theta;
             c.seed = seed;
             c.init_std = init_std;
             return std::make_shared<TransformerLM>(std::move(c));
           }),
           py::kw_only(), py::arg("vocab_size"), py::arg("d_model") = 32, py::arg("n_layers") = 1,
           py::arg("n_heads") = 4, py::arg("d_mlp") = 64, py::arg("max_seq_len") = 256,
           py::arg("positions") = "rotary", py::arg("tied_head") = true, py::arg("norm_eps") = 1e-5,
           py::arg("rope_theta") = 10000.0, py::arg("seed") = 0, py::arg("init_std") = 0.02)
      .def_property_readonly("config_json",
                             [](const TransformerLM& lm) { return lm.config().to_json(); })
      .def_property_readonly(
          "num_parameters", [](const TransformerLM& lm) { return lm.config().parameter_count(); },
          "The parameter count by the config's closed form.");

  py::class_<TorchScriptModel, Model, std::shared_ptr<TorchScriptModel>>(
      m, "TorchScriptModel",
      "A TorchScript module (torch.jit.save archive) as a Model; forward(input[, mask]) must\n"
      "return logits, a tuple/list whose first element is the logits, or a dict with 'logits'.")
      .def_static(
          "load",
          [](const std::string& path, const std::optional<std::string>& input_kind,
             std::int64_t output_size, std::int64_t input_size, const py::object& device) {
            TorchScriptOptions options;
            if (input_kind) options.input_kind = parse_input_kind(*input_kind, "input_kind");
            options.output_size = output_size;
            options.input_size = input_size;
            const auto target =
                device.is_none() ? torch::Device(torch::kCPU) : parse_device(device);
            py::gil_scoped_release release;
            return TorchScriptModel::load(path, options, target);
          },
          py::arg("path"), py::arg("input_kind") = py::none(), py::arg("output_size") = 0,
          py::arg("input_size") = 0, py::arg("device") = py::none(),
          "input_kind 'tokens' / 'features' (None: detected by probe forwards), output_size\n"
          "(0: detected), input_size (features; 0: the first 2-D parameter's columns).")
      .def_property_readonly("passes_attention_mask", &TorchScriptModel::passes_attention_mask);

  py::class_<PyModuleModel, Model, std::shared_ptr<PyModuleModel>>(
      m, "WrappedModule",
      "A Python torch.nn.Module driven as a Model (use biastransfer.modeling.wrap). Forward\n"
      "runs the module under the GIL; parameters are the module's own tensors.")
      .def(py::init([](py::object module, const std::string& input_kind, std::int64_t output_size,
                       std::int64_t input_size, std::string mask_argument, std::string name) {
             return std::make_shared<PyModuleModel>(
                 std::move(module), parse_input_kind(input_kind, "input_kind"), output_size,
                 input_size, std::move(mask_argument),
                 name.empty() ? std::string("python module") : std::move(name));
           }),
           py::arg("module"), py::arg("input_kind") = "tokens", py::arg("output_size") = 0,
           py::arg("input_size") = 0, py::arg("mask_argument") = "", py::arg("name") = "",
           "mask_argument: the keyword the forward takes the attention mask by ('' = never\n"
           "passed). output_size 0: probed with one forward.")
      .def_property_readonly("module", &PyModuleModel::module)
      .def_property_readonly("mask_argument", &PyModuleModel::mask_argument);

  m.def(
      "load_model",
      [](const std::string& path) {
        py::gil_scoped_release release;
        return models::load_model(path);
      },
      py::arg("path"),
      "Rebuilds a built-in model (MLP, TransformerLM) from a file written by Model.save.");
  m.def(
      "transformer_parameter_count",
      [](std::int64_t vocab_size, std::int64_t d_model, std::int64_t n_layers, std::int64_t d_mlp,
         std::int64_t max_seq_len, const std::string& positions, bool tied_head) {
        TransformerConfig c;
        c.vocab_size = vocab_size;
        c.d_model = d_model;
        c.n_layers = n_layers;
        c.d_mlp = d_mlp;
        c.max_seq_len = max_seq_len;
        c.positions = positions;
        c.tied_head = tied_head;
        c.n_heads = 1;
        c.validate();
        return c.parameter_count();
      },
      py::kw_only(), py::arg("vocab_size"), py::arg("d_model"), py::arg("n_layers"),
      py::arg("d_mlp"), py::arg("max_seq_len"), py::arg("positions") = "rotary",
      py::arg("tied_head") = true, "Parameters of a TransformerLM of that shape (closed form).");
}

// Python objects -> Model: bound models as they are; modules through biastransfer.modeling.wrap
// (which inspects the forward's signature and infers the input kind); anything else TypeError.
models::ModelPtr to_model(const py::object& object, const std::string& argument) {
  if (py::isinstance<Model>(object)) return object.cast<ModelPtr>();
  if (py::hasattr(object, "named_parameters") && PyCallable_Check(object.ptr())) {
    const auto wrapped = py::module_::import("biastransfer.modeling").attr("wrap")(object);
    return wrapped.cast<ModelPtr>();
  }
  throw WrongType(argument +
                  ": expected a biastransfer Model or a torch.nn.Module (a callable with "
                  "named_parameters), got " +
                  type_name(object));
}

}  // namespace libtransfer::bindings
